"""SecMaxPool and maximum reductions (no argmax: inference needs only the maximum).

Max of n <= MAX_ARITY (12) values in one comparison layer: all pairwise differences x_i - x_j (i < j) are masked
and opened together (one round), their signs c_ij = [x_i >= x_j] come from the comparison tree (one
round), the one-hot selectors
    sel_i = prod_{j > i} c_ij * prod_{j < i} NOT c_ji        (the first maximal index wins ties)
are one fan-in-(n-1) AND round (none for n = 2), and
    max = x_(n-1) + sum_{i < n-1} sel_i * (x_i - x_(n-1))
is one bit-injection round that reuses each difference's opening as its mask. So max of 2 takes 3
rounds, max of 3 to 12 takes 4 (one fewer over a truncation's result, whose differences need no opening).

From 4 values up the layer opens the values, not the differences: each x_i + r_i once (8 bytes),
and x_i - x_j = (P_i - P_j) - (r_i - r_j), whose mask's bit planes the dealer deals as it does for
a truncation's result. n openings instead of n(n-1)/2 (a max-of-12 sends 8 bytes per value, not
44); every opened value is masked by a fresh uniform r_i, and every later opening of the layer
(the tree's bits, the selectors, the injection) by fresh dealer bits, so nothing more is revealed.

Max-pool k x k, stride s, padding p runs as two separable passes (rows, then columns); padding
repeats an edge element, which never changes a maximum. Global maxima reduce by up to 12 per layer:
any arity above 2 costs the same 4 rounds, but arity k opens (k-1)/2 differences per input (k <= 3; one
value per input from 4 up), compares (k-1)/2 pairs per input and needs a
fan-in-(k-1) AND whose monomials (about (k-1) 2^(k-1) bits per row) the dealer deals offline;
`reduce_plan` weighs the three.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cache
from itertools import combinations

import torch

from secdfd.common.engine.bits import ONES, Form, Products, planes, unpack, words_for
from secdfd.common.engine.protocols.arith import Masked, MaskRand, deal_mask, mask_open
from secdfd.common.engine.protocols.base import Ctx, Proto, open_sum
from secdfd.common.engine.protocols.compare import (
    CmpRand,
    InjectRand,
    deal_compare,
    deal_inject,
    inject,
    injected,
    open_bits,
    sign,
    tree_bits,
    tree_rounds,
)
from secdfd.common.engine.randomness import Source
from secdfd.common.errors import RandomnessError

MAX_ARITY = 12  # a selector is a fan-in-(k-1) AND: 22,396 dealt monomials per row at 12


def opens_values(n: int) -> bool:
    """Whether a max-of-n layer opens its n values (n >= 4) rather than its n(n-1)/2 differences."""
    return n > 3


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
class KeptRand:
    """A first max layer over a truncation's result x = P - s + 2^(64-k) q m: the m shares of each
    difference (i, n-1) as laid out for injection, and shares of beta * m of both, mod 2^k."""

    mi: torch.Tensor
    mj: torch.Tensor
    beta_mi: torch.Tensor
    beta_mj: torch.Tensor
    shift: int


@dataclass
class MaxRand:
    mask: MaskRand
    cmp: CmpRand
    sel_a: torch.Tensor | None
    sel_mono: torch.Tensor | None
    inj: InjectRand
    kept: KeptRand | None = None
    sel_table: torch.Tensor | None = None  # sel_a and sel_mono laid out for the selectors (`prepare_max`)


KeptDeal = tuple[torch.Tensor, torch.Tensor, int]  # a truncation's s and m laid out as its input, and k
Kept = tuple[torch.Tensor, torch.Tensor]  # the public P and q (0/1) of a truncation, laid out as its input


def _columns(x: torch.Tensor, rows_p: int) -> torch.Tensor:
    """(..., n) -> (n, rows_p): one column per row, zero padded to rows_p."""
    n = x.shape[-1]
    xs = x.reshape(-1, n).t()
    if xs.shape[1] != rows_p:
        xs = torch.cat([xs, xs.new_zeros(n, rows_p - xs.shape[1])], 1)
    return xs


def _pair_diffs(xs: torch.Tensor, n: int) -> torch.Tensor:
    return torch.stack([xs[i] - xs[j] for i, j in _pairs(n)]).reshape(-1)


def deal_max(src: Source, rows: int, n: int, L: int, kept: KeptDeal | None = None) -> MaxRand:
    """Randomness for the max over the last axis (size n <= MAX_ARITY) of `rows` rows.

    kept = (s, m, k), laid out as the input (..., n): the input is a truncation's result, whose s
    masks every difference already (no opening: the dealer deals the bit planes of s_i - s_j)."""
    rows_p = words_for(rows) * 64
    npairs = len(_pairs(n))
    if kept is None and opens_values(n):
        r = src.ring("r", (n * rows_p,))
        sp = _pair_diffs(r.view(n, rows_p), n)
        sbits = src.bits_from("sbits", (L + 1, words_for(npairs * rows_p)), lambda: planes(sp, 0, L + 1))
        mask = MaskRand(r, sp, None, sbits)
    elif kept is None:
        mask = deal_mask(src, npairs * rows_p, 0, L + 1)
    else:
        sp = _pair_diffs(_columns(kept[0], rows_p), n)
        sbits = src.bits_from("sbits", (L + 1, words_for(npairs * rows_p)), lambda: planes(sp, 0, L + 1))
        mask = MaskRand(sp, sp, None, sbits)
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
    k_rand = None
    if kept is not None:
        mx, k = _columns(kept[1], rows_p), kept[2]
        mi = mx[: n - 1].reshape(-1)
        mj = mx[n - 1].repeat(n - 1)
        N = (n - 1) * rows_p
        bmi = src.ring_from("beta_mi", (N,), lambda: unpack(inj.beta, N) * mi, bits=k)
        bmj = src.ring_from("beta_mj", (N,), lambda: unpack(inj.beta, N) * mj, bits=k)
        k_rand = KeptRand(mi, mj, bmi, bmj, k)
    return MaxRand(mask, cmp, sel_a, sel_mono, inj, k_rand)


def _slice_mask(mask: MaskRand, pairs: list[int], rows_p: int) -> MaskRand:
    s = mask.s.view(-1, rows_p)[pairs].reshape(-1)
    return MaskRand(mask.r, s, None, None)


def max_lastaxis(ctx: Ctx, x: torch.Tensor, R: MaxRand, kept: Kept | None = None) -> Proto[torch.Tensor]:
    """Shares of x.max(-1) for x (..., n), n <= MAX_ARITY.

    With `kept` (x is a truncation's result P - s + 2^(64-k) q m) the differences need no opening:
    each is (P_i - P_j) - (s_i - s_j) + 2^(64-k) (q_i m_i - q_j m_j), its sign comes from the
    public P_i - P_j and the dealt bit planes of s_i - s_j (the last term vanishes mod 2^(L+1)), and
    the injection adds b * q m from dealt beta * m. One round and 8 bytes per pair fewer."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x[..., 0].numel()
    if n == 1:
        return x[..., 0]
    rows_p = words_for(rows) * 64
    xs = _columns(x, rows_p)
    pairs = _pairs(n)
    if kept is None and opens_values(n):
        c = yield from open_sum(xs.reshape(-1) + R.mask.r)  # one round, each value once
        m = Masked(_pair_diffs(c.view(n, rows_p), n), R.mask.s, R.mask.sbits)
    elif kept is None:
        m = yield from mask_open(ctx, _pair_diffs(xs, n), R.mask, 0)  # one round for every pair
    else:
        m = Masked(_pair_diffs(_columns(kept[0], rows_p), n), R.mask.s, R.mask.sbits)
    c = (yield from sign(ctx, m, R.cmp)).view(len(pairs), -1)  # (npairs, rows_p/64)
    if n == 2:
        sel = c
    else:
        sel = yield from _selectors(ctx, c, n, R)
    last = [k for k, (i, j) in enumerate(pairs) if j == n - 1]
    P = m.P.view(len(pairs), -1)[last].reshape(-1)
    s = m.s.view(len(pairs), -1)[last].reshape(-1)
    if kept is None:
        picked = yield from inject(ctx, sel.reshape(-1), Masked(P, s, None), R.inj)
    else:
        K = R.kept
        assert K is not None
        d = yield from open_bits(ctx, sel.reshape(-1), R.inj, P.numel())
        qx = _columns(kept[1], rows_p)
        qi, qj = qx[: n - 1].reshape(-1), qx[n - 1].repeat(n - 1)
        f = 1 - 2 * d
        low = qi * (d * K.mi + f * K.beta_mi) - qj * (d * K.mj + f * K.beta_mj)
        picked = injected(ctx, d, Masked(P, s, None), R.inj) + (low << (64 - K.shift))
    out = xs[n - 1] + picked.view(n - 1, rows_p).sum(0)
    return out[:rows].reshape(lead)


def prepare_max(R: MaxRand, party: int) -> MaxRand:
    """Offline (a server's `prepare`): the selectors' shares of every dealt product, gathered into the
    layout their one evaluation reads (`Products.stacked_table`), in place of the monomials."""
    if R.sel_a is None or R.sel_mono is None:
        return R
    arity = {len(_pairs(k)): k for k in range(3, MAX_ARITY + 1)}.get(R.sel_a.shape[0])
    if arity is None:
        raise RandomnessError(f"selector randomness of {R.sel_a.shape[0]} pairs fits no max layer")
    table = _selector_products(arity).stacked_table(R.sel_a, R.sel_mono, party)
    return dataclasses.replace(R, sel_mono=None, sel_table=table)


def _selectors(ctx: Ctx, c: torch.Tensor, n: int, R: MaxRand) -> Proto[torch.Tensor]:
    """One-hot selectors sel_0 .. sel_(n-2) as XOR-shared words (n-1, W): one fan-in AND round."""
    if R.sel_a is None or (R.sel_mono is None and R.sel_table is None):
        raise RandomnessError("a max layer's selector randomness is missing or was already used")
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
    if R.sel_table is not None:
        table, R.sel_table = R.sel_table, None  # reduced in place: this randomness is used once
        return torch.stack(spec.evaluate_stacked(forms, table))
    assert R.sel_mono is not None  # (checked above)
    return torch.stack(spec.evaluate(forms, R.sel_a, R.sel_mono, ctx.party))


# ---------------------------------------------------------------------------------------------
# Windows and reductions.


COMPARE_BITS = 40  # the comparison width the cost model assumes (ctx.cmp_bits by default)


def layer_rounds(k: int, kept: bool = False, n: int = 1) -> int:
    """Rounds of one max-of-k layer of n comparisons: open (none over a truncation's result), the tree
    (one round, two for the largest layers: `compare.one_round`), (selector AND if k > 2), inject."""
    return (0 if kept else 1) + tree_rounds(COMPARE_BITS, n) + (k > 2) + 1


ROUND_BYTES = 200_000  # one round weighs as much as 200 kB per server: 1 Gbit/s at 1.6 ms RTT


def layer_cost(rows: int, n: int, k: int, kept: bool = False) -> tuple[int, int]:
    """(bytes per server, rounds) of one max-of-k layer over `rows` rows of n values: an 8-byte
    opening per pair (k <= 3) or per value (k >= 4; none over a truncation's result), each pair's
    tree bits, then the selector bits (k > 2) and k - 1 injected bits, all bit-packed over rows
    padded to a multiple of 64."""
    rp = words_for(rows * ((n + k - 1) // k)) * 64
    p = k * (k - 1) // 2
    bits = rp // 8 * (p * tree_bits(COMPARE_BITS, rp * p) + (p if k > 2 else 0) + k - 1)
    return (0 if kept else 8 * rp * (k if opens_values(k) else p)) + bits, layer_rounds(k, kept, rp * p)


# A dealt byte weighs 1/20 of an online byte: it travels ahead of the request, but the dealer makes it
# and the servers hold it. Without a weight the widest arity would win wherever it saves a round.
DEALT_WEIGHT = 0.05


def layer_dealt(rows: int, n: int, k: int) -> int:
    """Bytes the dealer sends for the selector monomials of one max-of-k layer over `rows` rows of n
    values (one server's correction; the other's come from its seed): the part of a layer's
    randomness that grows as 2^(k-1)."""
    return 0 if k <= 2 else words_for(rows * ((n + k - 1) // k)) * 8 * len(_selector_products(k).monomials)


@cache
def _best_plan(rows: int, n: int, kept: bool = False) -> tuple[tuple[float, int, int], tuple[int, ...]]:
    """((weighted cost, bytes, rounds), arities) of the cheapest reduction of n values to one."""
    if n <= 1:
        return (0.0, 0, 0), ()
    cands = []
    for k in range(2, min(n, MAX_ARITY) + 1):
        b, r = layer_cost(rows, n, k, kept)
        (t, bb, rr), rest = _best_plan(rows, (n + k - 1) // k)
        cands.append(((t + b + ROUND_BYTES * r + DEALT_WEIGHT * layer_dealt(rows, n, k), bb + b, rr + r), (k, *rest)))
    return min(cands)


def reduce_plan(n: int, rows: int = 1, kept: bool = False) -> list[int]:
    """Arity of each layer that reduces n values (in each of `rows` rows) to one.

    Any arity above 2 costs the same 4 rounds; arity k opens (k-1)/2 differences per input up to k = 3
    and one value per input from 4 up, compares (k-1)/2 pairs per input, and its selectors' dealt
    monomials grow as 2^(k-1). The plan minimises bytes + ROUND_BYTES * rounds + DEALT_WEIGHT *
    dealt selector bytes (exactly, over all arity sequences up to MAX_ARITY): small reductions take
    wide layers (the spatial max of an 8 x 8 map, 728 rows: layers of 8 and 8 in 8 rounds; the channel
    max over 728 channels after a truncation, 64 rows: 7, 9 and 12 in 11 rounds, 14 with layers up to
    8), large ones stay narrower where bytes dominate. `kept`: the input is a truncation's result,
    whose first layer opens nothing but its comparison bits."""
    return list(_best_plan(rows, n, kept)[1])


def _pad_last(x: torch.Tensor, k: int) -> torch.Tensor:
    """Pad the last axis to a multiple of k by repeating its last element, then split it."""
    n = x.shape[-1]
    pad = (-n) % k
    if pad:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], -1)
    return x.reshape(*x.shape[:-1], -1, k)


def deal_reduce_max(src: Source, rows: int, n: int, L: int, kept: KeptDeal | None = None) -> list[MaxRand]:
    """`kept`: (s, m, k) of a truncation whose result is the input, laid out (rows, n)."""
    out = []
    for i, k in enumerate(reduce_plan(n, rows, kept is not None)):
        n = (n + k - 1) // k
        first = None if kept is None or i else (_pad_last(kept[0], k), _pad_last(kept[1], k), kept[2])
        out.append(deal_max(src.child(f"r{i}"), rows * n, k, L, first))
    return out


def reduce_max(ctx: Ctx, x: torch.Tensor, R: list[MaxRand], kept: Kept | None = None) -> Proto[torch.Tensor]:
    """Max over the last axis of any size, by the layers of `reduce_plan`; `kept` (the first layer's
    input is a truncation's result): its public P and q, laid out as x."""
    plan = reduce_plan(x.shape[-1], x[..., 0].numel(), kept is not None)
    for i, (k, r) in enumerate(zip(plan, R, strict=True)):
        first = None if kept is None or i else (_pad_last(kept[0], k), _pad_last(kept[1], k))
        x = yield from max_lastaxis(ctx, _pad_last(x, k), r, first)
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


def deal_maxpool(src: Source, shape: tuple[int, ...], k: int, s: int, p: int, L: int,
                 kept: KeptDeal | None = None) -> list[list[MaxRand]]:
    """`kept`: (s, m, k) of a truncation whose result (of `shape`) is the input."""
    (rows0, n0), (rows1, n1) = pool_plan(shape, k, s, p)
    first = None if kept is None else (windows(kept[0], k, s, p, -1), windows(kept[1], k, s, p, -1), kept[2])
    return [deal_reduce_max(src.child("pass0"), rows0, n0, L, first),
            deal_reduce_max(src.child("pass1"), rows1, n1, L)]


def maxpool2d(ctx: Ctx, x: torch.Tensor, R: list[list[MaxRand]], k: int, s: int, p: int,
              kept: Kept | None = None) -> Proto[torch.Tensor]:
    """SecMaxPool: rows, then columns. For 3x3/2 that is 8 rounds (7 when x is a truncation's
    result, `kept`: its P and q, shaped as x)."""
    first = None if kept is None else (windows(kept[0], k, s, p, -1), windows(kept[1], k, s, p, -1))
    y = yield from reduce_max(ctx, windows(x, k, s, p, -1), R[0], first)
    y = yield from reduce_max(ctx, windows(y, k, s, p, -2), R[1])
    return y
