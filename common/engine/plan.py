"""The plan: a torch module lowered to an ordered list of secure steps with shapes and scales.

The plan depends on the architecture and the input size alone (never on weight values), so the
dealer and both servers derive the same plan and agree on the randomness each step consumes. It is
public under the threat model and travels as strictly validated JSON (`Plan.to_json`,
`Plan.from_json`): the model owner lowers the module once, and the dealer and the servers run what
the JSON says without ever executing the owner's Python.

Lowering traces the module with torch.fx (stack traces recorded, so a refusal names the user's source
line), propagates shapes with a zero input, folds BatchNorm into the preceding convolution or Linear
(a BatchNorm on its own becomes a per-channel affine layer), and tracks the fixed-point scale of
every value: products carry 2f fractional bits and are truncated where a consumer needs f. ReLU,
sigmoid and the other activations take 2f inputs directly (the truncation is fused into their first
opening), so a conv + ReLU costs two openings, not three. A linear layer whose input is a product
at 2f (a depthwise conv feeding a pointwise one) takes it untruncated, with its weights at f - 2
bits, when its 3f - 2 output fits the comparison range and can fuse into a comparison (comparisons
of at most 64 - 2f bits, 32 at f = 16): the truncation between the two layers and its round go away.

Shape idioms are resolved at trace time from the declared input shape: `x.size()`, `x.shape`,
`x.dim()` and arithmetic on them are Python values in the lowering's environment; getitem, view,
permute, expand, chunk and friends become local steps (`index`, `reshape`, `permute`, `expand`,
`repeat`) that never communicate. In-place calls (`relu_`, `+=`, `inplace=True`) rebind the value
they modify. Steps nothing depends on are dropped at the end.
"""

from __future__ import annotations

import builtins
import json
import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from secdfd.common.engine.protocols import piecewise
from secdfd.common.engine.randomness import MAX_BATCH
from secdfd.common.errors import PlanError

MEAN_BITS = 24  # fractional bits of the public 1/k multiplier of means and average pools
FOLD = "+"  # weight key of a layer with a BatchNorm folded in: "<layer>.weight+<batchnorm>"
CHAIN_BITS = 2  # the fractional bits a linear layer on a 2f input gives up: its weights carry f - 2

SUPPORTED = (
    "Conv2d / F.conv2d (any groups), Linear / F.linear, BatchNorm1d/2d (folded, or affine), ReLU, ReLU6, Hardtanh, "
    "clamp, LeakyReLU, Hardsigmoid, Hardswish, Sigmoid, Tanh, SiLU, GELU, two-class softmax, MaxPool2d, AvgPool2d, "
    "adaptive and global pools, mean/sum/amax/amin/max/min over dims, add, sub, mul, division by a constant, cat, "
    "stack, flatten, view/reshape, getitem (slices, None, ..., integers), permute/transpose, expand, repeat, chunk, "
    "split, unbind, Identity, Dropout (inference)"
)

# The nearest supported rewrite of what users meet most; keyed by the name in the refusal.
REWRITES: dict[str, str] = {
    "ELU": "use nn.SiLU (4 or 5 rounds, error 2e-4) or nn.LeakyReLU (exact, 4 rounds)",
    "CELU": "use nn.SiLU or nn.LeakyReLU",
    "SELU": "use nn.SiLU or nn.LeakyReLU",
    "Mish": "use nn.SiLU (x sigmoid(x)), the closest supported smooth activation",
    "Softplus": "use nn.SiLU or nn.ReLU",
    "PReLU": "use nn.LeakyReLU with a fixed slope (a learned slope would be a secret weight)",
    "LayerNorm": "use BatchNorm (an affine map at inference, folded into the conv or Linear before it)",
    "GroupNorm": "use BatchNorm2d (an affine map at inference, folded into the conv before it)",
    "InstanceNorm2d": "use BatchNorm2d (an affine map at inference)",
    "Upsample": "no up-sampling is supported; keep the resolution with stride-1 convolutions",
    "interpolate": "no up-sampling is supported; keep the resolution with stride-1 convolutions",
    "ConvTranspose2d": "no transposed convolutions; use a stride-1 Conv2d",
    "softmax": "softmax is supported over two classes (it is a sigmoid of the difference); for one logit use sigmoid",
    "log_softmax": "declare the output as two logits at export: the fake probability is sigmoid(l1 - l0)",
    "LogSoftmax": "declare the output as two logits at export: the fake probability is sigmoid(l1 - l0)",
    "argmax": "the secure engine computes maxima, not positions: use torch.max(x, dim).values",
    "indices": "the secure engine computes maxima, not positions: use torch.max(x, dim).values",
    "matmul": "products of two secret tensors are element-wise (mul) only; use nn.Linear or a 1x1 Conv2d",
    "bmm": "products of two secret tensors are element-wise (mul) only; use nn.Linear or a 1x1 Conv2d",
    "einsum": "use nn.Linear, a 1x1 Conv2d or an element-wise mul",
    "exp": "no exp on secret values; sigmoid, tanh, SiLU and GELU are supported",
    "log": "no log on secret values; declare logits at export instead of log-probabilities",
    "sqrt": "no sqrt on secret values; normalisations must be BatchNorm (fixed statistics)",
    "pow": "only x * x (mul) is supported",
    "div": "division is by a constant only",
    "truediv": "division is by a constant only",
    "get_attr": "parameters are supported as the weight and bias of F.conv2d / F.linear only; wrap other learned "
                "tensors in a layer (a per-channel scale is a BatchNorm or a depthwise 1x1 Conv2d)",
    "AdaptiveAvgPool2d": "use an output size that divides the input (or 1 for a global pool)",
    "ceil_mode": "pad explicitly (F.pad is not supported either): choose kernel, stride and padding that fit",
}


# --- typed step attributes: one frozen class per kind of step ---------------------------------


@dataclass(frozen=True)
class NoAttrs:
    """input, output, reshape, expand and mul need nothing beyond their shapes."""


@dataclass(frozen=True)
class LinearAttrs:
    """A conv or fc layer with secret weights `weight` (and bias `bias_key` when `bias`).

    `weight` and `bias_key` are the names of the module's parameters (`conv.weight`, or the
    parameters given to F.conv2d / F.linear). `bn` names a BatchNorm folded into this layer at weight
    extraction; `affine_bn` marks a lone BatchNorm lowered to a per-channel (depthwise 1x1) affine layer.
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
    """mean: the sum over `dims` times `mult` = round(2^MEAN_BITS / count) (a sum: mult 1, same scale)."""

    dims: tuple[int, ...]
    mult: int


@dataclass(frozen=True)
class SumPoolAttrs:
    """sumpool (average pooling): window sums times `mult` = round(2^MEAN_BITS / divisor); with
    `exclude_pad` the divisor of each output is the number of its window's elements inside the input."""

    k: int
    s: int
    p: int
    mult: int
    exclude_pad: bool = False


@dataclass(frozen=True)
class IndexAttrs:
    """index: the slice starts[d]:stops[d]:steps[d] of every input dim, then a reshape to the step's
    shape (integer indices are slices of length 1, None inserts a dim of 1)."""

    starts: tuple[int, ...]
    stops: tuple[int, ...]
    steps: tuple[int, ...]


@dataclass(frozen=True)
class PermuteAttrs:
    """permute: the input's dims in the order `dims` (transpose is a permutation)."""

    dims: tuple[int, ...]


@dataclass(frozen=True)
class RepeatAttrs:
    """repeat: torch's Tensor.repeat(reps) (a repeat that is a broadcast is an `expand`)."""

    reps: tuple[int, ...]


@dataclass(frozen=True)
class PiecewiseAttrs:
    """piecewise: slopes[i] x + offsets[i] between the breakpoints (`protocols.piecewise`); the output
    carries `piecewise.Pieces.slope_bits` more fractional bits than f."""

    shift: int
    breaks: tuple[float, ...]
    slopes: tuple[float, ...]
    offsets: tuple[float, ...]

    def pieces(self) -> piecewise.Pieces:
        return piecewise.Pieces(self.breaks, self.slopes, self.offsets)


@dataclass(frozen=True)
class SplineAttrs:
    """spline: the piecewise polynomial `fn` of `protocols.spline.SPLINES` (tanh, silu, gelu, ...)."""

    shift: int
    fn: str


Attrs = (NoAttrs | LinearAttrs | ShiftAttrs | WindowAttrs | ReduceAttrs | AddAttrs | AddConstAttrs | ScaleAttrs
         | CatAttrs | MeanAttrs | SumPoolAttrs | IndexAttrs | PermuteAttrs | RepeatAttrs | PiecewiseAttrs
         | SplineAttrs)

COMPARING = frozenset({"relu", "maxreduce", "maxpool", "piecewise", "spline", "sigmoid"})  # steps with comparisons

# Which attributes each op carries: a step of another type is a programming error.
OP_ATTRS: dict[str, type[Attrs]] = {
    "input": NoAttrs, "output": NoAttrs, "reshape": NoAttrs, "mul": NoAttrs, "expand": NoAttrs,
    "linear": LinearAttrs, "trunc": ShiftAttrs, "relu": ShiftAttrs, "sigmoid": ShiftAttrs,
    "maxpool": WindowAttrs, "maxreduce": ReduceAttrs, "add": AddAttrs, "add_const": AddConstAttrs,
    "scale": ScaleAttrs, "cat": CatAttrs, "mean": MeanAttrs, "sumpool": SumPoolAttrs,
    "index": IndexAttrs, "permute": PermuteAttrs, "repeat": RepeatAttrs,
    "piecewise": PiecewiseAttrs, "spline": SplineAttrs,
}

A = TypeVar("A", NoAttrs, LinearAttrs, ShiftAttrs, WindowAttrs, ReduceAttrs, AddAttrs, AddConstAttrs, ScaleAttrs,
            CatAttrs, MeanAttrs, SumPoolAttrs, IndexAttrs, PermuteAttrs, RepeatAttrs, PiecewiseAttrs, SplineAttrs)


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
    cmp_bits: int = 40  # the comparison range the plan was lowered for (it bounds the fused truncations)

    def linear_layers(self) -> list[LinearAttrs]:
        """The attributes of every linear step, in plan order."""
        return [s.get(LinearAttrs) for s in self.steps if s.op == "linear"]

    def masked_keys(self) -> list[str]:
        """Weight keys that get a fixed mask B (weights proper; biases are only added), in plan order."""
        return list(dict.fromkeys(a.weight for a in self.linear_layers()))

    def bias_keys(self) -> set[str]:
        """Keys of the biases (kept at their layer's output scale: they are added to products)."""
        return {a.bias_key for a in self.linear_layers() if a.bias}

    def weight_fracs(self) -> dict[str, int]:
        """The fractional bits of every weight key: a weight's are its layer's output scale less its
        input's (f, or f - CHAIN_BITS for a layer on a 2f input), a bias's its layer's output scale. A key
        whose layers disagree raises PlanError."""
        fracs: dict[str, int] = {}
        for s in self.steps:
            if s.op != "linear":
                continue
            a = s.get(LinearAttrs)
            keys = [(a.weight, s.scale - self.steps[s.inputs[0]].scale)] + ([(a.bias_key, s.scale)] if a.bias else [])
            for key, frac in keys:
                if fracs.setdefault(key, frac) != frac:
                    raise PlanError(f"weight {key} is used at {fracs[key]} and at {frac} fractional bits")
        return fracs

    def batch_refusal(self) -> str | None:
        """Why this plan cannot evaluate several inputs in one pass (None when it can).

        A plan lowered at batch 1 runs N inputs at once when its leading dimension is the batch all
        the way through: every step's shape starts with 1, and no step reduces, concatenates,
        permutes, repeats, expands or slices along it. Widening it then changes only shapes; each
        input's values go through exactly the steps they would alone.
        """
        if not self.input_shape or self.input_shape[0] != 1:
            return f"its input shape {list(self.input_shape)} has no leading batch dimension of 1"
        for s in self.steps:
            why = _batch_refusal(self, s)
            if why is not None:
                return f"step {s.name} ({s.op}) {why}"
        return None

    def batched(self, n: int) -> Plan:
        """The same plan for `n` inputs at once (n = 1: this plan). PlanError if it cannot run batched
        (`batch_refusal`) or n is outside 1..MAX_BATCH."""
        if not 1 <= n <= MAX_BATCH:
            raise PlanError(f"a batch holds 1 to {MAX_BATCH} inputs, not {n}")
        if n == 1:
            return self
        why = self.batch_refusal()
        if why is not None:
            raise PlanError(f"this model cannot run several inputs at once: {why}")
        steps = []
        for s in self.steps:
            attrs = s.attrs
            if isinstance(attrs, IndexAttrs):
                attrs = replace(attrs, stops=(n, *attrs.stops[1:]))
            steps.append(replace(s, shape=(n, *s.shape[1:]), attrs=attrs))
        return replace(self, steps=tuple(steps), input_shape=(n, *self.input_shape[1:]))

    def describe(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.steps:
            counts[s.op] = counts.get(s.op, 0) + 1
        return counts

    def to_obj(self) -> dict[str, Any]:
        """The plan as plain JSON values (what `to_json` writes)."""
        from secdfd.common.engine.plancodec import PLAN_FORMAT, PLAN_VERSION

        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "frac": self.frac, "cmp_bits": self.cmp_bits,
            "input_shape": list(self.input_shape), "output": self.output,
            "weights": [[k, list(v)] for k, v in self.weights.items()],
            "steps": [{"op": s.op, "inputs": list(s.inputs), "shape": list(s.shape), "scale": s.scale,
                       "name": s.name, "attrs": {f.name: _plain(getattr(s.attrs, f.name)) for f in fields(s.attrs)}}
                      for s in self.steps],
        }

    def to_json(self) -> str:
        """Canonical JSON (compact, key order fixed): the same plan always gives the same text."""
        return json.dumps(self.to_obj(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, data: str | bytes | dict[str, Any]) -> Plan:
        """A plan from `to_json`'s text (or its parsed object), every field checked: op names from
        OP_ATTRS only, attribute types, shapes and sizes within bounds, inputs earlier than their step,
        each step's shape and scale consistent with its inputs. Raises PlanError on anything else."""
        from secdfd.common.engine.plancodec import decode_plan

        return decode_plan(data)


def _batch_refusal(plan: Plan, s: Step) -> str | None:
    """Why step `s` would mix the inputs of a batch (None: it treats each on its own)."""
    if not s.shape or s.shape[0] != 1:
        return f"has shape {list(s.shape)}: the batch dimension does not stay in front"
    ins = [plan.steps[i].shape for i in s.inputs]
    rank = len(ins[0]) if ins else len(s.shape)
    a = s.attrs
    checks = (
        (isinstance(a, ReduceAttrs | MeanAttrs) and any(d % rank == 0 for d in a.dims),
         "reduces over the batch dimension"),
        (isinstance(a, CatAttrs) and a.dim % len(s.shape) == 0, "concatenates along the batch dimension"),
        (isinstance(a, PermuteAttrs) and a.dims[0] % len(a.dims) != 0, "moves the batch dimension"),
        (isinstance(a, RepeatAttrs) and (len(a.reps) != rank or a.reps[0] != 1),
         "repeats along (or in front of) the batch dimension"),
        (isinstance(a, IndexAttrs) and (a.starts[0], a.steps[0]) != (0, 1), "slices the batch dimension"),
        (s.op == "expand" and rank != len(s.shape), "adds dimensions in front of the batch dimension"),
        (s.op in ("mul", "add") and any(len(shape) != len(s.shape) for shape in ins),
         "broadcasts an operand of another rank over the batch dimension"),
    )
    return next((why for bad, why in checks if bad), None)


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# --- lowering ------------------------------------------------------------------------------------


@dataclass
class _Val:
    step: int
    scale: int


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer of the module (a get_attr node): usable as F.conv2d / F.linear weights."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _MaxOut:
    """torch.max / torch.min over a dim: (values, indices); only the values are computed."""

    values: _Val

    def get(self, i: Any) -> _Val:
        if i in (0, "values"):
            return self.values
        raise PlanError(f"the indices of torch.max / torch.min are not computed; {REWRITES['indices']}")


class _Lowering:
    def __init__(self, module: nn.Module, frac: int, cmp_bits: int, chain: bool = True) -> None:
        self.module = module
        self.mods = dict(module.named_modules())
        self.frac = frac
        self.fuse_limit = 64 - cmp_bits - 1  # largest truncation a comparison can fuse
        # a linear layer may take a 2f input (weights at f - CHAIN_BITS) when its output's truncation fuses
        self.chain = chain and chain_fuses(frac, cmp_bits)
        self.steps: list[Step] = []
        self.weights: dict[str, tuple[int, ...]] = {}
        self.weight_input: dict[str, int] = {}  # weight key -> the input scale of its layers
        self._trunc: dict[int, _Val] = {}
        self._remask: dict[int, _Val] = {}

    def add(self, op: str, inputs: list[_Val], shape: Any, scale: int, name: str, **attrs: Any) -> _Val:
        """Append a step; `attrs` are the fields of the op's attribute class (OP_ATTRS)."""
        idx = len(self.steps)
        self.steps.append(Step(idx, op, tuple(v.step for v in inputs), tuple(shape), scale, name,
                               OP_ATTRS[op](**attrs)))
        return _Val(idx, scale)

    def shape_of(self, v: _Val) -> tuple[int, ...]:
        return self.steps[v.step].shape

    def at_frac(self, v: _Val, name: str) -> _Val:
        """v at scale f, truncating once per value however many consumers need it."""
        if v.scale == self.frac:
            return v
        if v.step not in self._trunc:
            shape = self.steps[v.step].shape
            self._trunc[v.step] = self.add("trunc", [v], shape, self.frac, name + ".trunc", shift=v.scale - self.frac)
        return self._trunc[v.step]

    def truncated(self, v: _Val) -> bool:
        """Whether v is a truncation's result (a truncation step or a sigmoid, whose output ends in one)."""
        return self.steps[v.step].op in ("trunc", "sigmoid")

    def remasked(self, v: _Val, other: _Val, name: str) -> _Val:
        """A product's operand v, remasked (a truncation by 0: one opening under a fresh mask, 8 bytes
        per element) when the other operand is a truncation's result and v is not. The product of the
        two is then local (`arith.kept_mul`), and the remask's round passes as soon as v exists, while
        the other operand is still being computed (an Xception entry block's max-pooled map, gated by
        channel attention: one round fewer, the same bytes as a product that opens v)."""
        if self.truncated(v) or not self.truncated(other):
            return v
        if v.step not in self._remask:  # one opening however many products take it
            self._remask[v.step] = self.add("trunc", [v], self.shape_of(v), v.scale, name + ".remask", shift=0)
        return self._remask[v.step]

    def fusable(self, v: _Val, name: str) -> _Val:
        """For comparisons: keep a 2f input (truncation fused) when the comparison allows it."""
        return v if v.scale - self.frac <= self.fuse_limit else self.at_frac(v, name)

    def align(self, vals: list[_Val], name: str) -> tuple[list[_Val], list[int], int]:
        """Values to combine (`cat`, `stack`, `+`) at one scale: each lifted to the largest (exact local
        shifts), except a mean or average pool beside a value at f that a comparison computed after the
        pool's input: that pool is truncated to f on its own. It is ready with its input, the comparison
        only rounds later, so the truncation's round passes while the comparison runs instead of after
        it (CBAM's spatial attention: the channel mean is truncated while the channel max is computed,
        and the 7 x 7 conv follows the max one round sooner). Beside an earlier value, or beside a
        product, lifting keeps the one truncation after the sum that a comparison can fuse."""
        late = [v for v in vals if v.scale == self.frac]
        out = []
        for v in vals:
            src = self._pool_input(v) if late and v.scale > self.frac else None
            if src is not None and any(self._compared_after(w, src) for w in late):
                v = self.at_frac(v, name)
            out.append(v)
        scale = max(v.scale for v in out)
        return out, [scale - v.scale for v in out], scale

    def _pool_input(self, v: _Val) -> int | None:
        """The input step of v when v is a mean or an average pool (through local reshapes and
        indexing), else None."""
        step = self.steps[v.step]
        while step.op in ("reshape", "permute", "index") and len(step.inputs) == 1:
            step = self.steps[step.inputs[0]]
        return step.inputs[0] if step.op in ("mean", "sumpool") else None

    def _compared_after(self, v: _Val, after: int) -> bool:
        """Whether a comparison step later than step `after` leads to v."""
        seen: set[int] = set()
        todo = [v.step]
        while todo:
            i = todo.pop()
            if i <= after or i in seen:
                continue
            seen.add(i)
            if self.steps[i].op in COMPARING:
                return True
            todo.extend(self.steps[i].inputs)
        return False

    def reshape(self, v: _Val, shape: tuple[int, ...], name: str) -> _Val:
        """v viewed as `shape` (no step when it already has it)."""
        return v if self.shape_of(v) == tuple(shape) else self.add("reshape", [v], shape, v.scale, name)


def _shape(node: torch.fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, tuple | list) and meta and hasattr(meta[0], "shape"):
        meta = meta[0]  # torch.max(x, dim): the values
    if meta is None or not hasattr(meta, "shape"):
        raise PlanError(f"layer {node.name}: output is not a tensor; supported: {SUPPORTED}")
    return tuple(meta.shape)


def _pair2(v: Any) -> tuple[int, int]:
    if isinstance(v, tuple | list):
        if len(v) != 2:
            raise PlanError(f"a window or stride of {len(v)} numbers is not a 2-d one")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _pair(v: Any) -> int:
    a, b = _pair2(v)
    if a != b:
        raise PlanError(f"non-square window, stride or padding {v} is not supported (except a global pool)")
    return a


def _dims(d: Any, ndim: int) -> tuple[int, ...]:
    ds = (d,) if isinstance(d, int) else tuple(d)
    return tuple(sorted(x % ndim for x in ds))


class _Tracer(torch.fx.Tracer):
    """symbolic_trace's tracer, with the user's stack trace recorded on every node, and Python control
    flow on shapes (`if x.dim() == 4`, `for s in x.shape`) decided at trace time: the value is computed
    from the declared input shape. Control flow on tensor values is still refused."""

    def __init__(self, input_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.input_shape = input_shape

    def to_bool(self, obj: torch.fx.Proxy) -> bool:
        return bool(self._value(obj.node))

    def iter(self, obj: torch.fx.Proxy) -> Any:
        return iter(self._value(obj.node))

    def _value(self, node: torch.fx.Node) -> Any:
        if not _shape_only(node):
            raise torch.fx.proxy.TraceError(
                f"{node.name} depends on tensor values, and control flow can only depend on shapes "
                "(x.size(), x.shape, x.dim()): the secure plan is the same for every input")
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in self.graph.nodes:
            env[n] = graph.node_copy(n, lambda a: env[a])
            if n is node:
                break
        graph.output(env[node])
        from torch.fx._symbolic_trace import _maybe_revert_all_patches

        with torch.no_grad(), _maybe_revert_all_patches():  # run the prefix as plain torch, not traced
            return torch.fx.GraphModule(self.root, graph)(torch.zeros(self.input_shape))


_SHAPE_READS = {"size", "dim", "ndimension", "numel", "nelement"}


def _shape_only(node: torch.fx.Node) -> bool:
    """Does `node` depend on tensors through their shapes only?"""
    if node.op == "call_method" and node.target in _SHAPE_READS:
        return True
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in ("shape", "ndim"):
        return True
    if node.op in ("placeholder", "get_attr", "call_module"):
        return False
    return all(_shape_only(a) for a in node.all_input_nodes)


_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<fn>\S+)\n\s*(?P<code>[^\n]*)')


def where(node: torch.fx.Node) -> str:
    """The user's source line that made `node`: 'file.py:12 (`x = self.act(x)`)', or ''."""
    frames = [m for m in _FRAME.finditer(node.stack_trace or "")
              if not str(Path(m["file"]).resolve()).startswith(_TORCH_DIR)]
    if not frames:
        return ""
    m = frames[-1]
    return f"{m['file']}:{m['line']} (`{m['code'].strip()}`)"


def _refuse(node: torch.fx.Node, what: str, key: str | None = None, detail: str = "") -> PlanError:
    at = where(node)
    hint = REWRITES.get(key or "", "")
    parts = [f"{what} is not supported" + (f" ({detail})" if detail else "")]
    if at:
        parts.append(f"at {at}")
    msg = " ".join(parts)
    msg += f"; {hint}" if hint else f"; supported: {SUPPORTED}"
    return PlanError(msg)


def chain_fuses(frac: int, cmp_bits: int) -> bool:
    """Whether a linear layer on a 2f input (output at 3f - CHAIN_BITS) can hand its output to a
    comparison: a value inside the comparison range, |x| < 2^(cmp_bits - f), still truncates exactly
    at that scale (below 2^62 in the ring), the shift of 2f - CHAIN_BITS bits fits the comparison's
    headroom (a fused truncation), and the bias encodes (at most 61 fractional bits)."""
    out = 3 * frac - CHAIN_BITS
    return 62 - out >= cmp_bits - frac and out - frac <= 64 - cmp_bits - 1 and out <= 61


def build_plan(module: nn.Module, input_shape: tuple[int, ...] | list[int], frac: int = 16, cmp_bits: int = 40,
               chain: bool = True) -> Plan:
    """Lower `module` (eval mode) for inputs of `input_shape` to a Plan. Raises PlanError naming any
    unsupported layer with the user's source line and the nearest supported rewrite.

    `chain=False` truncates every linear layer's input to f (all weights at f bits), as plans did
    before chained layers: for weight shares split under such a plan."""
    input_shape = tuple(int(s) for s in input_shape)
    was_training = module.training
    module.eval()
    try:
        tracer = _Tracer(input_shape)
        graph = tracer.trace(module)
        gm = torch.fx.GraphModule(tracer.root, graph, type(module).__name__)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise PlanError(f"cannot trace the model with torch.fx: {e}") from e
    finally:
        module.train(was_training)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise PlanError("the model must take exactly one tensor input")
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(input_shape))
    except Exception as e:  # noqa: BLE001 - the model's own error on this input shape
        raise PlanError(f"the model does not run on an input of shape {list(input_shape)}: {e}") from e
    low = _Lowering(gm, frac, cmp_bits, chain)
    env: dict[str, Any] = {}
    out_val: _Val | None = None
    live = _live_nodes(gm)
    for node in gm.graph.nodes:
        if node not in live:
            continue
        if node.op == "placeholder":
            env[node.name] = low.add("input", [], input_shape, frac, "input")
        elif node.op == "output":
            arg = _arg(env, node.args[0])
            if not isinstance(arg, _Val):
                raise PlanError("the model must return a single tensor")
            out_val = low.at_frac(arg, "output")
            out_val = low.add("output", [out_val], low.steps[out_val.step].shape, frac, "output")
        else:
            env[node.name] = _lower_node(low, node, env)
    assert out_val is not None
    steps, output, weights = _prune(low.steps, out_val.step, low.weights)
    return Plan(steps, input_shape, output, frac, weights, cmp_bits)


def _lower_node(low: _Lowering, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    try:
        if node.op == "get_attr":
            return _get_attr(low, node)
        if node.op == "call_module":
            out = _lower_module(low, node, env)
        elif node.op in ("call_function", "call_method"):
            out = _lower_function(low, node, env)
        else:
            raise _refuse(node, f"layer {node.name} ({node.op} {node.target})")
    except PlanError as e:
        at = where(node)
        if at and at not in str(e):
            raise PlanError(f"{e} (at {at})") from None
        raise
    if _inplace(node, low.mods) and isinstance(out, _Val):
        _rebind(node, env, out)
    return out


def _live_nodes(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """Nodes the output depends on, and in-place calls with what they need (they change a value later
    nodes read). A result nobody reads (`v, _ = torch.max(x, 1)`) is never lowered."""
    mods = dict(gm.named_modules())
    stack = [n for n in gm.graph.nodes if n.op in ("output", "placeholder") or _inplace(n, mods)]
    live: set[torch.fx.Node] = set()
    while stack:
        n = stack.pop()
        if n not in live:
            live.add(n)
            stack.extend(n.all_input_nodes)
    return live


_INPLACE_FUNCTIONS: dict[Any, int | None] = {
    operator.iadd: None, operator.isub: None, operator.imul: None, operator.itruediv: None,
    F.relu_: None, torch.relu_: None, F.hardtanh_: None, F.leaky_relu_: None, torch.sigmoid_: None,
    torch.tanh_: None, torch.clamp_: None,
    # functions with an `inplace` argument, and its position
    F.relu: 1, F.relu6: 1, F.hardtanh: 3, F.leaky_relu: 2, F.hardsigmoid: 1, F.hardswish: 1, F.silu: 1,
    F.dropout: 3,
}


def _inplace(node: torch.fx.Node, mods: dict[str, nn.Module]) -> bool:
    """Does `node` modify its first argument in place?"""
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"
    if node.op == "call_module":
        return getattr(mods.get(str(node.target)), "inplace", False) is True
    if node.op != "call_function" or node.target not in _INPLACE_FUNCTIONS:
        return False
    pos = _INPLACE_FUNCTIONS[node.target]
    if pos is None:
        return True
    flag = node.kwargs.get("inplace", node.args[pos] if len(node.args) > pos else False)
    return flag is True


_VIEWS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "transpose", "permute", "expand", "expand_as",
          "narrow", "t", "chunk", "split", "unbind", "view_as", "reshape_as", "getitem"}


def _rebind(node: torch.fx.Node, env: dict[str, Any], out: _Val) -> None:
    """An in-place call changed its first argument: later readers of that argument see `out`."""
    target = node.args[0] if node.args else None
    if not isinstance(target, torch.fx.Node):
        return
    base = target.args[0] if target.args else None
    kind = str(getattr(target.target, "__name__", target.target))
    if isinstance(base, torch.fx.Node) and kind in _VIEWS and _later_users(base, node):
        raise _refuse(node, f"an in-place update of a view ({kind} of {base.name})",
                      detail="write it out of place, e.g. y = F.relu(x) instead of x.relu_()")
    env[target.name] = out


def _later_users(base: torch.fx.Node, after: torch.fx.Node) -> list[torch.fx.Node]:
    order = {n: i for i, n in enumerate(after.graph.nodes)}
    return [u for u in base.users if order[u] > order[after]]


def _prune(steps: list[Step], output: int,
           weights: dict[str, tuple[int, ...]]) -> tuple[tuple[Step, ...], int, dict[str, tuple[int, ...]]]:
    """Drop the steps the output does not depend on (the input step stays) and renumber the rest."""
    keep: set[int] = set()
    stack = [output, 0]
    while stack:
        i = stack.pop()
        if i not in keep:
            keep.add(i)
            stack.extend(steps[i].inputs)
    remap = {old: new for new, old in enumerate(sorted(keep))}
    out = tuple(replace(s, index=remap[s.index], inputs=tuple(remap[i] for i in s.inputs))
                for s in steps if s.index in keep)
    used: set[str] = set()
    for s in out:
        if s.op == "linear":
            a = s.get(LinearAttrs)
            used.add(a.weight)
            if a.bias:
                used.add(a.bias_key)
    return out, remap[output], {k: v for k, v in weights.items() if k in used}


def _arg(env: dict[str, Any], a: Any) -> Any:
    if isinstance(a, list | tuple):
        return type(a)(_arg(env, x) for x in a)
    if isinstance(a, slice):
        return slice(_arg(env, a.start), _arg(env, a.stop), _arg(env, a.step))
    return env[a.name] if isinstance(a, torch.fx.Node) else a


def _get_attr(low: _Lowering, node: torch.fx.Node) -> _Param:
    target = str(node.target)
    t = _tensor_at(low.module, target)
    if t is None:
        raise _refuse(node, f"the attribute {target}", "get_attr", "not a parameter or buffer")
    return _Param(target, tuple(t.shape))


def _tensorish(v: Any) -> bool:
    if isinstance(v, _Val | _Param | _MaxOut):
        return True
    if isinstance(v, list | tuple):
        return any(_tensorish(x) for x in v)
    if isinstance(v, dict):
        return any(_tensorish(x) for x in v.values())
    return False


# Python values (sizes, ints) flow through these at trace time; nothing else runs on them.
_PY_MODULES = ("_operator", "operator", "builtins", "math")
_PY_TYPES = (torch.Size, tuple, list, int, float, bool, str)


def _python_value(node: torch.fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """A node on Python values only (`b * c`, `size[2:]`, `len(shape)`): evaluated now."""
    if node.op == "call_method":
        if not args or not isinstance(args[0], _PY_TYPES):
            raise _refuse(node, f"the method {node.target} on {type(args[0]).__name__ if args else 'nothing'}")
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    fn = node.target
    if getattr(fn, "__module__", None) in _PY_MODULES or fn in (builtins.getattr, len, int, float, min, max, abs):
        assert callable(fn)
        return fn(*args, **kwargs)
    name = getattr(fn, "__name__", str(fn))
    raise _refuse(node, f"{name} on Python values (a tensor made inside the model)", name,
                  "constants must be plain numbers")


# --- modules -------------------------------------------------------------------------------------
# A rule lowers one call of a module type: (lowering, module, input value, output shape, name, node).

ModuleRule: TypeAlias = Callable[[_Lowering, Any, _Val, tuple[int, ...], str, torch.fx.Node], Any]


def _mod_conv(low: _Lowering, mod: nn.Conv2d, x: _Val, shape: tuple[int, ...], name: str, node: torch.fx.Node) -> _Val:
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        raise PlanError(f"layer {name}: only numeric zero padding is supported")
    return _linear(low, x, shape, name, "conv", mod.weight.shape, mod.bias is not None,
                   stride=_pair(mod.stride), padding=_pair(mod.padding), dilation=_pair(mod.dilation),
                   groups=mod.groups)


def _mod_batchnorm(low: _Lowering, mod: nn.modules.batchnorm._BatchNorm, x: _Val, shape: tuple[int, ...], name: str,
                   node: torch.fx.Node) -> _Val:
    if mod.running_mean is None or mod.running_var is None:
        raise PlanError(f"layer {name}: a BatchNorm without running statistics normalises by the batch; "
                        "train it with track_running_stats=True")
    pstep = low.steps[x.step]
    first = node.args[0]
    assert isinstance(first, torch.fx.Node)
    kind = "conv" if len(shape) == 4 else "fc" if len(shape) == 2 else ""
    if (isinstance(pstep.attrs, LinearAttrs) and pstep.attrs.kind == kind and len(first.users) == 1
            and pstep.attrs.bn is None and not pstep.attrs.affine_bn):
        # folded at weight extraction; same outputs. The folded weights are their own keys (another
        # call of the same layer without this BatchNorm keeps the plain ones).
        a = pstep.attrs
        wkey, bkey = f"{a.weight}{FOLD}{name}", f"{a.bias_key}{FOLD}{name}"
        low.steps[x.step] = replace(pstep, attrs=replace(a, bn=name, bias=True, weight=wkey, bias_key=bkey))
        low.weights[wkey] = a.wshape
        low.weights[bkey] = (mod.num_features,)
        low.weight_input[wkey] = low.steps[pstep.inputs[0]].scale
        return x
    c = mod.num_features
    if len(shape) not in (2, 3, 4) or shape[1] != c:
        raise PlanError(f"layer {name}: BatchNorm over {c} channels on an input of shape {list(shape)}")
    as4 = tuple(shape) + (1,) * (4 - len(shape))
    x4 = low.reshape(x, as4, name + ".as2d")
    y = _linear(low, x4, as4, name, "conv", (c, 1, 1, 1), True, stride=1, padding=0, dilation=1, groups=c,
                affine_bn=True)
    return low.reshape(y, shape, name + ".back")


def _mod_fc(low: _Lowering, mod: nn.Linear, x: _Val, shape: tuple[int, ...], name: str, node: torch.fx.Node) -> _Val:
    return _linear(low, x, shape, name, "fc", mod.weight.shape, mod.bias is not None)


def _mod_maxpool(low: _Lowering, mod: nn.MaxPool2d, x: _Val, shape: tuple[int, ...], name: str,
                 node: torch.fx.Node) -> _Val:
    if _pair(mod.dilation) != 1 or mod.ceil_mode or mod.return_indices:
        raise PlanError(f"layer {name}: MaxPool2d with dilation, ceil_mode or indices is not supported")
    return _maxpool(low, x, shape, name, mod.kernel_size, mod.stride or mod.kernel_size, mod.padding)


def _mod_avgpool(low: _Lowering, mod: nn.AvgPool2d, x: _Val, shape: tuple[int, ...], name: str,
                 node: torch.fx.Node) -> _Val:
    return _avgpool(low, x, shape, name, (mod.kernel_size, mod.stride or mod.kernel_size, mod.padding),
                    mod.ceil_mode, mod.count_include_pad, mod.divisor_override)


def _mod_adaptive(low: _Lowering, mod: nn.Module, x: _Val, shape: tuple[int, ...], name: str,
                  node: torch.fx.Node) -> _Val:
    return _adaptive(low, x, shape, name, getattr(mod, "output_size", None),
                     isinstance(mod, nn.AdaptiveAvgPool2d))


def _act(fn: Callable[..., _Val]) -> ModuleRule:
    """A module rule for an activation whose lowering needs only the module's settings."""
    return lambda low, mod, x, shape, name, node: fn(low, x, shape, name, mod)


MODULE_RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Conv2d: _mod_conv,
    nn.modules.batchnorm._BatchNorm: _mod_batchnorm,
    nn.Linear: _mod_fc,
    nn.ReLU: _act(lambda low, x, shape, name, mod: _relu(low, x, shape, name)),
    nn.Hardtanh: _act(lambda low, x, shape, name, mod: _clamp(low, x, shape, name, mod.min_val, mod.max_val)),
    nn.LeakyReLU: _act(lambda low, x, shape, name, mod: _leaky(low, x, shape, name, mod.negative_slope)),
    nn.Hardsigmoid: _act(lambda low, x, shape, name, mod: _pieces(low, x, shape, name, piecewise.hardsigmoid())),
    nn.Hardswish: _act(lambda low, x, shape, name, mod: _spline(low, x, shape, name, "hardswish")),
    nn.Sigmoid: _act(lambda low, x, shape, name, mod: _sigmoid(low, x, shape, name)),
    nn.Tanh: _act(lambda low, x, shape, name, mod: _spline(low, x, shape, name, "tanh")),
    nn.SiLU: _act(lambda low, x, shape, name, mod: _spline(low, x, shape, name, "silu")),
    nn.GELU: _act(lambda low, x, shape, name, mod: _gelu(low, x, shape, name, mod.approximate)),
    nn.Softmax: _act(lambda low, x, shape, name, mod: _softmax2(low, x, shape, name, mod.dim)),
    nn.MaxPool2d: _mod_maxpool,
    nn.AvgPool2d: _mod_avgpool,
    nn.AdaptiveAvgPool2d: _mod_adaptive,
    nn.AdaptiveMaxPool2d: _mod_adaptive,
    nn.Flatten: lambda low, mod, x, shape, name, node: low.reshape(x, shape, name),
    nn.Unflatten: lambda low, mod, x, shape, name, node: low.reshape(x, shape, name),
    nn.Identity: lambda low, mod, x, shape, name, node: x,
    nn.modules.dropout._DropoutNd: lambda low, mod, x, shape, name, node: x,
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
    first = node.args[0] if node.args else None
    x = env.get(first.name) if isinstance(first, torch.fx.Node) else None
    if not isinstance(x, _Val):
        raise _refuse(node, f"layer {name} ({type(mod).__name__}) on something other than one tensor")
    rule = _module_rule(mod)
    if rule is None:
        kind = type(mod).__name__
        raise _refuse(node, f"layer {name} ({kind})", kind)
    return rule(low, mod, x, _shape(node), name, node)


def _linear(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, kind: str, wshape: Any, bias: bool, *,
            keys: tuple[str, str | None] | None = None, **attrs: Any) -> _Val:
    """A conv or fc step; `keys` names the weight and bias parameters (default: the module's).

    The input is at f, or at 2f when chaining is on (then the weights carry f - CHAIN_BITS bits). A weight
    used by several layers takes every input at the scale of its first use: one encoding per key."""
    wkey, bkey = keys or (name + ".weight", None)
    bkey = bkey or name + ".bias"
    chained = 2 * low.frac if low.chain and x.scale == 2 * low.frac else low.frac
    want = low.weight_input.setdefault(wkey, chained)
    if x.scale != want:
        x = low.at_frac(x, name)
    if x.scale != want:  # the key's first layer took a 2f input: lift this f input to 2f, exactly
        x = low.add("add", [x], low.shape_of(x), want, name + ".lift", lift=(want - x.scale,), signs=(1,))
    low.weights[wkey] = tuple(wshape)
    if bias:
        low.weights[bkey] = (int(wshape[0]),)
    wfrac = low.frac - CHAIN_BITS if want == 2 * low.frac else low.frac
    return low.add("linear", [x], shape, x.scale + wfrac, name, kind=kind, weight=wkey, bias_key=bkey, bias=bias,
                   wshape=tuple(wshape), **attrs)


def _relu(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str) -> _Val:
    x = low.fusable(x, name)
    return low.add("relu", [x], shape, low.frac, name, shift=x.scale - low.frac)


def _sigmoid(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str) -> _Val:
    x = low.fusable(x, name)
    return low.add("sigmoid", [x], shape, low.frac, name, shift=x.scale - low.frac)


def _spline(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, fn: str) -> _Val:
    x = low.fusable(x, name)
    return low.add("spline", [x], shape, low.frac, name, shift=x.scale - low.frac, fn=fn)


def _pieces(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, p: piecewise.Pieces) -> _Val:
    x = low.fusable(x, name)
    return low.add("piecewise", [x], shape, low.frac + p.slope_bits, name, shift=x.scale - low.frac,
                   breaks=tuple(map(float, p.breaks)), slopes=tuple(map(float, p.slopes)),
                   offsets=tuple(map(float, p.offsets)))


def _clamp(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, lo: float | None, hi: float | None) -> _Val:
    """clamp / hardtanh / ReLU6: a ReLU when it is one, else exact pieces."""
    if lo is None and hi is None:
        return x
    if hi is None:
        assert lo is not None
        return _relu(low, x, shape, name) if lo == 0 else _pieces(low, x, shape, name, piecewise.clamp_min(lo))
    if lo is None:
        return _pieces(low, x, shape, name, piecewise.clamp_max(hi))
    if not lo < hi:
        raise PlanError(f"layer {name}: clamp to [{lo}, {hi}] is empty")
    return _pieces(low, x, shape, name, piecewise.hardtanh(lo, hi))


def _leaky(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, slope: float) -> _Val:
    if slope == 0:
        return _relu(low, x, shape, name)
    return _pieces(low, x, shape, name, piecewise.leaky_relu(float(slope)))


def _gelu(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, approximate: str) -> _Val:
    if approximate not in ("none", "tanh"):
        raise PlanError(f"layer {name}: GELU approximate={approximate!r} is not known")
    return _spline(low, x, shape, name, "gelu" if approximate == "none" else "gelu_tanh")


def _softmax2(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dim: int | None) -> _Val:
    """softmax over two classes: p1 = sigmoid(x1 - x0), p0 = 1 - p1 (one SecSigm, the rest local)."""
    in_shape = low.shape_of(x)
    if dim is None:
        raise PlanError(f"layer {name}: give softmax its dim")
    d = dim % len(in_shape)
    if in_shape[d] != 2:
        raise PlanError(f"layer {name}: softmax over {in_shape[d]} classes is not supported; {REWRITES['softmax']}")
    half = tuple(1 if i == d else s for i, s in enumerate(in_shape))
    x0 = _index_step(low, x, [(0, s, 1) if i != d else (0, 1, 1) for i, s in enumerate(in_shape)], half, name + ".0")
    x1 = _index_step(low, x, [(0, s, 1) if i != d else (1, 2, 1) for i, s in enumerate(in_shape)], half, name + ".1")
    diff = low.add("add", [x1, x0], half, x.scale, name + ".diff", lift=(0, 0), signs=(1, -1))
    p1 = _sigmoid(low, diff, half, name)
    p0 = low.add("add_const", [p1], half, p1.scale, name + ".p0", value=1.0, sign=-1)
    return low.add("cat", [p0, p1], in_shape, p1.scale, name + ".cat", dim=d, lift=(0, 0))


def _window_of(k: Any, s: Any, p: Any) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    return _pair2(k), _pair2(s if s else k), _pair2(p)


def _is_global(in_shape: tuple[int, ...], k: tuple[int, int], p: tuple[int, int]) -> bool:
    return len(in_shape) == 4 and k == (in_shape[2], in_shape[3]) and p == (0, 0)


def _maxpool(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, k: Any, s: Any, p: Any) -> _Val:
    (kh, kw), (sh, sw), (ph, pw) = _window_of(k, s, p)
    if _is_global(low.shape_of(x), (kh, kw), (ph, pw)):
        return _maxreduce(low, x, shape, name, (2, 3))
    if kh != kw or sh != sw or ph != pw:
        raise PlanError(f"layer {name}: non-square max-pool windows are supported as global pools only")
    x = low.at_frac(x, name)
    if ph > kh // 2:
        raise PlanError(f"layer {name}: padding must be at most half the kernel")
    return low.add("maxpool", [x], shape, low.frac, name, k=kh, s=sh, p=ph)


def _maxreduce(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dims: tuple[int, ...]) -> _Val:
    x = low.at_frac(x, name)
    x = _before_covering_pool(low, x, dims)
    return low.add("maxreduce", [x], shape, low.frac, name, dims=dims)


def _before_covering_pool(low: _Lowering, x: _Val, dims: tuple[int, ...]) -> _Val:
    """The input of a max-pool whose output x is reduced over both spatial dims, when the pool's
    windows cover every input element: the maximum is the same, and the reduction starts from the
    pool's input, in the rounds of the pool instead of after them (CBAM's channel attention after
    an Xception entry block's 3 x 3 / 2 max-pool: 7 rounds sooner, from a truncation's result)."""
    step = low.steps[x.step]
    if step.op != "maxpool" or not {2, 3} <= {d % 4 for d in dims}:
        return x
    a = step.get(WindowAttrs)
    src = low.steps[step.inputs[0]]
    covers = all(a.s <= a.k and (out - 1) * a.s - a.p + a.k >= size
                 for out, size in zip(step.shape[2:], src.shape[2:], strict=True))
    return _Val(src.index, src.scale) if covers else x


def _minreduce(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dims: tuple[int, ...]) -> _Val:
    """min = -max(-x): two local sign flips around one maximum."""
    neg = low.add("scale", [x], low.shape_of(x), x.scale, name + ".neg", mult=-1)
    m = _maxreduce(low, neg, shape, name, dims)
    return low.add("scale", [m], shape, m.scale, name + ".back", mult=-1)


def _mean(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, dims: tuple[int, ...]) -> _Val:
    x = low.at_frac(x, name)
    in_shape = low.steps[x.step].shape
    count = 1
    for d in dims:
        count *= in_shape[d]
    mult = round((1 << MEAN_BITS) / count)
    return low.add("mean", [x], shape, x.scale + MEAN_BITS, name, dims=dims, mult=mult)


def _avgpool(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, window: tuple[Any, Any, Any],
             ceil_mode: bool, count_include_pad: bool, divisor: int | None) -> _Val:
    (kh, kw), (sh, sw), (ph, pw) = _window_of(*window)
    if _is_global(low.shape_of(x), (kh, kw), (ph, pw)) and not divisor:
        return _mean(low, x, shape, name, (2, 3))
    if kh != kw or sh != sw or ph != pw:
        raise PlanError(f"layer {name}: non-square average-pool windows are supported as global pools only")
    if ceil_mode:
        raise PlanError(f"layer {name}: AvgPool2d with ceil_mode is not supported; {REWRITES['ceil_mode']}")
    x = low.at_frac(x, name)
    mult = round((1 << MEAN_BITS) / (divisor or kh * kh))
    exclude = bool(ph) and not count_include_pad and not divisor
    return low.add("sumpool", [x], shape, x.scale + MEAN_BITS, name, k=kh, s=sh, p=ph, mult=mult, exclude_pad=exclude)


def _adaptive(low: _Lowering, x: _Val, shape: tuple[int, ...], name: str, size: Any, average: bool) -> _Val:
    """Adaptive pools whose output size divides the input: windows of input / output, or global."""
    in_shape = low.shape_of(x)
    if len(in_shape) != 4:
        raise PlanError(f"layer {name}: adaptive 2-d pools need an (N, C, H, W) input")
    H, W = in_shape[2], in_shape[3]
    if isinstance(size, tuple | list):
        oh, ow = (H if size[0] is None else int(size[0])), (W if size[1] is None else int(size[1]))
    else:
        oh = ow = int(size) if size is not None else H
    if (oh, ow) == (1, 1):
        return (_mean if average else _maxreduce)(low, x, shape, name, (2, 3))
    if H % oh or W % ow or H // oh != W // ow:
        raise PlanError(f"layer {name}: adaptive pool from {H}x{W} to {oh}x{ow}; {REWRITES['AdaptiveAvgPool2d']}")
    k = H // oh
    if average:
        return _avgpool(low, x, shape, name, (k, k, 0), False, True, None)
    return _maxpool(low, x, shape, name, k, k, 0)


# --- functions and methods -------------------------------------------------------------------------
# A rule lowers one call: (lowering, positional args, keyword args, output shape, name); arguments that
# are graph values arrive as _Val, parameters as _Param, the rest (sizes too) as Python values.

FunctionRule: TypeAlias = Callable[[_Lowering, list[Any], dict[str, Any], tuple[int, ...], str], Any]


def _arg_or(args: list[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    """Argument `key` given by keyword or at position i, else `default`."""
    if key in kwargs:
        return kwargs[key]
    return args[i] if len(args) > i else default


def _val(v: Any, name: str) -> _Val:
    if not isinstance(v, _Val):
        raise PlanError(f"layer {name}: expected a tensor computed by the model, got {type(v).__name__}")
    return v


def _number(v: Any, name: str, what: str) -> float | None:
    if v is None or isinstance(v, int | float):
        return v
    raise PlanError(f"layer {name}: {what} must be a number, not {type(v).__name__}")


def _fn_add(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _addsub(low, args[0], args[1], shape, name, 1)


def _fn_sub(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _addsub(low, args[0], args[1], shape, name, -1)


def _unexpanded(low: _Lowering, a: _Val, b: _Val, shape: tuple[int, ...]) -> tuple[_Val, _Val]:
    """Element-wise ops broadcast: an operand that is an `expand` whose source broadcasts to the same
    result is replaced by that source (a product then opens the small tensor, not the expanded one)."""
    def source(v: _Val, other: _Val) -> _Val:
        step = low.steps[v.step]
        if step.op != "expand":
            return v
        src = _Val(step.inputs[0], v.scale)
        both = torch.broadcast_shapes(low.shape_of(src), low.shape_of(other))  # type: ignore[no-untyped-call]
        return src if tuple(both) == shape else v

    a = source(a, b)
    return a, source(b, a)


def _fn_mul(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    a, b = args[0], args[1]
    if isinstance(a, _Val) and isinstance(b, _Val):
        a, b = _unexpanded(low, a, b, shape)
        a, b = low.at_frac(a, name), low.at_frac(b, name)
        a, b = low.remasked(a, b, name), low.remasked(b, a, name)
        return low.add("mul", [a, b], shape, 2 * low.frac, name)
    v, c = (a, b) if isinstance(a, _Val) else (b, a)
    return _scale(low, v, float(_number(c, name, "a factor") or 0.0), shape, name)


def _fn_div(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    if not isinstance(args[0], _Val) or not isinstance(args[1], int | float):
        raise PlanError(f"layer {name}: {REWRITES['div']}")
    return _scale(low, args[0], 1.0 / float(args[1]), shape, name)


def _fn_neg(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _scale(low, args[0], -1.0, shape, name)


def _fn_relu(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _relu(low, _val(args[0], name), shape, name)


def _fn_sigmoid(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _sigmoid(low, _val(args[0], name), shape, name)


def _spline_rule(fn: str) -> FunctionRule:
    return lambda low, args, kwargs, shape, name: _spline(low, _val(args[0], name), shape, name, fn)


def _fn_gelu(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _gelu(low, _val(args[0], name), shape, name, str(_arg_or(args, kwargs, 1, "approximate", "none")))


def _fn_clamp(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    lo = _number(_arg_or(args, kwargs, 1, "min"), name, "a clamp bound")
    hi = _number(_arg_or(args, kwargs, 2, "max"), name, "a clamp bound")
    return _clamp(low, _val(args[0], name), shape, name, lo, hi)


def _fn_hardtanh(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    lo = _number(_arg_or(args, kwargs, 1, "min_val", -1.0), name, "min_val")
    hi = _number(_arg_or(args, kwargs, 2, "max_val", 1.0), name, "max_val")
    return _clamp(low, _val(args[0], name), shape, name, lo, hi)


def _fn_relu6(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _clamp(low, _val(args[0], name), shape, name, 0.0, 6.0)


def _fn_leaky(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    slope = _number(_arg_or(args, kwargs, 1, "negative_slope", 0.01), name, "negative_slope")
    return _leaky(low, _val(args[0], name), shape, name, float(slope or 0.0))


def _fn_hardsigmoid(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
                    name: str) -> _Val:
    return _pieces(low, _val(args[0], name), shape, name, piecewise.hardsigmoid())


def _fn_softmax(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _softmax2(low, _val(args[0], name), shape, name, _arg_or(args, kwargs, 1, "dim"))


def _fn_cat(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    parts = _arg_or(args, kwargs, 0, "tensors")
    vals, lift, scale = low.align([_val(v, name) for v in parts], name)
    dim = int(_arg_or(args, kwargs, 1, "dim", 0))
    return low.add("cat", vals, shape, scale, name, dim=dim % len(shape), lift=tuple(lift))


def _fn_stack(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    d = int(_arg_or(args, kwargs, 1, "dim", 0)) % len(shape)
    ups = []
    for i, v in enumerate(_arg_or(args, kwargs, 0, "tensors")):
        s = low.shape_of(_val(v, name))
        ups.append(low.reshape(v, s[:d] + (1,) + s[d:], f"{name}.{i}"))
    vals, lift, scale = low.align(ups, name)
    return low.add("cat", vals, shape, scale, name, dim=d, lift=tuple(lift))


def _fn_reshape(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return low.reshape(_val(args[0], name), shape, name)


def _fn_same(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    """contiguous, clone, detach, float, to, type_as: the same value."""
    return _val(args[0], name)


def _fn_getitem(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> Any:
    src, idx = args[0], args[1]
    if isinstance(src, tuple | list):
        return src[idx]
    if isinstance(src, _MaxOut):
        return src.get(idx)
    return _index(low, _val(src, name), idx, shape, name)


def _fn_getattr(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> Any:
    obj, attr = args[0], str(args[1])
    if isinstance(obj, _MaxOut):
        return obj.get(attr)
    if isinstance(obj, _Param) and attr == "shape":
        return torch.Size(obj.shape)
    if isinstance(obj, _Val):
        s = low.shape_of(obj)
        values: dict[str, Any] = {"shape": torch.Size(s), "ndim": len(s), "dtype": torch.float32,
                                  "device": torch.device("cpu"), "is_cuda": False}
        if attr in values:
            return values[attr]
        if attr == "T":
            return _permute(low, obj, tuple(reversed(range(len(s)))), shape, name)
    raise PlanError(f"layer {name}: the attribute {attr!r} of {type(obj).__name__.strip('_')} is not supported")


def _fn_size(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> Any:
    s = torch.Size(low.shape_of(_val(args[0], name)))
    d = _arg_or(args, kwargs, 1, "dim")
    return s if d is None else s[d]


def _fn_dim(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> int:
    return len(low.shape_of(_val(args[0], name)))


def _fn_numel(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> int:
    return math.prod(low.shape_of(_val(args[0], name)))


def _index(low: _Lowering, x: _Val, idx: Any, shape: tuple[int, ...], name: str) -> _Val:
    """x[idx] for integers, slices (positive steps), None and one Ellipsis."""
    in_shape = low.shape_of(x)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if sum(1 for it in items if it is Ellipsis) > 1:
        raise PlanError(f"layer {name}: an index with two ellipses")
    if Ellipsis in items:
        explicit = sum(1 for it in items if it is not None and it is not Ellipsis)
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(in_shape) - explicit)
    slices: list[tuple[int, int, int]] = []
    for it in items:
        if it is None:
            continue
        if len(slices) == len(in_shape):
            raise PlanError(f"layer {name}: too many indices for a tensor of {len(in_shape)} dims")
        size = in_shape[len(slices)]
        if isinstance(it, bool) or not isinstance(it, int | slice):
            raise PlanError(f"layer {name}: indexing with {type(it).__name__.strip('_')} (advanced indexing) is not "
                            "supported; index with integers, slices, None and ...")
        if isinstance(it, int):
            i = it + size if it < 0 else it
            slices.append((i, i + 1, 1))
        else:
            a, b, c = it.indices(size)
            if c < 1 or b <= a:
                raise PlanError(f"layer {name}: the slice {it} is empty or runs backwards")
            slices.append((a, b, c))
    slices += [(0, s, 1) for s in in_shape[len(slices):]]
    return _index_step(low, x, slices, shape, name)


def _index_step(low: _Lowering, x: _Val, slices: list[tuple[int, int, int]], shape: tuple[int, ...],
                name: str) -> _Val:
    in_shape = low.shape_of(x)
    if all(sl == (0, s, 1) for sl, s in zip(slices, in_shape, strict=True)):
        return low.reshape(x, shape, name)
    return low.add("index", [x], shape, x.scale, name, starts=tuple(s[0] for s in slices),
                   stops=tuple(s[1] for s in slices), steps=tuple(s[2] for s in slices))


def _along(low: _Lowering, x: _Val, bounds: list[tuple[int, int]], d: int, name: str,
           drop: bool = False) -> tuple[_Val, ...]:
    """Pieces [a, b) of x along dim d (chunk, split; `drop` removes the dim: unbind)."""
    in_shape = low.shape_of(x)
    out = []
    for i, (a, b) in enumerate(bounds):
        slices = [(0, s, 1) for s in in_shape]
        slices[d] = (a, b, 1)
        shp = list(in_shape)
        shp[d] = b - a
        if drop:
            del shp[d]
        out.append(_index_step(low, x, slices, tuple(shp), f"{name}.{i}"))
    return tuple(out)


def _fn_chunk(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
              name: str) -> tuple[_Val, ...]:
    x = _val(args[0], name)
    chunks = int(_arg_or(args, kwargs, 1, "chunks"))
    s = low.shape_of(x)
    d = int(_arg_or(args, kwargs, 2, "dim", 0)) % len(s)
    size = -(-s[d] // chunks)
    return _along(low, x, [(a, min(a + size, s[d])) for a in range(0, s[d], size)], d, name)


def _fn_split(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
              name: str) -> tuple[_Val, ...]:
    x = _val(args[0], name)
    sizes = _arg_or(args, kwargs, 1, "split_size_or_sections", kwargs.get("split_size"))
    s = low.shape_of(x)
    d = int(_arg_or(args, kwargs, 2, "dim", 0)) % len(s)
    if isinstance(sizes, int):
        bounds = [(a, min(a + sizes, s[d])) for a in range(0, s[d], sizes)]
    else:
        ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
        bounds = list(zip([0, *ends[:-1]], ends, strict=True))
    return _along(low, x, bounds, d, name)


def _fn_unbind(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
               name: str) -> tuple[_Val, ...]:
    x = _val(args[0], name)
    s = low.shape_of(x)
    d = int(_arg_or(args, kwargs, 1, "dim", 0)) % len(s)
    return _along(low, x, [(i, i + 1) for i in range(s[d])], d, name, drop=True)


def _permute(low: _Lowering, x: _Val, dims: tuple[int, ...], shape: tuple[int, ...], name: str) -> _Val:
    if dims == tuple(range(len(dims))):
        return x
    return low.add("permute", [x], shape, x.scale, name, dims=dims)


def _fn_permute(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    x = _val(args[0], name)
    dims = kwargs.get("dims", args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:])
    nd = len(low.shape_of(x))
    return _permute(low, x, tuple(int(d) % nd for d in dims), shape, name)


def _fn_transpose(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    x = _val(args[0], name)
    nd = len(low.shape_of(x))
    perm = list(range(nd))
    if nd >= 2 or len(args) > 1:
        a, b = int(_arg_or(args, kwargs, 1, "dim0", 0)) % nd, int(_arg_or(args, kwargs, 2, "dim1", 1)) % nd
        perm[a], perm[b] = perm[b], perm[a]
    return _permute(low, x, tuple(perm), shape, name)


def _fn_expand(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    x = _val(args[0], name)
    return x if low.shape_of(x) == shape else low.add("expand", [x], shape, x.scale, name)


def _fn_repeat(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    x = _val(args[0], name)
    reps = tuple(int(r) for r in (args[1] if len(args) == 2 and isinstance(args[1], tuple | list) else args[1:]))
    s = low.shape_of(x)
    padded = (1,) * (len(reps) - len(s)) + s
    if all(r == 1 or d == 1 for d, r in zip(padded, reps, strict=True)):  # a broadcast
        return _fn_expand(low, args, kwargs, shape, name)
    return low.add("repeat", [x], shape, x.scale, name, reps=reps)


def _reduced_dims(low: _Lowering, args: list[Any], kwargs: dict[str, Any]) -> tuple[int, ...]:
    dim = _arg_or(args, kwargs, 1, "dim")
    in_nd = len(low.steps[args[0].step].shape)
    return _dims(dim if dim is not None else tuple(range(in_nd)), in_nd)


def _fn_mean(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _mean(low, args[0], shape, name, _reduced_dims(low, args, kwargs))


def _fn_sum(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    x = _val(args[0], name)
    return low.add("mean", [x], shape, x.scale, name, dims=_reduced_dims(low, args, kwargs), mult=1)


def _fn_amax(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _maxreduce(low, args[0], shape, name, _reduced_dims(low, args, kwargs))


def _fn_amin(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _minreduce(low, args[0], shape, name, _reduced_dims(low, args, kwargs))


def _elementwise_max(low: _Lowering, a: Any, b: Any, shape: tuple[int, ...], name: str, minimum: bool) -> _Val:
    """max(a, b) = b + relu(a - b), min(a, b) = a - relu(a - b): one SecReLU."""
    r = _relu(low, _addsub(low, a, b, shape, name + ".diff", -1), shape, name)
    return _addsub(low, a, r, shape, name + ".min", -1) if minimum else _addsub(low, b, r, shape, name + ".max", 1)


def _max_rule(minimum: bool) -> FunctionRule:
    def rule(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> Any:
        x = _val(args[0], name)
        other = kwargs.get("other", _arg_or(args, kwargs, 1, "dim"))
        if isinstance(other, _Val):
            return _elementwise_max(low, x, other, shape, name, minimum)
        reduce = _minreduce if minimum else _maxreduce
        if other is None:
            return reduce(low, x, shape, name, tuple(range(len(low.shape_of(x)))))
        return _MaxOut(reduce(low, x, shape, name, _dims(int(other), len(low.shape_of(x)))))

    return rule


def _fn_maximum(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _elementwise_max(low, _val(args[0], name), _val(args[1], name), shape, name, False)


def _fn_minimum(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    return _elementwise_max(low, _val(args[0], name), _val(args[1], name), shape, name, True)


def _fn_adaptive(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str,
                 average: bool) -> _Val:
    return _adaptive(low, _val(args[0], name), shape, name, _arg_or(args, kwargs, 1, "output_size"), average)


def _fn_max_pool2d(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
                   name: str) -> _Val:
    if _pair(_arg_or(args, kwargs, 4, "dilation", 1)) != 1 or _arg_or(args, kwargs, 5, "ceil_mode", False) or \
            _arg_or(args, kwargs, 6, "return_indices", False):
        raise PlanError(f"layer {name}: max_pool2d with dilation, ceil_mode or indices is not supported")
    k = _arg_or(args, kwargs, 1, "kernel_size")
    return _maxpool(low, _val(args[0], name), shape, name, k, _arg_or(args, kwargs, 2, "stride") or k,
                    _arg_or(args, kwargs, 3, "padding", 0))


def _fn_avg_pool2d(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...],
                   name: str) -> _Val:
    k = _arg_or(args, kwargs, 1, "kernel_size")
    window = (k, _arg_or(args, kwargs, 2, "stride") or k, _arg_or(args, kwargs, 3, "padding", 0))
    return _avgpool(low, _val(args[0], name), shape, name, window, bool(_arg_or(args, kwargs, 4, "ceil_mode", False)),
                    bool(_arg_or(args, kwargs, 5, "count_include_pad", True)),
                    _arg_or(args, kwargs, 6, "divisor_override"))


def _params(args: list[Any], kwargs: dict[str, Any], name: str) -> tuple[_Param, _Param | None]:
    w, b = _arg_or(args, kwargs, 1, "weight"), _arg_or(args, kwargs, 2, "bias")
    if not isinstance(w, _Param) or not (b is None or isinstance(b, _Param)):
        raise PlanError(f"layer {name}: the weight and bias of a functional conv or linear must be the module's "
                        "parameters (self.weight), not values computed from them")
    return w, b


def _fn_conv2d(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    w, b = _params(args, kwargs, name)
    padding = _arg_or(args, kwargs, 4, "padding", 0)
    if isinstance(padding, str):
        raise PlanError(f"layer {name}: padding={padding!r}; give the padding as numbers")
    keys = (w.key, b.key if b is not None else None)
    return _linear(low, _val(args[0], name), shape, name, "conv", w.shape, b is not None, keys=keys,
                   stride=_pair(_arg_or(args, kwargs, 3, "stride", 1)),
                   padding=_pair(padding), dilation=_pair(_arg_or(args, kwargs, 5, "dilation", 1)),
                   groups=int(_arg_or(args, kwargs, 6, "groups", 1)))


def _fn_linear(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    w, b = _params(args, kwargs, name)
    keys = (w.key, b.key if b is not None else None)
    return _linear(low, _val(args[0], name), shape, name, "fc", w.shape, b is not None, keys=keys)


def _fn_dropout(low: _Lowering, args: list[Any], kwargs: dict[str, Any], shape: tuple[int, ...], name: str) -> _Val:
    if _arg_or(args, kwargs, 2, "training", True) is not False:
        raise PlanError(f"layer {name}: F.dropout drops at inference too unless training=False (its default is "
                        "True); pass training=self.training or use nn.Dropout")
    return _val(args[0], name)


_SAME = {"contiguous", "clone", "detach", "float", "to", "type_as", "requires_grad_", "cpu"}

FUNCTION_RULES: dict[Any, FunctionRule] = {
    operator.add: _fn_add, operator.iadd: _fn_add, torch.add: _fn_add,
    operator.sub: _fn_sub, operator.isub: _fn_sub, torch.sub: _fn_sub,
    operator.mul: _fn_mul, operator.imul: _fn_mul, torch.mul: _fn_mul,
    operator.truediv: _fn_div, operator.itruediv: _fn_div, torch.div: _fn_div,
    operator.neg: _fn_neg, torch.neg: _fn_neg,
    operator.getitem: _fn_getitem, builtins.getattr: _fn_getattr,
    torch.relu: _fn_relu, F.relu: _fn_relu, torch.relu_: _fn_relu, F.relu_: _fn_relu,
    F.relu6: _fn_relu6, F.hardtanh: _fn_hardtanh, F.hardtanh_: _fn_hardtanh,
    torch.clamp: _fn_clamp, torch.clip: _fn_clamp, torch.clamp_: _fn_clamp,
    F.leaky_relu: _fn_leaky, F.leaky_relu_: _fn_leaky,
    F.hardsigmoid: _fn_hardsigmoid, F.hardswish: _spline_rule("hardswish"),
    torch.sigmoid: _fn_sigmoid, F.sigmoid: _fn_sigmoid, torch.sigmoid_: _fn_sigmoid,
    torch.tanh: _spline_rule("tanh"), F.tanh: _spline_rule("tanh"), torch.tanh_: _spline_rule("tanh"),
    F.silu: _spline_rule("silu"), F.gelu: _fn_gelu,
    F.softmax: _fn_softmax, torch.softmax: _fn_softmax,
    torch.cat: _fn_cat, torch.concat: _fn_cat, torch.stack: _fn_stack,
    torch.flatten: _fn_reshape, torch.reshape: _fn_reshape, torch.squeeze: _fn_reshape,
    torch.unsqueeze: _fn_reshape,
    torch.permute: _fn_permute, torch.transpose: _fn_transpose, torch.t: _fn_transpose,
    torch.broadcast_to: _fn_expand,
    torch.chunk: _fn_chunk, torch.split: _fn_split, torch.unbind: _fn_unbind,
    torch.mean: _fn_mean, torch.sum: _fn_sum,
    torch.amax: _fn_amax, torch.amin: _fn_amin,
    torch.max: _max_rule(False), torch.min: _max_rule(True),
    torch.maximum: _fn_maximum, torch.minimum: _fn_minimum,
    F.adaptive_avg_pool2d: lambda low, args, kwargs, shape, name: _fn_adaptive(low, args, kwargs, shape, name, True),
    F.adaptive_max_pool2d: lambda low, args, kwargs, shape, name: _fn_adaptive(low, args, kwargs, shape, name, False),
    F.max_pool2d: _fn_max_pool2d,
    F.avg_pool2d: _fn_avg_pool2d,
    F.conv2d: _fn_conv2d, F.linear: _fn_linear,
    F.dropout: _fn_dropout, F.dropout1d: _fn_dropout, F.dropout2d: _fn_dropout, F.alpha_dropout: _fn_dropout,
}

METHOD_RULES: dict[str, FunctionRule] = {
    "add": _fn_add, "add_": _fn_add,
    "sub": _fn_sub, "sub_": _fn_sub,
    "mul": _fn_mul, "mul_": _fn_mul,
    "div": _fn_div, "div_": _fn_div,
    "neg": _fn_neg, "neg_": _fn_neg,
    "relu": _fn_relu, "relu_": _fn_relu,
    "sigmoid": _fn_sigmoid, "sigmoid_": _fn_sigmoid,
    "tanh": _spline_rule("tanh"), "tanh_": _spline_rule("tanh"),
    "clamp": _fn_clamp, "clamp_": _fn_clamp, "clip": _fn_clamp, "clip_": _fn_clamp,
    "softmax": _fn_softmax,
    "flatten": _fn_reshape, "view": _fn_reshape, "reshape": _fn_reshape, "view_as": _fn_reshape,
    "reshape_as": _fn_reshape, "squeeze": _fn_reshape, "unsqueeze": _fn_reshape,
    **{m: _fn_same for m in _SAME},
    "permute": _fn_permute, "transpose": _fn_transpose, "t": _fn_transpose,
    "expand": _fn_expand, "expand_as": _fn_expand, "repeat": _fn_repeat,
    "chunk": _fn_chunk, "split": _fn_split, "unbind": _fn_unbind,
    "mean": _fn_mean, "sum": _fn_sum,
    "amax": _fn_amax, "amin": _fn_amin, "max": _max_rule(False), "min": _max_rule(True),
    "size": _fn_size, "dim": _fn_dim, "ndimension": _fn_dim, "numel": _fn_numel, "nelement": _fn_numel,
}


def _lower_function(low: _Lowering, node: torch.fx.Node, env: dict[str, Any]) -> Any:
    args = [_arg(env, a) for a in node.args]
    kwargs = {k: _arg(env, v) for k, v in node.kwargs.items()}
    if not _tensorish(args) and not _tensorish(kwargs):
        return _python_value(node, args, kwargs)
    t = node.target
    rule = METHOD_RULES.get(str(t)) if node.op == "call_method" else FUNCTION_RULES.get(t)
    what = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    if rule is None:
        raise _refuse(node, f"layer {node.name} ({what})", what.rstrip("_"))
    if t not in (F.conv2d, F.linear, builtins.getattr) and any(
            isinstance(a, _Param) for a in (*args, *kwargs.values())):
        raise _refuse(node, f"layer {node.name} ({what}) on a parameter", "get_attr")
    shape = _shape(node) if node.meta.get("tensor_meta") is not None else ()
    return rule(low, args, kwargs, shape, node.name)


def _addsub(low: _Lowering, a: Any, b: Any, shape: tuple[int, ...], name: str, sign: int) -> _Val:
    if isinstance(a, _Val) and isinstance(b, _Val):
        vals, lift, scale = low.align(list(_unexpanded(low, a, b, shape)), name)
        return low.add("add", vals, shape, scale, name, lift=tuple(lift), signs=(1, sign))
    if isinstance(a, _Val):
        return low.add("add_const", [a], shape, a.scale, name, value=sign * float(_number(b, name, "a term") or 0.0),
                       sign=1)
    if isinstance(b, _Val):
        return low.add("add_const", [b], shape, b.scale, name, value=float(_number(a, name, "a term") or 0.0),
                       sign=sign)
    raise PlanError(f"layer {name}: arithmetic on constants only is not supported")


def _scale(low: _Lowering, v: _Val, c: float, shape: tuple[int, ...], name: str) -> _Val:
    if float(c).is_integer():
        return low.add("scale", [v], shape, v.scale, name, mult=int(c))
    v = low.at_frac(v, name)
    return low.add("scale", [v], shape, v.scale + low.frac, name, mult=round(c * (1 << low.frac)))


# ---------------------------------------------------------------------------------------------
# Weights: what the model owner extracts, folds and shares (never part of the plan).


def _tensor_at(module: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer called `key` (a dotted path), or None."""
    try:
        return module.get_parameter(key)
    except AttributeError:
        try:
            return module.get_buffer(key)
        except AttributeError:
            return None


def extract_weights(module: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Float64 weights per plan key with BatchNorm folded; biases included."""
    mods = dict(module.named_modules())
    out: dict[str, torch.Tensor] = {}
    for s in plan.steps:
        if s.op != "linear":
            continue
        a = s.get(LinearAttrs)
        if a.affine_bn:
            g, b = _bn_affine(mods[s.name])
            out[a.weight] = g.reshape(-1, 1, 1, 1)
            out[a.bias_key] = b
            continue
        folded = len(FOLD) + len(a.bn) if a.bn is not None else 0
        wkey, bkey = a.weight[: len(a.weight) - folded], a.bias_key[: len(a.bias_key) - folded]
        wt = _tensor_at(module, wkey)
        if wt is None:
            raise PlanError(f"layer {s.name}: the module has no parameter {wkey}")
        w = wt.detach().to(torch.float64)
        bt = _tensor_at(module, bkey)
        b = torch.zeros(w.shape[0], dtype=torch.float64) if bt is None else bt.detach().to(torch.float64)
        if a.bn is not None:
            g, beta = _bn_affine(mods[a.bn])
            w = w * g.reshape(-1, *([1] * (w.dim() - 1)))
            b = b * g + beta
        out[a.weight] = w
        if a.bias:
            out[a.bias_key] = b
    return out


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
    var = bn.running_var.detach().to(torch.float64)  # type: ignore[union-attr]
    mean = bn.running_mean.detach().to(torch.float64)  # type: ignore[union-attr]
    g = bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(var)
    scale = g / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale
