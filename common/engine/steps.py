"""What each plan step does: its correlated randomness (`deal`, run by the dealer and both parties)
and its online protocol (`run`). An explicit registry (`STEP_KINDS`) maps step ops to `StepKind`s and
rejects duplicates; an unknown op fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from secdfd.common.engine.plan import (
    MEAN_BITS,
    AddAttrs,
    AddConstAttrs,
    CatAttrs,
    IndexAttrs,
    LinearAttrs,
    MeanAttrs,
    PermuteAttrs,
    PiecewiseAttrs,
    Plan,
    ReduceAttrs,
    RepeatAttrs,
    ScaleAttrs,
    ShiftAttrs,
    SplineAttrs,
    Step,
    SumPoolAttrs,
    WindowAttrs,
)
from secdfd.common.engine.protocols import arith, compare, piecewise, pool, sigmoid, spline
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.randomness import Source
from secdfd.common.engine.ringops import ring_op


def fc_keys(plan: Plan) -> set[str]:
    """Weight keys of fully connected layers, which the runtime stores transposed."""
    return {a.weight for a in plan.linear_layers() if a.kind == "fc"}


def fc_layout(plan: Plan, ws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights with fc matrices transposed to (in, out)."""
    keys = fc_keys(plan)
    return {k: (v.t().contiguous() if k in keys else v) for k, v in ws.items()}


@dataclass
class Weights:
    """One role's view of the secret weights.

    Dealer: `mask[key]` is the full weight mask B. Party i: `wb[key]` is F + B_0 (party 0) or B_1,
    `F[key]` the opened F = W - B, `bias[key]` its additive share of each bias (scale 2f).
    """

    mask: dict[str, torch.Tensor]
    wb: dict[str, torch.Tensor]
    F: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------
# Ring versions of the linear operators (int64 wraps mod 2^64).


def depthwise(x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int) -> torch.Tensor:
    """Depthwise conv as k*k shifted multiply-adds (int64 grouped conv is slow on CPU)."""
    N, C, H, W = x.shape
    k = w.shape[-1]
    if padding:
        x = F.pad(x, (padding,) * 4)
    Ho = (H + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out = torch.zeros((N, C, Ho, Wo), dtype=x.dtype, device=x.device)
    for a in range(k):
        for b in range(k):
            sl = x[:, :, a * dilation : a * dilation + stride * (Ho - 1) + 1 : stride,
                   b * dilation : b * dilation + stride * (Wo - 1) + 1 : stride]
            out += sl * w[:, 0, a, b].view(1, C, 1, 1)
    return out


def linear_op(step: Step, limbs: bool = False) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The ring operator of a linear step; `limbs` selects float64 limb products (CUDA)."""
    a = step.get(LinearAttrs)
    wshape = a.wshape
    reduction = 1
    for d in wshape[1:]:
        reduction *= d
    if a.kind == "fc":
        # fc weights are kept transposed, (in, out), contiguous: int64 x @ w is 4x faster that way
        return ring_op(lambda x, w: x @ w, reduction, limbs)
    stride, padding, dilation, groups = a.stride, a.padding, a.dilation, a.groups

    def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if groups > 1 and groups == x.shape[1] and w.shape[0] == groups and w.shape[1] == 1:
            return depthwise(x, w, stride, padding, dilation)  # element-wise products: int64 everywhere
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)

    depthwise_only = groups > 1 and wshape[1] == 1 and wshape[0] == groups
    return ring_op(conv, reduction, limbs and not depthwise_only)


# ---------------------------------------------------------------------------------------------
# Step kinds.

Deal = Callable[[Source, Step, Plan, Ctx, Weights | None], Any]
Run = Callable[[Ctx, Step, list[torch.Tensor], Any, Weights], Proto[torch.Tensor]]


@dataclass(frozen=True)
class StepKind:
    """How one op deals its randomness, folds what is input-independent (`prepare`) and runs."""

    deal: Deal
    run: Run
    prepare: Callable[[Any, Step, Weights, Ctx], Any] | None = None


def _none(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> None:
    return None


def _local(fn: Callable[[Ctx, Step, list[torch.Tensor], Weights], torch.Tensor]) -> StepKind:
    def run(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
        if False:  # a generator that never communicates
            yield []
        return fn(ctx, step, ins, w)

    return StepKind(_none, run)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _in_shape(plan: Plan, step: Step, i: int = 0) -> tuple[int, ...]:
    return plan.steps[step.inputs[i]].shape


# linear ------------------------------------------------------------------------------------


def _deal_linear(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    mask = w.mask[step.get(LinearAttrs).weight] if w is not None and src.is_dealer else torch.empty(0)
    return arith.deal_linear(src, _in_shape(plan, step), step.shape, linear_op(step), mask)


def _prepare_linear(R: Any, step: Step, w: Weights, ctx: Ctx) -> Any:
    return arith.prepare_linear(R, linear_op(step, ctx.limbs), w.F[step.get(LinearAttrs).weight])


def _run_linear(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(LinearAttrs)
    y = yield from arith.linear(ctx, ins[0], R, linear_op(step, ctx.limbs), w.wb[a.weight])
    if a.bias:
        b = w.bias[a.bias_key]
        y = y + (b.view(1, -1, 1, 1) if a.kind == "conv" else b.view(1, -1))
    return y


# truncation and non-linear steps -------------------------------------------------------------


def _run_trunc(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from arith.trunc(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_relu(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from compare.relu(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_sigmoid(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from sigmoid.sigmoid(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_spline(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(SplineAttrs)
    return (yield from spline.spline(ctx, ins[0], R, spline.get(a.fn), a.shift))


def _run_piecewise(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(PiecewiseAttrs)
    return (yield from piecewise.pieces(ctx, ins[0], R, a.pieces(), a.shift))


def _run_maxpool(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(WindowAttrs)
    return (yield from pool.maxpool2d(ctx, ins[0], R, a.k, a.s, a.p))


def _reduce_layout(in_shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[list[int], int, int]:
    keep = [d for d in range(len(in_shape)) if d not in dims]
    rows = _numel(tuple(in_shape[d] for d in keep))
    n = _numel(tuple(in_shape[d] for d in dims))
    return keep + list(dims), rows, n


def _deal_maxreduce(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    _, rows, n = _reduce_layout(_in_shape(plan, step), step.get(ReduceAttrs).dims)
    return pool.deal_reduce_max(src, rows, n, ctx.cmp_bits)


def _run_maxreduce(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    perm, rows, n = _reduce_layout(tuple(ins[0].shape), step.get(ReduceAttrs).dims)
    x = ins[0].permute(perm).reshape(rows, n)
    y = yield from pool.reduce_max(ctx, x, R)
    return y.reshape(step.shape)


def _run_mul(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from arith.mul(ctx, ins[0], ins[1], R))


# local steps ----------------------------------------------------------------------------------


def _output(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0]


def _reshape(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0].reshape(step.shape)


def _add(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.get(AddAttrs)
    out = None
    for x, lift, sign in zip(ins, a.lift, a.signs, strict=True):
        x = (x << lift) if lift else x
        x = x if sign == 1 else -x
        out = x if out is None else out + x
    assert out is not None
    return out.expand(step.shape) if tuple(out.shape) != step.shape else out


def _add_const(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.get(AddConstAttrs)
    x = ins[0] if a.sign == 1 else -ins[0]
    return x + round(a.value * (1 << step.scale)) if ctx.party == 0 else x


def _scale(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0] * step.get(ScaleAttrs).mult


def _cat(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.get(CatAttrs)
    xs = [(x << lift) if lift else x for x, lift in zip(ins, a.lift, strict=True)]
    return torch.cat(xs, a.dim)


def _mean(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.get(MeanAttrs)
    return (ins[0].sum(dim=a.dims) * a.mult).reshape(step.shape)


def window_sums(x: torch.Tensor, a: SumPoolAttrs) -> torch.Tensor:
    """Sums of every k x k window (zero padding p, stride s): any dtype, ring or float."""
    x = F.pad(x, (a.p,) * 4) if a.p else x
    return x.unfold(2, a.k, a.s).unfold(3, a.k, a.s).sum((-1, -2))


def pool_multipliers(a: SumPoolAttrs, shape: tuple[int, ...]) -> torch.Tensor | int:
    """The public multiplier of each window sum: `mult`, or with `exclude_pad` round(2^MEAN_BITS / n)
    where n counts the window's elements inside the input (border windows hold fewer)."""
    if not a.exclude_pad:
        return a.mult
    ones = torch.ones(1, 1, shape[2], shape[3], dtype=torch.int64)
    counts = window_sums(ones, a)[0, 0]
    return torch.round((1 << MEAN_BITS) / counts.double()).to(torch.int64)


def _sumpool(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.get(SumPoolAttrs)
    mult = pool_multipliers(a, tuple(ins[0].shape))
    return window_sums(ins[0], a) * (mult.to(ins[0].device) if isinstance(mult, torch.Tensor) else mult)


def index(x: torch.Tensor, step: Step) -> torch.Tensor:
    a = step.get(IndexAttrs)
    sl = tuple(slice(b, e, c) for b, e, c in zip(a.starts, a.stops, a.steps, strict=True))
    return x[sl].reshape(step.shape)


def _index(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return index(ins[0], step)


def _permute(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0].permute(step.get(PermuteAttrs).dims).contiguous()


def _expand(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return torch.broadcast_to(ins[0], step.shape).contiguous()


def _repeat(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0].repeat(step.get(RepeatAttrs).reps)


def _deal_trunc(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    return arith.deal_trunc(src, _numel(step.shape), step.get(ShiftAttrs).shift)


def _deal_relu(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    return compare.deal_relu(src, _numel(step.shape), step.get(ShiftAttrs).shift, ctx.cmp_bits)


def _deal_sigmoid(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    return sigmoid.deal_sigmoid(src, _numel(step.shape), step.get(ShiftAttrs).shift, ctx.frac, ctx.cmp_bits)


def _deal_spline(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    a = step.get(SplineAttrs)
    return spline.deal_spline(src, _numel(step.shape), a.shift, ctx.frac, ctx.cmp_bits, spline.get(a.fn))


def _deal_piecewise(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    a = step.get(PiecewiseAttrs)
    return piecewise.deal_pieces(src, _numel(step.shape), a.shift, ctx.cmp_bits, len(a.breaks))


def _deal_maxpool(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    a = step.get(WindowAttrs)
    return pool.deal_maxpool(src, _in_shape(plan, step), a.k, a.s, a.p, ctx.cmp_bits)


def _deal_mul(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    return arith.deal_mul(src, _in_shape(plan, step, 0), _in_shape(plan, step, 1))


# The input step is fed by the evaluator and never run.
STEP_KINDS: dict[str, StepKind] = {
    "input": _local(_output),
    "output": _local(_output),
    "reshape": _local(_reshape),
    "add": _local(_add),
    "add_const": _local(_add_const),
    "scale": _local(_scale),
    "cat": _local(_cat),
    "mean": _local(_mean),
    "sumpool": _local(_sumpool),
    "index": _local(_index),
    "permute": _local(_permute),
    "expand": _local(_expand),
    "repeat": _local(_repeat),
    "linear": StepKind(_deal_linear, _run_linear, _prepare_linear),
    "trunc": StepKind(_deal_trunc, _run_trunc),
    "relu": StepKind(_deal_relu, _run_relu),
    "sigmoid": StepKind(_deal_sigmoid, _run_sigmoid),
    "spline": StepKind(_deal_spline, _run_spline),
    "piecewise": StepKind(_deal_piecewise, _run_piecewise),
    "maxpool": StepKind(_deal_maxpool, _run_maxpool),
    "maxreduce": StepKind(_deal_maxreduce, _run_maxreduce),
    "mul": StepKind(_deal_mul, _run_mul),
}
