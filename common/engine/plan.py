"""The plan: a torch module lowered to an ordered list of secure steps with shapes and scales.

The plan depends on the architecture and the input size alone (never on weight values), so the
dealer and both servers derive the same plan and agree on the randomness each step consumes.

Lowering traces the module with torch.fx, propagates shapes with a zero input, folds BatchNorm
into the preceding convolution (a BatchNorm on its own becomes a per-channel affine layer), and
tracks the fixed-point scale of every value: products carry 2f fractional bits and are truncated
where a consumer needs f. ReLU and sigmoid take 2f inputs directly (the truncation is fused into
their first opening), so a conv + ReLU costs two openings, not three.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from secdfd.common.errors import PlanError

MEAN_BITS = 24  # fractional bits of the public 1/k multiplier of means and average pools

SUPPORTED = (
    "Conv2d (any groups), BatchNorm2d (folded), ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), "
    "AdaptiveMaxPool2d(1), mean/amax over dims, Linear, Sigmoid, add, sub, mul, cat, flatten, view/reshape, "
    "Identity, Dropout (inference)"
)


@dataclass(frozen=True)
class Step:
    """One secure step: `op` applied to the outputs of `inputs` (earlier step indices)."""

    index: int
    op: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    scale: int  # fractional bits of the output
    name: str
    attrs: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    input_shape: tuple[int, ...]
    output: int
    frac: int
    weights: dict[str, tuple[int, ...]]  # weight key -> shape (fixed-point shares are provisioned per key)

    def describe(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.op] = counts.get(s.op, 0) + 1
        return counts


@dataclass
class _Val:
    step: int
    scale: int


class _Lowering:
    def __init__(self, module: nn.Module, frac: int, cmp_bits: int) -> None:
        self.module = module
        self.mods = dict(module.named_modules())
        self.frac = frac
        self.fuse_limit = 64 - cmp_bits - 1  # largest truncation a comparison can fuse
        self.steps: list[Step] = []
        self.weights: dict[str, tuple[int, ...]] = {}
        self._trunc: dict[int, _Val] = {}

    def add(self, op: str, inputs: list[_Val], shape: Any, scale: int, name: str, **attrs: Any) -> _Val:
        idx = len(self.steps)
        self.steps.append(Step(idx, op, tuple(v.step for v in inputs), tuple(shape), scale, name, attrs))
        return _Val(idx, scale)

    def at_frac(self, v: _Val, name: str) -> _Val:
        """v at scale f, truncating once per value however many consumers need it."""
        if v.scale == self.frac:
            return v
        if v.step not in self._trunc:
            shape = self.steps[v.step].shape
            self._trunc[v.step] = self.add("trunc", [v], shape, self.frac, name + ".trunc", shift=v.scale - self.frac)
        return self._trunc[v.step]

    def fusable(self, v: _Val, name: str) -> _Val:
        """For ReLU/sigmoid: keep a 2f input (truncation fused) when the comparison allows it."""
        return v if v.scale - self.frac <= self.fuse_limit else self.at_frac(v, name)

    def align(self, vals: list[_Val], name: str) -> tuple[list[_Val], list[int], int]:
        scale = max(v.scale for v in vals)
        return vals, [scale - v.scale for v in vals], scale


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise PlanError(f"layer {node.name}: output is not a single tensor; supported: {SUPPORTED}")
    return tuple(meta.shape)


def _pair(v: Any) -> int:
    if isinstance(v, tuple | list):
        if len(set(v)) != 1:
            raise PlanError(f"non-square window or stride {v} is not supported")
        return int(v[0])
    return int(v)


def _dims(d: Any, ndim: int) -> tuple[int, ...]:
    ds = (d,) if isinstance(d, int) else tuple(d)
    return tuple(sorted(x % ndim for x in ds))


def build_plan(module: nn.Module, input_shape: tuple[int, ...] | list[int], frac: int = 16, cmp_bits: int = 40) -> Plan:
    """Lower `module` (eval mode) for inputs of `input_shape` to a Plan. Raises PlanError naming any
    unsupported layer."""
    input_shape = tuple(int(s) for s in input_shape)
    was_training = module.training
    module.eval()
    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise PlanError(f"cannot trace the model with torch.fx: {e}") from e
    finally:
        module.train(was_training)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PlanError("the model must take exactly one tensor input")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(input_shape))
    low = _Lowering(gm, frac, cmp_bits)
    env: dict[str, Any] = {}
    users = {n.name: len(n.users) for n in gm.graph.nodes}
    out_val: _Val | None = None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node.name] = low.add("input", [], input_shape, frac, "input")
        elif node.op == "output":
            arg = node.args[0]
            if not isinstance(arg, torch.fx.Node):
                raise PlanError("the model must return a single tensor")
            out_val = low.at_frac(env[arg.name], "output")
            out_val = low.add("output", [out_val], low.steps[out_val.step].shape, frac, "output")
        elif node.op == "call_module":
            env[node.name] = _lower_module(low, node, env, users)
        elif node.op in ("call_function", "call_method"):
            env[node.name] = _lower_function(low, node, env)
        else:
            raise PlanError(f"layer {node.name} ({node.op} {node.target}) is not supported; supported: {SUPPORTED}")
    assert out_val is not None
    return Plan(tuple(low.steps), input_shape, out_val.step, frac, low.weights)


def _arg(env: dict[str, Any], a: Any) -> Any:
    if isinstance(a, list | tuple):
        return type(a)(_arg(env, x) for x in a)
    return env[a.name] if isinstance(a, torch.fx.Node) else a


def _lower_module(low: _Lowering, node: torch.fx.Node, env: dict[str, Any], users: dict[str, int]) -> Any:
    mod = low.mods[str(node.target)]
    name = str(node.target)
    shape = _shape(node)
    first = node.args[0]
    if not isinstance(first, torch.fx.Node):
        raise PlanError(f"layer {name}: its input must be a tensor")
    x = env[first.name]
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise PlanError(f"layer {name}: only numeric zero padding is supported")
        return _linear(low, x, shape, name, "conv", mod.weight.shape, mod.bias is not None,
                       stride=_pair(mod.stride), padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                       groups=mod.groups)
    if isinstance(mod, nn.BatchNorm2d):
        pstep = low.steps[x.step] if isinstance(x, _Val) else None
        if (pstep is not None and pstep.op == "linear" and pstep.attrs.get("kind") == "conv"
                and users[first.name] == 1 and "bn" not in pstep.attrs):
            pstep.attrs["bn"] = name  # folded at weight extraction; same outputs
            pstep.attrs["bias"] = True
            low.weights[pstep.attrs["bias_key"]] = (mod.num_features,)
            return x
        c = mod.num_features
        return _linear(low, x, shape, name, "conv", (c, 1, 1, 1), True, stride=1, padding=0, dilation=1,
                       groups=c, affine_bn=True)
    if isinstance(mod, nn.Linear):
        return _linear(low, x, shape, name, "fc", mod.weight.shape, mod.bias is not None)
    if isinstance(mod, nn.ReLU):
        return _relu(low, x, shape, name)
    if isinstance(mod, nn.Sigmoid):
        return _sigmoid(low, x, shape, name)
    if isinstance(mod, nn.MaxPool2d):
        if _pair(mod.dilation) != 1 or mod.ceil_mode or mod.return_indices:
            raise PlanError(f"layer {name}: MaxPool2d with dilation, ceil_mode or indices is not supported")
        return _maxpool(low, x, shape, name, _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                        _pair(mod.padding))
    if isinstance(mod, nn.AvgPool2d):
        return _avgpool(low, x, shape, name, _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                        _pair(mod.padding), mod.ceil_mode, mod.count_include_pad, mod.divisor_override)
    if isinstance(mod, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        if _pair(mod.output_size) != 1:
            raise PlanError(f"layer {name}: adaptive pools are supported with output size 1 only")
        if isinstance(mod, nn.AdaptiveAvgPool2d):
            return _mean(low, x, shape, name, (2, 3))
        return _maxreduce(low, x, shape, name, (2, 3))
    if isinstance(mod, nn.Flatten):
        return low.add("reshape", [x], shape, x.scale, name)
    if isinstance(mod, nn.Identity | nn.Dropout):
        return x
    raise PlanError(f"layer {name} ({type(mod).__name__}) is not supported; supported: {SUPPORTED}")


def _linear(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, kind: str, wshape: Any, bias: bool,
            affine_bn: bool = False, **attrs: Any) -> _Val:
    x = low.at_frac(x, name)
    wkey, bkey = name + ".weight", name + ".bias"
    low.weights[wkey] = tuple(wshape)
    if bias:
        low.weights[bkey] = (int(wshape[0]),)
    return low.add("linear", [x], shape, x.scale + low.frac, name, kind=kind, weight=wkey, bias_key=bkey, bias=bias,
                   affine_bn=affine_bn, wshape=tuple(wshape), **attrs)


def _relu(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str) -> _Val:
    x = low.fusable(x, name)
    return low.add("relu", [x], shape, low.frac, name, shift=x.scale - low.frac)


def _sigmoid(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str) -> _Val:
    x = low.fusable(x, name)
    return low.add("sigmoid", [x], shape, low.frac, name, shift=x.scale - low.frac)


def _maxpool(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, k: int, s: int, p: int) -> _Val:
    x = low.at_frac(x, name)
    if p > k // 2:
        raise PlanError(f"layer {name}: padding must be at most half the kernel")
    return low.add("maxpool", [x], shape, low.frac, name, k=k, s=s, p=p)


def _maxreduce(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dims: tuple[int, ...]) -> _Val:
    x = low.at_frac(x, name)
    return low.add("maxreduce", [x], shape, low.frac, name, dims=dims)


def _mean(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dims: tuple[int, ...]) -> _Val:
    x = low.at_frac(x, name)
    in_shape = low.steps[x.step].shape
    count = 1
    for d in dims:
        count *= in_shape[d]
    mult = round((1 << MEAN_BITS) / count)
    return low.add("mean", [x], shape, x.scale + MEAN_BITS, name, dims=dims, mult=mult)


def _avgpool(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, k: int, s: int, p: int, ceil_mode: bool,
             count_include_pad: bool, divisor: int | None) -> _Val:
    if ceil_mode or (p and not count_include_pad):
        raise PlanError(f"layer {name}: AvgPool2d with ceil_mode or count_include_pad=False is not supported")
    x = low.at_frac(x, name)
    mult = round((1 << MEAN_BITS) / (divisor or k * k))
    return low.add("sumpool", [x], shape, x.scale + MEAN_BITS, name, k=k, s=s, p=p, mult=mult)


_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub}
_MUL = {operator.mul, operator.imul, torch.mul}


def _lower_function(low: _Lowering, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    t = node.target
    name = node.name
    args = [_arg(env, a) for a in node.args]
    kwargs = {k: _arg(env, v) for k, v in node.kwargs.items()}
    method = node.op == "call_method"
    shape = _shape(node)
    ndim = len(shape)

    def is_val(a: Any) -> bool:
        return isinstance(a, _Val)

    if (method and t in ("add", "add_")) or t in _ADD:
        return _addsub(low, args[0], args[1], shape, name, 1)
    if (method and t in ("sub", "sub_")) or t in _SUB:
        return _addsub(low, args[0], args[1], shape, name, -1)
    if (method and t in ("mul", "mul_")) or t in _MUL:
        a, b = args[0], args[1]
        if is_val(a) and is_val(b):
            a, b = low.at_frac(a, name), low.at_frac(b, name)
            return low.add("mul", [a, b], shape, 2 * low.frac, name)
        v, c = (a, b) if is_val(a) else (b, a)
        return _scale(low, v, float(c), shape, name)
    if t in (operator.truediv,) or (method and t == "div"):
        if not is_val(args[0]) or is_val(args[1]):
            raise PlanError(f"layer {name}: division is supported by a constant only")
        return _scale(low, args[0], 1.0 / float(args[1]), shape, name)
    if t is operator.neg or (method and t == "neg"):
        return _scale(low, args[0], -1.0, shape, name)
    if t in (torch.relu, F.relu) or (method and t == "relu"):
        return _relu(low, args[0], shape, name)
    if t in (torch.sigmoid, F.sigmoid) or (method and t == "sigmoid"):
        return _sigmoid(low, args[0], shape, name)
    if t is torch.cat or t is torch.concat:
        vals = list(args[0])
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        vals, lift, scale = low.align(vals, name)
        return low.add("cat", vals, shape, scale, name, dim=int(dim) % ndim, lift=tuple(lift))
    if t in (torch.flatten,) or (method and t in ("flatten", "view", "reshape", "contiguous")):
        return low.add("reshape", [args[0]], shape, args[0].scale, name)
    if t in (torch.mean,) or (method and t == "mean"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        in_nd = len(low.steps[args[0].step].shape)
        dims = _dims(dim if dim is not None else tuple(range(in_nd)), in_nd)
        return _mean(low, args[0], shape, name, dims)
    if t in (torch.amax,) or (method and t == "amax"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        in_nd = len(low.steps[args[0].step].shape)
        dims = _dims(dim if dim is not None else tuple(range(in_nd)), in_nd)
        return _maxreduce(low, args[0], shape, name, dims)
    if t is F.adaptive_avg_pool2d or t is F.adaptive_max_pool2d:
        size = kwargs.get("output_size", args[1] if len(args) > 1 else None)
        if _pair(size) != 1:
            raise PlanError(f"layer {name}: adaptive pools are supported with output size 1 only")
        fn = _mean if t is F.adaptive_avg_pool2d else _maxreduce
        return fn(low, args[0], shape, name, (2, 3))
    if t is F.max_pool2d or t is F.avg_pool2d:
        k = _pair(kwargs.get("kernel_size", args[1]))
        s = kwargs.get("stride", args[2] if len(args) > 2 else None)
        s = _pair(s) if s else k
        p = _pair(kwargs.get("padding", args[3] if len(args) > 3 else 0))
        if t is F.max_pool2d:
            return _maxpool(low, args[0], shape, name, k, s, p)
        return _avgpool(low, args[0], shape, name, k, s, p, bool(kwargs.get("ceil_mode", False)),
                        bool(kwargs.get("count_include_pad", True)), kwargs.get("divisor_override"))
    what = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    raise PlanError(f"layer {name} ({what}) is not supported; supported: {SUPPORTED}")


def _addsub(low: _Lowering, a: Any, b: Any, shape: tuple[int, ...], name: str, sign: int) -> _Val:
    if isinstance(a, _Val) and isinstance(b, _Val):
        vals, lift, scale = low.align([a, b], name)
        return low.add("add", vals, shape, scale, name, lift=tuple(lift), signs=(1, sign))
    if isinstance(a, _Val):
        return low.add("add_const", [a], shape, a.scale, name, value=sign * float(b), sign=1)
    if isinstance(b, _Val):
        return low.add("add_const", [b], shape, b.scale, name, value=float(a), sign=sign)
    raise PlanError(f"layer {name}: arithmetic on constants only is not supported")


def _scale(low: _Lowering, v: _Val, c: float, shape: tuple[int, ...], name: str) -> _Val:
    if float(c).is_integer():
        return low.add("scale", [v], shape, v.scale, name, mult=int(c))
    v = low.at_frac(v, name)
    return low.add("scale", [v], shape, v.scale + low.frac, name, mult=round(c * (1 << low.frac)))


# ---------------------------------------------------------------------------------------------
# Weights: what the model owner extracts, folds and shares (never part of the plan).


def extract_weights(module: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Float64 weights per plan key with BatchNorm folded; biases included."""
    mods = dict(module.named_modules())
    out: dict[str, torch.Tensor] = {}
    for s in plan.steps:
        if s.op != "linear":
            continue
        name = s.name
        mod = mods[name]
        if s.attrs.get("affine_bn"):
            assert isinstance(mod, nn.BatchNorm2d)
            g, b = _bn_affine(mod)
            out[s.attrs["weight"]] = g.reshape(-1, 1, 1, 1)
            out[s.attrs["bias_key"]] = b
            continue
        w = mod.weight.detach().to(torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64)
        if mod.bias is not None:
            b = mod.bias.detach().to(torch.float64)
        if "bn" in s.attrs:
            g, beta = _bn_affine(mods[s.attrs["bn"]])
            w = w * g.reshape(-1, *([1] * (w.dim() - 1)))
            b = b * g + beta
        out[s.attrs["weight"]] = w
        if s.attrs["bias"]:
            out[s.attrs["bias_key"]] = b
    return out


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(bn, nn.BatchNorm2d)
    var = bn.running_var.detach().to(torch.float64)  # type: ignore[union-attr]
    mean = bn.running_mean.detach().to(torch.float64)  # type: ignore[union-attr]
    g = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    scale = g / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
