"""What each plan step does: its correlated randomness (`deal`, run by the dealer and both parties)
and its online protocol (`run`). An explicit registry maps step ops to kinds; unknown ops fail."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from secdfd.common.engine.plan import Plan, Step
from secdfd.common.engine.protocols import arith, compare, pool, sigmoid
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.randomness import Source
from secdfd.common.engine.ringops import ring_op


def fc_keys(plan: Plan) -> set[str]:
    """Weight keys of fully connected layers, which the runtime stores transposed."""
    return {s.attrs["weight"] for s in plan.steps if s.op == "linear" and s.attrs["kind"] == "fc"}


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
    a = step.attrs
    wshape = a["wshape"]
    reduction = 1
    for d in wshape[1:]:
        reduction *= d
    if a["kind"] == "fc":
        # fc weights are kept transposed, (in, out), contiguous: int64 x @ w is 4x faster that way
        return ring_op(lambda x, w: x @ w, reduction, limbs)
    stride, padding, dilation, groups = a["stride"], a["padding"], a["dilation"], a["groups"]

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
class Kind:
    deal: Deal
    run: Run
    prepare: Callable[[Any, Step, Weights, Ctx], Any] | None = None


def _none(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> None:
    return None


def _local(fn: Callable[[Ctx, Step, list[torch.Tensor], Weights], torch.Tensor]) -> Kind:
    def run(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
        return fn(ctx, step, ins, w)
        yield  # a generator that never communicates

    return Kind(_none, run)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _in_shape(plan: Plan, step: Step, i: int = 0) -> tuple[int, ...]:
    return plan.steps[step.inputs[i]].shape


# linear ------------------------------------------------------------------------------------


def _deal_linear(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    mask = w.mask[step.attrs["weight"]] if w is not None and src.is_dealer else torch.empty(0)
    return arith.deal_linear(src, _in_shape(plan, step), step.shape, linear_op(step), mask)


def _prepare_linear(R: Any, step: Step, w: Weights, ctx: Ctx) -> Any:
    return arith.prepare_linear(R, linear_op(step, ctx.limbs), w.F[step.attrs["weight"]])


def _run_linear(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    y = yield from arith.linear(ctx, ins[0], R, linear_op(step, ctx.limbs), w.wb[step.attrs["weight"]])
    if step.attrs["bias"]:
        b = w.bias[step.attrs["bias_key"]]
        y = y + (b.view(1, -1, 1, 1) if step.attrs["kind"] == "conv" else b.view(1, -1))
    return y


# truncation and non-linear steps -------------------------------------------------------------


def _run_trunc(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from arith.trunc(ctx, ins[0], R, step.attrs["shift"]))


def _run_relu(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from compare.relu(ctx, ins[0], R, step.attrs["shift"]))


def _run_sigmoid(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from sigmoid.sigmoid(ctx, ins[0], R, step.attrs["shift"]))


def _run_maxpool(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.attrs
    return (yield from pool.maxpool2d(ctx, ins[0], R, a["k"], a["s"], a["p"]))


def _reduce_layout(in_shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[list[int], int, int]:
    keep = [d for d in range(len(in_shape)) if d not in dims]
    rows = _numel(tuple(in_shape[d] for d in keep))
    n = _numel(tuple(in_shape[d] for d in dims))
    return keep + list(dims), rows, n


def _deal_maxreduce(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None) -> Any:
    _, rows, n = _reduce_layout(_in_shape(plan, step), step.attrs["dims"])
    return pool.deal_reduce_max(src, rows, n, ctx.cmp_bits)


def _run_maxreduce(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    perm, rows, n = _reduce_layout(tuple(ins[0].shape), step.attrs["dims"])
    x = ins[0].permute(perm).reshape(rows, n)
    y = yield from pool.reduce_max(ctx, x, R)
    return y.reshape(step.shape)


def _run_mul(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    return (yield from arith.mul(ctx, ins[0], ins[1], R))


# local steps ----------------------------------------------------------------------------------


def _input(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    raise AssertionError("the input step is fed by the evaluator")


def _output(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0]


def _reshape(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0].reshape(step.shape)


def _add(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.attrs
    out = None
    for x, lift, sign in zip(ins, a["lift"], a["signs"], strict=True):
        x = (x << lift) if lift else x
        x = x if sign == 1 else -x
        out = x if out is None else out + x
    assert out is not None
    return out.expand(step.shape) if tuple(out.shape) != step.shape else out


def _add_const(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    x = ins[0] if step.attrs["sign"] == 1 else -ins[0]
    return x + round(step.attrs["value"] * (1 << step.scale)) if ctx.party == 0 else x


def _scale(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return ins[0] * step.attrs["mult"]


def _cat(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    xs = [(x << lift) if lift else x for x, lift in zip(ins, step.attrs["lift"], strict=True)]
    return torch.cat(xs, step.attrs["dim"])


def _mean(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    return (ins[0].sum(dim=step.attrs["dims"]) * step.attrs["mult"]).reshape(step.shape)


def _sumpool(ctx: Ctx, step: Step, ins: list[torch.Tensor], w: Weights) -> torch.Tensor:
    a = step.attrs
    x = F.pad(ins[0], (a["p"],) * 4) if a["p"] else ins[0]
    s = x.unfold(2, a["k"], a["s"]).unfold(3, a["k"], a["s"]).sum((-1, -2))
    return s * a["mult"]


KINDS: dict[str, Kind] = {}


def register(op: str, kind: Kind) -> None:
    if op in KINDS:
        raise ValueError(f"step kind {op!r} registered twice")
    KINDS[op] = kind


register("input", _local(_input))
register("output", _local(_output))
register("reshape", _local(_reshape))
register("add", _local(_add))
register("add_const", _local(_add_const))
register("scale", _local(_scale))
register("cat", _local(_cat))
register("mean", _local(_mean))
register("sumpool", _local(_sumpool))
register("linear", Kind(_deal_linear, _run_linear, _prepare_linear))
register("trunc", Kind(lambda src, st, pl, c, w: arith.deal_trunc(src, _numel(st.shape), st.attrs["shift"]),
                       _run_trunc))
register("relu", Kind(lambda src, st, pl, c, w: compare.deal_relu(src, _numel(st.shape), st.attrs["shift"], c.cmp_bits),
                      _run_relu))
register("sigmoid", Kind(lambda src, st, pl, c, w: sigmoid.deal_sigmoid(src, _numel(st.shape), st.attrs["shift"],
                                                                         c.frac, c.cmp_bits), _run_sigmoid))
register("maxpool", Kind(lambda src, st, pl, c, w: pool.deal_maxpool(src, _in_shape(pl, st), st.attrs["k"],
                                                                      st.attrs["s"], st.attrs["p"], c.cmp_bits),
                         _run_maxpool))
register("maxreduce", Kind(_deal_maxreduce, _run_maxreduce))
register("mul", Kind(lambda src, st, pl, c, w: arith.deal_mul(src, _in_shape(pl, st, 0), _in_shape(pl, st, 1)),
                     _run_mul))
