"""What each plan step does: its correlated randomness (`deal`, run by the dealer and both parties)
and its online protocol (`run`). An explicit registry (`STEP_KINDS`) maps step ops to `StepKind`s and
rejects duplicates; an unknown op fails."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
from secdfd.common.engine.ringops import MAX_REDUCTION, conv2d, limb_product_split, ring_op, split_limbs
from secdfd.common.errors import ProtocolError


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
    `F[key]` the opened F = W - B, `bias[key]` its additive share of each bias (at its layer's output
    scale: 2f, or 3f - 2 for a layer on a 2f input).
    """

    mask: dict[str, torch.Tensor]
    wb: dict[str, torch.Tensor]
    F: dict[str, torch.Tensor]
    bias: dict[str, torch.Tensor]
    limbs: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # wb and F split (`split_weights`)
    low: dict[str, torch.Tensor] = field(default_factory=dict)  # wb mod 2^k as float64 (`_low_apply`)


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


def _bilinear(step: Step) -> tuple[arith.LinearOp, int, bool]:
    """The operator of a linear step on any dtype, its reduction length, and whether it is
    element-wise only (depthwise: int64 products everywhere)."""
    a = step.get(LinearAttrs)
    wshape = a.wshape
    reduction = 1
    for d in wshape[1:]:
        reduction *= d
    if a.kind == "fc":
        # fc weights are kept transposed, (in, out), contiguous: int64 x @ w is 4x faster that way
        return (lambda x, w: x @ w), reduction, False
    stride, padding, dilation, groups = a.stride, a.padding, a.dilation, a.groups

    def conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if groups > 1 and groups == x.shape[1] and w.shape[0] == groups and w.shape[1] == 1:
            return depthwise(x, w, stride, padding, dilation)
        if x.dtype == torch.int64:
            return conv2d(x, w, stride, padding, dilation, groups)  # int64 matrix products
        return F.conv2d(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)

    return conv, reduction, groups > 1 and wshape[1] == 1 and wshape[0] == groups


def linear_op(step: Step, limbs: bool = False) -> arith.LinearOp:
    """The ring operator of a linear step; `limbs` selects float64 limb products (CUDA)."""
    op, reduction, elementwise = _bilinear(step)
    return ring_op(op, reduction, limbs and not elementwise)


def low_linear_op(step: Step, bits: int, limbs: bool = False) -> arith.LinearOp:
    """op(e, w) mod 2^bits for e in [0, 2^bits): one float64 product where every output's sum of
    products stays exact (reduction * 2^(2 bits) <= 2^53: bits = 16 up to 2^21 terms), else the ring
    operator. Only the low `bits` bits of the result are meaningful."""
    op, reduction, _ = _bilinear(step)
    if not _low_in_float(reduction, bits):
        return linear_op(step, limbs)
    return lambda e, w: _low_product(op, e, _low_weight(w, bits))


def _low_in_float(reduction: int, bits: int) -> bool:
    """Whether op(e, w mod 2^bits), e in [0, 2^bits), is exact as one float64 product."""
    return reduction << (2 * bits) <= 1 << 53


def _low_weight(w: torch.Tensor, bits: int) -> torch.Tensor:
    return (w & ((1 << bits) - 1)).to(torch.float64)


def _low_product(op: arith.LinearOp, e: torch.Tensor, w_low: torch.Tensor) -> torch.Tensor:
    return torch.round(op(e.to(torch.float64), w_low)).to(torch.int64)


def kept_until(plan: Plan) -> dict[int, int]:
    """Truncation steps (and sigmoids, which end in one) whose randomness a later step reuses -> the
    last such step (when the dealt randomness can be let go)."""
    last: dict[int, int] = {}
    for step in plan.steps:
        for pos in kept_inputs(plan, step):
            last[step.inputs[pos]] = step.index
    return last


def _truncation_shift(step: Step) -> int | None:
    """The shift of the truncation a step's result comes from: a truncation's, or a sigmoid's last
    (`sigmoid.sigmoid_kept`, COEF_BITS); None for any other step."""
    if step.op == "trunc":
        return step.get(ShiftAttrs).shift
    if step.op == "sigmoid":
        return sigmoid.COEF_BITS
    return None


def kept_inputs(plan: Plan, step: Step) -> tuple[int, ...]:
    """Which inputs of a step come straight from a truncation whose opening the step reuses. Dealer
    and parties decide alike, from the plan.
    - a linear layer (`arith.trunc_linear`): its input, from a truncation step; or from a ReLU, in
      its masked form, where the layer is a small matrix (`takes_form`, `arith.form_linear`);
    - a product: both inputs when both come from truncations (a truncation step or a sigmoid) whose
      shifts add up to 64 or less (`arith.kept_mul`, no round; a remask, a truncation by 0, counts),
      else the one of fewer bits (`arith.trunc_mul`; never a remask);
    - a maximum (`pool.max_lastaxis`): its input, from a truncation by k <= 63 - L bits, whose
      2^(64-k) q m term vanishes below the comparison's L + 1 bits (a chained layer's truncation by
      2f - 2 = 30 bits at L = 32)."""
    if step.op == "linear":
        return (0,) if plan.steps[step.inputs[0]].op == "trunc" or takes_form(plan, step) else ()
    if step.op == "mul":
        shifts = [_truncation_shift(plan.steps[i]) for i in step.inputs]
        both = all(k is not None for k in shifts) and sum(k or 0 for k in shifts) <= 64
        kept = tuple(pos for pos, k in enumerate(shifts) if k is not None)
        if both:
            return kept
        # fewest bits; a remask (shift 0) only pairs with another truncation's result
        return tuple(sorted((pos for pos in kept if shifts[pos]), key=lambda pos: shifts[pos] or 0))[:1]
    if step.op in ("maxpool", "maxreduce"):
        src = plan.steps[step.inputs[0]]
        if src.op == "trunc" and src.get(ShiftAttrs).shift <= 63 - plan.cmp_bits:
            return (0,)
    return ()


FORM_MAX_PRODUCTS = 1 << 17  # outputs x inputs of a linear layer that takes a ReLU's form


def takes_form(plan: Plan, step: Step) -> bool:
    """Whether a linear layer takes its ReLU input in masked form, with no opening (`arith.form_linear`):
    a matrix on vectors (an fc, or a 1 x 1 conv on a 1 x 1 map: CBAM's channel MLP) of at most
    FORM_MAX_PRODUCTS weights. Its round goes; the dealer pays 3 ring elements per weight and input row
    (5, two of them mod 2^k, after a fused truncation): 0.9 MB for a 45 -> 728 layer and one crop,
    under what a round weighs (`pool.ROUND_BYTES` over `pool.DEALT_WEIGHT`: 4 MB). The bound is per
    row, so the crops of a batch keep the round saved."""
    src = plan.steps[step.inputs[0]]
    if step.op != "linear" or src.op != "relu":
        return False
    a = step.get(LinearAttrs)
    if a.kind == "fc":
        matrix = len(src.shape) == 2
    else:
        matrix = (len(src.shape) == 4 and src.shape[2:] == (1, 1) and a.wshape[2:] == (1, 1) and a.groups == 1
                  and a.stride == 1 and a.padding == 0)
    return matrix and _numel(src.shape[1:]) * step.shape[1] <= FORM_MAX_PRODUCTS


def _form_consumed(plan: Plan, step: Step) -> bool:
    """Whether a later step takes this step's result in masked form (`takes_form`)."""
    return any(s.op == "linear" and s.inputs[0] == step.index and takes_form(plan, s) for s in plan.steps)


def _matrix(step: Step, W: torch.Tensor) -> torch.Tensor:
    """A matrix layer's weights (fc: kept transposed, (in, out); a 1 x 1 conv: (out, in, 1, 1)) as (out, in)."""
    return W.t() if step.get(LinearAttrs).kind == "fc" else W.reshape(W.shape[0], -1)


def kept_input(plan: Plan, step: Step) -> int | None:
    """The one input a linear layer or a maximum reuses a truncation's opening for, or None."""
    kept = kept_inputs(plan, step)
    return kept[0] if kept else None


def kept_randomness(step: Step, R: Any) -> Any:
    """What later steps reuse of a step's randomness (`kept_until`): a truncation's mask, or the mask of
    a sigmoid's last truncation (not the rest of its randomness)."""
    return spline.kept_mask(R, _numel(step.shape)) if step.op == "sigmoid" else R


# ---------------------------------------------------------------------------------------------
# Step kinds.

# `dealt`: the randomness already dealt for earlier truncation steps, by step index, that a later
# step reuses (`kept_input`).
Deal = Callable[[Source, Step, Plan, Ctx, Weights | None, Mapping[int, Any]], Any]
Run = Callable[[Ctx, Step, list[Any], Any, Weights], Proto[Any]]


@dataclass(frozen=True)
class StepKind:
    """How one op deals its randomness, folds what is input-independent (`prepare`) and runs.

    Inputs arrive as share tensors, except those `kept_inputs` names: a truncation's
    `arith.Truncated` arrives as it is (a truncation step and a sigmoid return one), and so does a
    ReLU's `arith.AffineForm` (a ReLU returns one where a matrix layer takes it, `takes_form`)."""

    deal: Deal
    run: Run
    prepare: Callable[[Any, Step, Weights, Ctx], Any] | None = None


def shares_of(value: Any) -> torch.Tensor:
    """The shares of a step's result (a truncation's result, or a result in masked form, carries more)."""
    return value.shares if isinstance(value, (arith.Truncated, arith.AffineForm)) else value


def _none(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> None:
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


def _deal_linear(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    mask = w.mask[step.get(LinearAttrs).weight] if w is not None and src.is_dealer else torch.empty(0)
    op = linear_op(step)
    if w is not None and src.is_dealer:
        with_B = _apply(step, ctx, w, "mask")
        op = lambda a, _b: with_B(a)  # noqa: E731 - the dealer's mask B is bound (split once where limbs pay)
    if takes_form(plan, step):
        shape = _in_shape(plan, step)
        B = _matrix(step, mask) if src.is_dealer else None
        return arith.deal_form_linear(src, compare.inject_terms(dealt[step.inputs[0]]), B, shape[0],
                                      step.shape[1], _numel(shape[1:]))
    if kept_input(plan, step) is not None:
        M = dealt[step.inputs[0]]
        low = low_linear_op(step, M.shift)
        return arith.deal_trunc_linear(src, M, _in_shape(plan, step), step.shape, op, mask, low)
    return arith.deal_linear(src, _in_shape(plan, step), step.shape, op, mask)


def _prepare_linear(R: Any, step: Step, w: Weights, ctx: Ctx) -> Any:
    F_ = w.F[step.get(LinearAttrs).weight]
    with_F = _apply(step, ctx, w, "F")
    op: arith.LinearOp = lambda a, _f: with_F(a)  # noqa: E731 - F is bound (split once where limbs pay)
    if isinstance(R, arith.FormLinearRand):
        return arith.prepare_form_linear(R, _matrix(step, F_))
    if isinstance(R, arith.TruncLinearRand):
        return arith.prepare_trunc_linear(R, op, F_, low_linear_op(step, R.M.shift, ctx.limbs))
    return arith.prepare_linear(R, op, F_)


def _split_pays(step: Step, ctx: Ctx) -> bool:
    """Whether this layer's products run on float64 limbs of its split weights
    (`ringops.limb_product_split`): where limbs are asked for (CUDA, which has no int64 products;
    `--limbs` on CPU), never depthwise. On CPU the int64 matrix products are faster (`ringops`)."""
    _, reduction, elementwise = _bilinear(step)
    return ctx.limbs and not elementwise and reduction < MAX_REDUCTION


def split_weights(plan: Plan, ctx: Ctx, w: Weights) -> None:
    """Split this party's weights (wb, for the online phase) and the opened F (for preparing
    randomness) into limbs once, for the layers where that pays (`_split_pays`)."""
    for step in plan.steps:
        if step.op == "linear" and _split_pays(step, ctx):
            _apply(step, ctx, w, "wb")
            _apply(step, ctx, w, "F")


def _apply(step: Step, ctx: Ctx, w: Weights, which: str = "wb") -> arith.Apply:
    """op(., wb_i) (which = "wb"), op(., F) ("F") or, on the dealer, op(., B) ("mask") for the
    weights of a linear step."""
    key = step.get(LinearAttrs).weight
    weight = {"wb": w.wb, "F": w.F, "mask": w.mask}[which][key]
    if _split_pays(step, ctx):
        op = _bilinear(step)[0]
        cache = f"{which}:{key}"
        if cache not in w.limbs:
            w.limbs[cache] = split_limbs(weight)
        wl = w.limbs[cache]
        return lambda e: limb_product_split(op, e, wl)
    ring = linear_op(step, ctx.limbs)
    return lambda e: ring(e, weight)


def _run_linear(ctx: Ctx, step: Step, ins: list[Any], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(LinearAttrs)
    apply = _apply(step, ctx, w)
    if isinstance(R, arith.FormLinearRand):
        x = ins[0]
        if not isinstance(x, arith.AffineForm):
            raise ProtocolError(f"step {step.name}: randomness for an input in masked form, got another")
        y = yield from arith.form_linear(x, R, apply, tuple(x.shares.shape))
        y = y.reshape(step.shape)
    elif isinstance(R, arith.TruncLinearRand):
        x = ins[0]
        if not isinstance(x, arith.Truncated):
            raise ProtocolError(f"step {step.name}: randomness for a truncated input, got another")
        y = yield from arith.trunc_linear(ctx, x, R, apply, _low_apply(step, ctx, w, x.shift))
    else:
        y = yield from arith.linear(ctx, shares_of(ins[0]), R, apply)
    if a.bias:
        b = w.bias[a.bias_key]
        y = y + (b.view(1, -1, 1, 1) if a.kind == "conv" else b.view(1, -1))
    return y


def _low_apply(step: Step, ctx: Ctx, w: Weights, bits: int) -> arith.Apply:
    """e -> op(e, wb_i) mod 2^bits for e in [0, 2^bits) (`low_linear_op`). Where that is one float64
    product, wb_i mod 2^bits is kept as float64 from its first use on: converting it on every request
    cost more than the product (a 1,536 x 2,048 conv on 4 x 4: 17.6 ms against 1.9)."""
    key = step.get(LinearAttrs).weight
    op, reduction, _ = _bilinear(step)
    if not _low_in_float(reduction, bits):
        ring = linear_op(step, ctx.limbs)
        return lambda e: ring(e, w.wb[key])
    cache = f"{key}:{bits}"
    if cache not in w.low:
        w.low[cache] = _low_weight(w.wb[key], bits)
    w_low = w.low[cache]
    return lambda e: _low_product(op, e, w_low)


# truncation and non-linear steps -------------------------------------------------------------


def _run_trunc(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[arith.Truncated]:
    return (yield from arith.trunc_kept(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_relu(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[Any]:
    if R.form:  # a linear layer takes the result in masked form
        return (yield from compare.relu_form(ctx, ins[0], R, step.get(ShiftAttrs).shift))
    return (yield from compare.relu(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_sigmoid(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[arith.Truncated]:
    return (yield from sigmoid.sigmoid_kept(ctx, ins[0], R, step.get(ShiftAttrs).shift))


def _run_spline(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(SplineAttrs)
    return (yield from spline.spline(ctx, ins[0], R, spline.get(a.fn), a.shift))


def _run_piecewise(ctx: Ctx, step: Step, ins: list[torch.Tensor], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(PiecewiseAttrs)
    return (yield from piecewise.pieces(ctx, ins[0], R, a.pieces(), a.shift))


def _kept_public(x: Any, shape: tuple[int, ...]) -> tuple[torch.Tensor, pool.Kept | None]:
    """Shares of x, and (P, q) shaped as x when x is a truncation's result."""
    if isinstance(x, arith.Truncated):
        return x.shares, (x.P.view(shape), x.q.view(shape).to(torch.int64))
    return x, None


def _run_maxpool(ctx: Ctx, step: Step, ins: list[Any], R: Any, w: Weights) -> Proto[torch.Tensor]:
    a = step.get(WindowAttrs)
    x, kept = _kept_public(ins[0], tuple(shares_of(ins[0]).shape))
    if R[0] and (kept is None) != (R[0][0].kept is None):  # (a 1-wide window has no layers)
        raise ProtocolError(f"step {step.name}: randomness for another kind of input")
    return (yield from pool.maxpool2d(ctx, x, R, a.k, a.s, a.p, kept))


def _reduce_layout(in_shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[list[int], int, int]:
    keep = [d for d in range(len(in_shape)) if d not in dims]
    rows = _numel(tuple(in_shape[d] for d in keep))
    n = _numel(tuple(in_shape[d] for d in dims))
    return keep + list(dims), rows, n


def _kept_dealt(plan: Plan, step: Step, dealt: Mapping[int, Any]) -> pool.KeptDeal | None:
    """(s, m, k) of the truncation a max step reuses, shaped as its input; None if it reuses none."""
    if kept_input(plan, step) is None:
        return None
    M = dealt[step.inputs[0]]
    shape = _in_shape(plan, step)
    return M.s.view(shape), M.m.view(shape), M.shift


def _deal_maxreduce(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    perm, rows, n = _reduce_layout(_in_shape(plan, step), step.get(ReduceAttrs).dims)
    kept = _kept_dealt(plan, step, dealt)
    if kept is not None:
        kept = (kept[0].permute(perm).reshape(rows, n), kept[1].permute(perm).reshape(rows, n), kept[2])
    return pool.deal_reduce_max(src, rows, n, ctx.cmp_bits, kept)


def _prepare_maxreduce(R: list[pool.MaxRand], step: Step, w: Weights, ctx: Ctx) -> list[pool.MaxRand]:
    return [pool.prepare_max(r, ctx.party) for r in R]


def _prepare_maxpool(R: list[list[pool.MaxRand]], step: Step, w: Weights, ctx: Ctx) -> list[list[pool.MaxRand]]:
    return [_prepare_maxreduce(r, step, w, ctx) for r in R]


def _run_maxreduce(ctx: Ctx, step: Step, ins: list[Any], R: Any, w: Weights) -> Proto[torch.Tensor]:
    x, kept = _kept_public(ins[0], tuple(shares_of(ins[0]).shape))
    if R and (kept is None) != (R[0].kept is None):  # (a maximum over one value has no layers)
        raise ProtocolError(f"step {step.name}: randomness for another kind of input")
    perm, rows, n = _reduce_layout(tuple(x.shape), step.get(ReduceAttrs).dims)
    x = x.permute(perm).reshape(rows, n)
    if kept is not None:
        kept = (kept[0].permute(perm).reshape(rows, n), kept[1].permute(perm).reshape(rows, n))
    y = yield from pool.reduce_max(ctx, x, R, kept)
    return y.reshape(step.shape)


def _run_mul(ctx: Ctx, step: Step, ins: list[Any], R: Any, w: Weights) -> Proto[torch.Tensor]:
    if isinstance(R, arith.KeptMulRand):
        x, y = ins
        if not (isinstance(x, arith.Truncated) and isinstance(y, arith.Truncated)):
            raise ProtocolError(f"step {step.name}: randomness for two truncated inputs, got others")
        return (yield from arith.kept_mul(ctx, x, y, R))
    if isinstance(R, arith.TruncMulRand):
        pos = 0 if isinstance(ins[0], arith.Truncated) else 1
        x, y = ins[pos], shares_of(ins[1 - pos])
        if not isinstance(x, arith.Truncated):
            raise ProtocolError(f"step {step.name}: randomness for a truncated input, got another")
        return (yield from arith.trunc_mul(ctx, x, y, R))
    return (yield from arith.mul(ctx, shares_of(ins[0]), shares_of(ins[1]), R))


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


def _deal_trunc(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    return arith.deal_trunc(src, _numel(step.shape), step.get(ShiftAttrs).shift)


def _deal_relu(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    R = compare.deal_relu(src, _numel(step.shape), step.get(ShiftAttrs).shift, ctx.cmp_bits)
    R.form = _form_consumed(plan, step)
    return R


def _deal_sigmoid(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    return sigmoid.deal_sigmoid(src, _numel(step.shape), step.get(ShiftAttrs).shift, ctx.frac, ctx.cmp_bits)


def _deal_spline(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    a = step.get(SplineAttrs)
    return spline.deal_spline(src, _numel(step.shape), a.shift, ctx.frac, ctx.cmp_bits, spline.get(a.fn))


def _deal_piecewise(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    a = step.get(PiecewiseAttrs)
    return piecewise.deal_pieces(src, _numel(step.shape), a.shift, ctx.cmp_bits, len(a.breaks))


def _deal_maxpool(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    a = step.get(WindowAttrs)
    kept = _kept_dealt(plan, step, dealt)
    return pool.deal_maxpool(src, _in_shape(plan, step), a.k, a.s, a.p, ctx.cmp_bits, kept)


def _deal_mul(src: Source, step: Step, plan: Plan, ctx: Ctx, w: Weights | None, dealt: Mapping[int, Any]) -> Any:
    kept = kept_inputs(plan, step)
    if len(kept) == 2:
        return arith.deal_kept_mul(src, dealt[step.inputs[0]], dealt[step.inputs[1]],
                                   _in_shape(plan, step, 0), _in_shape(plan, step, 1))
    if kept:
        pos = kept[0]
        M = dealt[step.inputs[pos]]  # its mask (`kept_randomness`)
        return arith.deal_trunc_mul(src, M, _in_shape(plan, step, pos), _in_shape(plan, step, 1 - pos))
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
    "maxpool": StepKind(_deal_maxpool, _run_maxpool, _prepare_maxpool),
    "maxreduce": StepKind(_deal_maxreduce, _run_maxreduce, _prepare_maxreduce),
    "mul": StepKind(_deal_mul, _run_mul),
}
