"""SecMaxPool and maximum reductions (no argmax: inference needs only the maximum).

Max of n <= MAX_ARITY (8) values in one comparison layer: all pairwise differences x_i - x_j (i < j) are masked
and opened together (one round), their signs c_ij = [x_i >= x_j] come from the comparison tree (2
rounds), the one-hot selectors
    sel_i = prod_{j > i} c_ij * prod_{j < i} NOT c_ji        (the first maximal index wins ties)
are one fan-in-(n-1) AND round (none for n = 2), and
    max = x_(n-1) + sum_{i < n-1} sel_i * (x_i - x_(n-1))
is one bit-injection round that reuses each difference's opening as its mask. So max of 2 takes 4
rounds, max of 3 to 8 takes 5.

Max-pool k x k, stride s, padding p runs as two separable passes (rows, then columns); padding
repeats an edge element, which never changes a maximum. Global maxima reduce by up to 8 per layer:
any arity above 2 costs the same 5 rounds, but arity k opens (k-1)/2 differences per input and needs a
fan-in-(k-1) AND whose 2^(k-1) monomials the dealer deals offline; `reduce_plan` weighs the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from itertools import combinations

import torch

from secdfd.common.engine.bits import ONES, Form, Products, words_for
from secdfd.common.engine.protocols.arith import Masked, MaskRand, deal_mask, mask_open
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.protocols.compare import (
    CmpRand,
    InjectRand,
    deal_compare,
    deal_inject,
    inject,
    sign,
    tree_bits,
)
from secdfd.common.engine.randomness import Source

MAX_ARITY = 8  # a selector is a fan-in-(k-1) AND: 2^(k-1) dealer monomials per row


@cache
def _pairs(n: int) -> tuple[tuple[int, int], ...]:
    return tuple(combinations(range(n), 2))


@cache
def _selector_products(n: int) -> Products:
    """Variables: the pairs (i, j), in `_pairs` order; product i is sel_i's factors."""
    idx = {p: k for k, p in enumerate(_pairs(n))}
    prods = []
    for i in range(n - 1):
        prods.append(tuple(idx[(min(i, j), max(i, j))] for j in range(n) if j != i))
    return Products(len(idx), tuple(prods))


@dataclass
class MaxRand:
    mask: MaskRand
    cmp: CmpRand
    sel_a: torch.Tensor | None
    sel_mono: torch.Tensor | None
    inj: InjectRand


def deal_max(src: Source, rows: int, n: int, L: int) -> MaxRand:
    """Randomness for the max over the last axis (size n <= MAX_ARITY) of `rows` rows."""
    rows_p = words_for(rows) * 64
    npairs = len(_pairs(n))
    mask = deal_mask(src, npairs * rows_p, 0, L + 1)
    cmp = deal_compare(src, mask.sbits, npairs * rows_p, L)  # type: ignore[arg-type]
    sel_a = sel_mono = None
    if n > 2:
        spec = _selector_products(n)
        sel_a = src.bits("sel_a", (spec.nvars, rows_p // 64))
        sel_mono = src.bits_from("sel_m", (len(spec.monomials), rows_p // 64), lambda: spec.deal(sel_a))
    # Injection into the differences (i, n-1): their masks are slices of the pair mask.
    last = [k for k, (i, j) in enumerate(_pairs(n)) if j == n - 1]
    sub = _slice_mask(mask, last, rows_p)
    inj = deal_inject(src, (n - 1) * rows_p, sub, False)
    return MaxRand(mask, cmp, sel_a, sel_mono, inj)


def _slice_mask(mask: MaskRand, pairs: list[int], rows_p: int) -> MaskRand:
    s = mask.s.view(-1, rows_p)[pairs].reshape(-1)
    return MaskRand(mask.r, s, None, None)


def max_lastaxis(ctx: Ctx, x: torch.Tensor, R: MaxRand) -> Proto[torch.Tensor]:
    """Shares of x.max(-1) for x (..., n), n <= MAX_ARITY."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x[..., 0].numel()
    if n == 1:
        return x[..., 0]
    rows_p = words_for(rows) * 64
    xs = x.reshape(rows, n).t()
    if rows_p != rows:
        xs = torch.cat([xs, xs.new_zeros(n, rows_p - rows)], 1)
    pairs = _pairs(n)
    diffs = torch.stack([xs[i] - xs[j] for i, j in pairs]).reshape(-1)
    m = yield from mask_open(ctx, diffs, R.mask, 0)  # one round for every pair
    c = (yield from sign(ctx, m, R.cmp)).view(len(pairs), -1)  # (npairs, rows_p/64)
    if n == 2:
        sel = c
    else:
        sel = yield from _selectors(ctx, c, n, R)
    last = [k for k, (i, j) in enumerate(pairs) if j == n - 1]
    P = m.P.view(len(pairs), -1)[last].reshape(-1)
    s = m.s.view(len(pairs), -1)[last].reshape(-1)
    picked = yield from inject(ctx, sel.reshape(-1), Masked(P, s, None), R.inj)
    out = xs[n - 1] + picked.view(n - 1, rows_p).sum(0)
    return out[:rows].reshape(lead)


def _selectors(ctx: Ctx, c: torch.Tensor, n: int, R: MaxRand) -> Proto[torch.Tensor]:
    """One-hot selectors sel_0 .. sel_(n-2) as XOR-shared words (n-1, W): one fan-in AND round."""
    assert R.sel_a is not None and R.sel_mono is not None
    spec = _selector_products(n)
    mine = c ^ R.sel_a
    (peer,) = yield [mine]
    d = mine ^ peer
    pairs = _pairs(n)
    forms = []
    for i, prod in zip(range(n - 1), spec.products, strict=True):
        f = []
        for v in prod:
            a, b = pairs[v]
            # c_ab = [x_a >= x_b]; sel_i wants c_ij for j > i and NOT c_ji for j < i.
            f.append(Form(d[v] if a == i else d[v] ^ ONES, None))
        forms.append(f)
    return torch.stack(spec.evaluate(forms, R.sel_a, R.sel_mono, ctx.party))


# ---------------------------------------------------------------------------------------------
# Windows and reductions.


COMPARE_BITS = 40  # the comparison width the cost model assumes (ctx.cmp_bits by default)


def layer_rounds(k: int) -> int:
    """Rounds of one max-of-k layer: open, 2 tree rounds, (selector AND if k > 2), inject."""
    return 4 if k == 2 else 5


ROUND_BYTES = 200_000  # one round weighs as much as 200 kB per server: 1 Gbit/s at 1.6 ms RTT


def layer_cost(rows: int, n: int, k: int) -> tuple[int, int]:
    """(bytes per server, rounds) of one max-of-k layer over `rows` rows of n values: per pair an
    8-byte opening and its tree bits, then the selector bits (k > 2) and k - 1 injected bits, all
    bit-packed over rows padded to a multiple of 64."""
    rp = words_for(rows * ((n + k - 1) // k)) * 64
    p = k * (k - 1) // 2
    return 8 * rp * p + rp // 8 * (p * tree_bits(COMPARE_BITS) + (p if k > 2 else 0) + k - 1), layer_rounds(k)


@cache
def _best_plan(rows: int, n: int) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """((weighted cost, bytes, rounds), arities) of the cheapest reduction of n values to one."""
    if n <= 1:
        return (0, 0, 0), ()
    cands = []
    for k in range(2, min(n, MAX_ARITY) + 1):
        b, r = layer_cost(rows, n, k)
        (t, bb, rr), rest = _best_plan(rows, (n + k - 1) // k)
        cands.append(((t + b + ROUND_BYTES * r, bb + b, rr + r), (k, *rest)))
    return min(cands)


def reduce_plan(n: int, rows: int = 1) -> list[int]:
    """Arity of each layer that reduces n values (in each of `rows` rows) to one.

    Any arity above 2 costs the same 5 rounds, but arity k opens (k-1)/2 differences per input. The
    plan minimises bytes + ROUND_BYTES * rounds (exactly, over all arity sequences up to MAX_ARITY):
    small reductions take wide layers (an 8 x 8 map over 728 channels: 8, 8, 10 rounds instead of
    15), large ones stay narrow where bytes dominate. Over DFDNet this cuts both the bytes and the
    rounds of the max-of-4 layers it replaces.
    """
    return list(_best_plan(rows, n)[1])


def _pad_last(x: torch.Tensor, k: int) -> torch.Tensor:
    """Pad the last axis to a multiple of k by repeating its last element, then split it."""
    n = x.shape[-1]
    pad = (-n) % k
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1)
    return x.reshape(*x.shape[:-1], -1, k)


def deal_reduce_max(src: Source, rows: int, n: int, L: int) -> list[MaxRand]:
    out = []
    for i, k in enumerate(reduce_plan(n, rows)):
        n = (n + k - 1) // k
        out.append(deal_max(src.child(f"r{i}"), rows * n, k, L))
    return out


def reduce_max(ctx: Ctx, x: torch.Tensor, R: list[MaxRand]) -> Proto[torch.Tensor]:
    """Max over the last axis of any size, by the layers of `reduce_plan`."""
    for k, r in zip(reduce_plan(x.shape[-1], x[..., 0].numel()), R, strict=True):
        x = yield from max_lastaxis(ctx, _pad_last(x, k), r)
    return x[..., 0] if x.dim() and x.shape[-1] == 1 else x


def windows(x: torch.Tensor, k: int, s: int, p: int, dim: int) -> torch.Tensor:
    """Sliding windows of size k, stride s, padding p (edge repeated) along dim, as a new last axis."""
    x = x.movedim(dim, -1)
    if p:
        x = torch.cat([x[..., :1].expand(*x.shape[:-1], p), x, x[..., -1:].expand(*x.shape[:-1], p)], -1)
    w = x.unfold(-1, k, s)  # (..., out, k)
    return w.movedim(-2, dim if dim >= 0 else dim - 1)


def pool_plan(shape: tuple[int, ...], k: int, s: int, p: int) -> list[tuple[int, int]]:
    """(rows, window) of the row pass and the column pass of a max-pool over NCHW `shape`."""
    N, C, H, W = shape
    Wo = (W + 2 * p - k) // s + 1
    Ho = (H + 2 * p - k) // s + 1
    return [(N * C * H * Wo, k), (N * C * Ho * Wo, k)]


def deal_maxpool(src: Source, shape: tuple[int, ...], k: int, s: int, p: int, L: int) -> list[list[MaxRand]]:
    return [deal_reduce_max(src.child(f"pass{i}"), rows, n, L) for i, (rows, n) in enumerate(pool_plan(shape, k, s, p))]


def maxpool2d(ctx: Ctx, x: torch.Tensor, R: list[list[MaxRand]], k: int, s: int, p: int) -> Proto[torch.Tensor]:
    """SecMaxPool: rows, then columns. For 3x3/2 that is 10 rounds."""
    y = yield from reduce_max(ctx, windows(x, k, s, p, -1), R[0])
    y = yield from reduce_max(ctx, windows(y, k, s, p, -2), R[1])
    return y
