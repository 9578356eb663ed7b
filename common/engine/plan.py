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
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar

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


# --- typed step attributes: one frozen class per kind of step ---------------------------------


@dataclass(frozen=True)
class NoAttrs:
    """input, output, reshape and mul need nothing beyond their shapes."""


@dataclass(frozen=True)
class LinearAttrs:
    """A conv or fc layer with secret weights `weight` (and bias `bias_key` when `bias`).

    `bn` names a BatchNorm folded into this conv at weight extraction; `affine_bn` marks a lone
    BatchNorm lowered to a per-channel (depthwise 1x1) affine layer.
    """

    kind: str  # "conv" or "fc"
    weight: str
    bias_key: str
    bias: bool
    wshape: tuple[int, ...]
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    bn: str | None = None
    affine_bn: bool = False


@dataclass(frozen=True)
class ShiftAttrs:
    """trunc, relu and sigmoid: the input carries `shift` more fractional bits than the output."""

    shift: int


@dataclass(frozen=True)
class WindowAttrs:
    """maxpool: a k x k window, stride s, padding p."""

    k: int
    s: int
    p: int


@dataclass(frozen=True)
class ReduceAttrs:
    """maxreduce: the maximum over `dims`."""

    dims: tuple[int, ...]


@dataclass(frozen=True)
class AddAttrs:
    """add: sum of the inputs, each lifted by `lift` bits to a common scale and signed by `signs`."""

    lift: tuple[int, ...]
    signs: tuple[int, ...]


@dataclass(frozen=True)
class AddConstAttrs:
    """add_const: sign * x + value."""

    value: float
    sign: int


@dataclass(frozen=True)
class ScaleAttrs:
    """scale: x times the public integer `mult`."""

    mult: int


@dataclass(frozen=True)
class CatAttrs:
    """cat: concatenation along `dim`, each input lifted by `lift` bits."""

    dim: int
    lift: tuple[int, ...]


@dataclass(frozen=True)
class MeanAttrs:
    """mean: the sum over `dims` times `mult` = round(2^MEAN_BITS / count)."""

    dims: tuple[int, ...]
    mult: int


@dataclass(frozen=True)
class SumPoolAttrs:
    """sumpool (average pooling): window sums times `mult` = round(2^MEAN_BITS / divisor)."""

    k: int
    s: int
    p: int
    mult: int


Attrs = (NoAttrs | LinearAttrs | ShiftAttrs | WindowAttrs | ReduceAttrs | AddAttrs | AddConstAttrs | ScaleAttrs
         | CatAttrs | MeanAttrs | SumPoolAttrs)

# Which attributes each op carries: a step of another type is a programming error.
OP_ATTRS: dict[str, type[Attrs]] = {
    "input": NoAttrs, "output": NoAttrs, "reshape": NoAttrs, "mul": NoAttrs,
    "linear": LinearAttrs, "trunc": ShiftAttrs, "relu": ShiftAttrs, "sigmoid": ShiftAttrs,
    "maxpool": WindowAttrs, "maxreduce": ReduceAttrs, "add": AddAttrs, "add_const": AddConstAttrs,
    "scale": ScaleAttrs, "cat": CatAttrs, "mean": MeanAttrs, "sumpool": SumPoolAttrs,
}

A = TypeVar("A", NoAttrs, LinearAttrs, ShiftAttrs, WindowAttrs, ReduceAttrs, AddAttrs, AddConstAttrs, ScaleAttrs,
            CatAttrs, MeanAttrs, SumPoolAttrs)


@dataclass(frozen=True)
class Step:
    """One secure step: `op` applied to the outputs of `inputs` (earlier step indices)."""

    index: int
    op: str
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    scale: int  # fractional bits of the output
    name: str
    attrs: Attrs = NoAttrs()

    def __post_init__(self) -> None:
        want = OP_ATTRS.get(self.op)
        if want is None or type(self.attrs) is not want:
            raise PlanError(f"step {self.name}: op {self.op!r} with {type(self.attrs).__name__}")

    def get(self, kind: type[A]) -> A:
        """The attributes, as the type the caller expects for this op."""
        if not isinstance(self.attrs, kind):
            raise PlanError(f"step {self.name} ({self.op}) has {type(self.attrs).__name__}, not {kind.__name__}")
        return self.attrs


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    input_shape: tuple[int, ...]
    output: int
    frac: int
    weights: dict[str, tuple[int, ...]]  # weight key -> shape (fixed-point shares are provisioned per key)

    def linear_layers(self) -> list[LinearAttrs]:
        """The attributes of every linear step, in plan order."""
        return [s.get(LinearAttrs) for s in self.steps if s.op == "linear"]

    def masked_keys(self) -> list[str]:
        """Weight keys that get a fixed mask B (weights proper; biases are only added), in plan order."""
        return list(dict.fromkeys(a.weight for a in self.linear_layers()))

    def bias_keys(self) -> set[str]:
        """Keys of the biases (kept at 2f fractional bits: they are added to products)."""
        return {a.bias_key for a in self.linear_layers() if a.bias}

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
        """Append a step; `attrs` are the fields of the op's attribute class (OP_ATTRS)."""
        idx = len(self.steps)
        self.steps.append(Step(idx, op, tuple(v.step for v in inputs), tuple(shape), scale, name,
                               OP_ATTRS[op](**attrs)))
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
            env[node.name] = _lower_module(low, node, env)
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


# --- modules -------------------------------------------------------------------------------------
# A rule lowers one call of a module type: (lowering, module, input value, output shape, name, node).

ModuleRule: TypeAlias = Callable[[_Lowering, Any, _Val, tuple[int, ...], str, torch.fx.Node], Any]


def _mod_conv(low: _Lowering, mod: nn.Conv2d, x: _Val, shape: tuple[int, ...], name: str, node: torch.fx.Node) -> _Val:
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise PlanError(f"layer {name}: only numeric zero padding is supported")
    return _linear(low, x, shape, name, "conv", mod.weight.shape, mod.bias is not None,
                   stride=_pair(mod.stride), padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                   groups=mod.groups)


def _mod_batchnorm(low: _Lowering, mod: nn.BatchNorm2d, x: _Val, shape: tuple[int, ...], name: str,
                   node: torch.fx.Node) -> _Val:
    pstep = low.steps[x.step]
    first = node.args[0]
    assert isinstance(first, torch.fx.Node)
    if (isinstance(pstep.attrs, LinearAttrs) and pstep.attrs.kind == "conv" and len(first.users) == 1
            and pstep.attrs.bn is None):
        # folded at weight extraction; same outputs
        low.steps[x.step] = replace(pstep, attrs=replace(pstep.attrs, bn=name, bias=True))
        low.weights[pstep.attrs.bias_key] = (mod.num_features,)
        return x
    c = mod.num_features
    return _linear(low, x, shape, name, "conv", (c, 1, 1, 1), True, stride=1, padding=0, dilation=1,
                   groups=c, affine_bn=True)


def _mod_fc(low: _Lowering, mod: nn.Linear, x: _Val, shape: tuple[int, ...], name: str, node: torch.fx.Node) -> _Val:
    return _linear(low, x, shape, name, "fc", mod.weight.shape, mod.bias is not None)


def _mod_maxpool(low: _Lowering, mod: nn.MaxPool2d, x: _Val, shape: tuple[int, ...], name: str,
                 node: torch.fx.Node) -> _Val:
    if _pair(mod.dilation) != 1 or mod.ceil_mode or mod.return_indices:
        raise PlanError(f"layer {name}: MaxPool2d with dilation, ceil_mode or indices is not supported")
    return _maxpool(low, x, shape, name, _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size),
                    _pair(mod.padding))


def _mod_avgpool(low: _Lowering, mod: nn.AvgPool2d, x: _Val, shape: tuple[int, ...], name: str,
                 node: torch.fx.Node) -> _Val:
    window = Window(_pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding))
    return _avgpool(low, x, shape, name, window, mod.ceil_mode, mod.count_include_pad, mod.divisor_override)


def _mod_adaptive(low: _Lowering, mod: nn.Module, x: _Val, shape: tuple[int, ...], name: str,
                  node: torch.fx.Node) -> _Val:
    if _pair(getattr(mod, "output_size", None)) != 1:
        raise PlanError(f"layer {name}: adaptive pools are supported with output size 1 only")
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return _mean(low, x, shape, name, (2, 3))
    return _maxreduce(low, x, shape, name, (2, 3))


MODULE_RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Conv2d: _mod_conv,
    nn.BatchNorm2d: _mod_batchnorm,
    nn.Linear: _mod_fc,
    nn.ReLU: lambda low, mod, x, shape, name, node: _relu(low, x, shape, name),
    nn.Sigmoid: lambda low, mod, x, shape, name, node: _sigmoid(low, x, shape, name),
    nn.MaxPool2d: _mod_maxpool,
    nn.AvgPool2d: _mod_avgpool,
    nn.AdaptiveAvgPool2d: _mod_adaptive,
    nn.AdaptiveMaxPool2d: _mod_adaptive,
    nn.Flatten: lambda low, mod, x, shape, name, node: low.add("reshape", [x], shape, x.scale, name),
    nn.Identity: lambda low, mod, x, shape, name, node: x,
    nn.Dropout: lambda low, mod, x, shape, name, node: x,
}


def _module_rule(mod: nn.Module) -> ModuleRule | None:
    """The rule of the module's type or of its nearest registered base class."""
    for cls in type(mod).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is not None:
            return rule
    return None


def _lower_module(low: _Lowering, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    mod = low.mods[str(node.target)]
    name = str(node.target)
    first = node.args[0]
    if not isinstance(first, torch.fx.Node):
        raise PlanError(f"layer {name}: its input must be a tensor")
    rule = _module_rule(mod)
    if rule is None:
        raise PlanError(f"layer {name} ({type(mod).__name__}) is not supported; supported: {SUPPORTED}")
    return rule(low, mod, env[first.name], _shape(node), name, node)


def _linear(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, kind: str, wshape: Any, bias: bool,
            **attrs: Any) -> _Val:
    x = low.at_frac(x, name)
    wkey, bkey = name + ".weight", name + ".bias"
    low.weights[wkey] = tuple(wshape)
    if bias:
        low.weights[bkey] = (int(wshape[0]),)
    return low.add("linear", [x], shape, x.scale + low.frac, name, kind=kind, weight=wkey, bias_key=bkey, bias=bias,
                   wshape=tuple(wshape), **attrs)


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


@dataclass(frozen=True)
class Window:
    """A square pooling window: kernel k, stride s, padding p."""

    k: int
    s: int
    p: int


def _avgpool(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, w: Window, ceil_mode: bool,
             count_include_pad: bool, divisor: int | None) -> _Val:
    if ceil_mode or (w.p and not count_include_pad):
        raise PlanError(f"layer {name}: AvgPool2d with ceil_mode or count_include_pad=False is not supported")
    x = low.at_frac(x, name)
    mult = round((1 << MEAN_BITS) / (divisor or w.k * w.k))
    return low.add("sumpool", [x], shape, x.scale + MEAN_BITS, name, k=w.k, s=w.s, p=w.p, mult=mult)


# --- functions and methods -------------------------------------------------------------------------
# A rule lowers one call: (lowering, positional args, keyword args, output shape, name); arguments that
# are graph values arrive as _Val, the rest as Python values.

FunctionRule: TypeAlias = Callable[[_Lowering, list[Any], dict[str, Any], tuple[int, ...], str], Any]


def _arg_or(args: list[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    """Argument `key` given by keyword or at position i, else `default`."""
    if key in kwargs:
        return kwargs[key]
    return args[i] if len(args) > i else default


def _fn_add(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _addsub(low, args[0], args[1], shape, name, 1)


def _fn_sub(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _addsub(low, args[0], args[1], shape, name, -1)


def _fn_mul(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    a, b = args[0], args[1]
    if isinstance(a, _Val) and isinstance(b, _Val):
        a, b = low.at_frac(a, name), low.at_frac(b, name)
        return low.add("mul", [a, b], shape, 2 * low.frac, name)
    v, c = (a, b) if isinstance(a, _Val) else (b, a)
    return _scale(low, v, float(c), shape, name)


def _fn_div(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    if not isinstance(args[0], _Val) or isinstance(args[1], _Val):
        raise PlanError(f"layer {name}: division is supported by a constant only")
    return _scale(low, args[0], 1.0 / float(args[1]), shape, name)


def _fn_neg(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _scale(low, args[0], -1.0, shape, name)


def _fn_relu(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _relu(low, args[0], shape, name)


def _fn_sigmoid(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _sigmoid(low, args[0], shape, name)


def _fn_cat(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    vals, lift, scale = low.align(list(args[0]), name)
    dim = int(_arg_or(args, kwargs, 1, "dim", 0))
    return low.add("cat", vals, shape, scale, name, dim=dim % len(shape), lift=tuple(lift))


def _fn_reshape(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return low.add("reshape", [args[0]], shape, args[0].scale, name)


def _reduced_dims(low: _Lowering, args: list[Any], kwargs: dict[str, Any]) -> tuple[int, ...]:
    dim = _arg_or(args, kwargs, 1, "dim")
    in_nd = len(low.steps[args[0].step].shape)
    return _dims(dim if dim is not None else tuple(range(in_nd)), in_nd)


def _fn_mean(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _mean(low, args[0], shape, name, _reduced_dims(low, args, kwargs))


def _fn_amax(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _maxreduce(low, args[0], shape, name, _reduced_dims(low, args, kwargs))


def _fn_adaptive(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str,
                 average: bool) -> _Val:
    if _pair(_arg_or(args, kwargs, 1, "output_size")) != 1:
        raise PlanError(f"layer {name}: adaptive pools are supported with output size 1 only")
    return (_mean if average else _maxreduce)(low, args[0], shape, name, (2, 3))


def _window(args: list[Any], kwargs: dict[str, Any]) -> Window:
    k = _pair(_arg_or(args, kwargs, 1, "kernel_size"))
    s = _arg_or(args, kwargs, 2, "stride")
    return Window(k, _pair(s) if s else k, _pair(_arg_or(args, kwargs, 3, "padding", 0)))


def _fn_max_pool2d(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
                   name: str) -> _Val:
    w = _window(args, kwargs)
    return _maxpool(low, args[0], shape, name, w.k, w.s, w.p)


def _fn_avg_pool2d(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
                   name: str) -> _Val:
    return _avgpool(low, args[0], shape, name, _window(args, kwargs), bool(kwargs.get("ceil_mode", False)),
                    bool(kwargs.get("count_include_pad", True)), kwargs.get("divisor_override"))


FUNCTION_RULES: dict[Any, FunctionRule] = {
    operator.add: _fn_add, operator.iadd: _fn_add, torch.add: _fn_add,
    operator.sub: _fn_sub, operator.isub: _fn_sub, torch.sub: _fn_sub,
    operator.mul: _fn_mul, operator.imul: _fn_mul, torch.mul: _fn_mul,
    operator.truediv: _fn_div,
    operator.neg: _fn_neg,
    torch.relu: _fn_relu, F.relu: _fn_relu,
    torch.sigmoid: _fn_sigmoid, F.sigmoid: _fn_sigmoid,
    torch.cat: _fn_cat, torch.concat: _fn_cat,
    torch.flatten: _fn_reshape,
    torch.mean: _fn_mean,
    torch.amax: _fn_amax,
    F.adaptive_avg_pool2d: lambda low, args, kwargs, shape, name: _fn_adaptive(low, args, kwargs, shape, name, True),
    F.adaptive_max_pool2d: lambda low, args, kwargs, shape, name: _fn_adaptive(low, args, kwargs, shape, name, False),
    F.max_pool2d: _fn_max_pool2d,
    F.avg_pool2d: _fn_avg_pool2d,
}

METHOD_RULES: dict[str, FunctionRule] = {
    "add": _fn_add, "add_": _fn_add,
    "sub": _fn_sub, "sub_": _fn_sub,
    "mul": _fn_mul, "mul_": _fn_mul,
    "div": _fn_div,
    "neg": _fn_neg,
    "relu": _fn_relu,
    "sigmoid": _fn_sigmoid,
    "flatten": _fn_reshape, "view": _fn_reshape, "reshape": _fn_reshape, "contiguous": _fn_reshape,
    "mean": _fn_mean,
    "amax": _fn_amax,
}


def _lower_function(low: _Lowering, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    t = node.target
    rule = METHOD_RULES.get(str(t)) if node.op == "call_method" else FUNCTION_RULES.get(t)
    if rule is None:
        what = t if isinstance(t, str) else getattr(t, "__name__", str(t))
        raise PlanError(f"layer {node.name} ({what}) is not supported; supported: {SUPPORTED}")
    args = [_arg(env, a) for a in node.args]
    kwargs = {k: _arg(env, v) for k, v in node.kwargs.items()}
    return rule(low, args, kwargs, _shape(node), node.name)


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
        a = s.get(LinearAttrs)
        if a.affine_bn:
            g, b = _bn_affine(mod)
            out[a.weight] = g.reshape(-1, 1, 1, 1)
            out[a.bias_key] = b
            continue
        w = mod.weight.detach().to(torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64)
        if mod.bias is not None:
            b = mod.bias.detach().to(torch.float64)
        if a.bn is not None:
            g, beta = _bn_affine(mods[a.bn])
            w = w * g.reshape(-1, *([1] * (w.dim() - 1)))
            b = b * g + beta
        out[a.weight] = w
        if a.bias:
            out[a.bias_key] = b
    return out


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(bn, nn.BatchNorm2d)
    var = bn.running_var.detach().to(torch.float64)  # type: ignore[union-attr]
    mean = bn.running_mean.detach().to(torch.float64)  # type: ignore[union-attr]
    g = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    scale = g / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale

