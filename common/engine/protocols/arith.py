"""Arithmetic protocols on additive shares in Z_2^64: masking, truncation, Beaver products and
linear layers with secret weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from secdfd.common.engine.bits import planes, unpack, words_for
from secdfd.common.engine.driver import gather
from secdfd.common.engine.protocols.base import Ctx, Proto, open_sum
from secdfd.common.engine.randomness import Source
from secdfd.common.engine.ring import lshr, msb

OFFSET_BITS = 62  # truncation shifts x into y = x + 2^62, valid for |x| < 2^62


# ---------------------------------------------------------------------------------------------
# Masked openings: the common first round of truncation and comparison.


@dataclass
class MaskRand:
    """Dealer mask r for one masked opening. With shift k > 0 the opening also truncates by k:
    s = r >> k and m = msb(r); with bits, XOR-shared bit planes of s (for comparisons)."""

    r: torch.Tensor
    s: torch.Tensor
    m: torch.Tensor | None
    sbits: torch.Tensor | None
    shift: int = 0


def deal_mask(src: Source, n: int, shift: int, nbits: int) -> MaskRand:
    """Randomness for `mask_open` of n elements; nbits > 0 adds the bit planes of s (low nbits)."""
    r = src.ring("r", (n,))
    if shift:
        s = src.ring_from("s", (n,), lambda: lshr(r, shift))
        # m only ever appears as 2^(64 - shift) * m, so its shares matter mod 2^shift
        m: torch.Tensor | None = src.ring_from("m", (n,), lambda: msb(r), bits=shift)
    else:
        s, m = r, None
    sbits = None
    if nbits:
        sbits = src.bits_from("sbits", (nbits, words_for(n)), lambda: planes(r, shift, nbits))
    return MaskRand(r, s, m, sbits, shift)


@dataclass
class Masked:
    """A shared value x in the form x = P - s + Q*m (mod 2^64) after one opening.

    P and Q are public; s, m are dealer values of which this party holds shares (and XOR shares
    of the bit planes of s). Comparisons and bit injections work on this form with no further
    opening of x.
    """

    P: torch.Tensor
    s: torch.Tensor
    sbits: torch.Tensor | None
    Q: torch.Tensor | None = None
    m: torch.Tensor | None = None

    def share(self, party: int) -> torch.Tensor:
        """This party's additive share of x."""
        out = -self.s if party else self.P - self.s
        if self.Q is not None and self.m is not None:
            out = out + self.Q * self.m
        return out


def open_bits(shift: int) -> int:
    """Bits per element `mask_open` opens: 64, or the bits above a truncation's shift (48 for 16)."""
    return 64 - shift


def _packed(nb: int, n: int) -> bool:
    """Whether the nb % 8 bits past the last whole byte of n elements travel as bit planes (whole
    64-element words) rather than as one more byte each: only where that is smaller."""
    return nb % 8 > 0 and nb % 8 * 8 * words_for(n) < n


def open_nbytes(shift: int, n: int) -> int:
    """Bytes one party sends to `mask_open` n elements: the whole bytes of `open_bits` per element,
    and the bits past the last whole byte bit-packed where that is smaller (`high_bytes`): 6 n for a
    16-bit shift, 4.25 n for a 30-bit one (to whole 64-element words; 5 n below 17 elements)."""
    nb = open_bits(shift)
    if _packed(nb, n):
        return nb // 8 * n + nb % 8 * 8 * words_for(n)
    return (nb + 7) // 8 * n


_PIECES = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _piece_widths(nb: int) -> list[int]:
    """nb bytes as pieces of 4, 2 and 1 bytes, low bytes first (6 -> [4, 2])."""
    out = []
    for w in (4, 2, 1):
        while nb >= w:
            out.append(w)
            nb -= w
    return out


def high_bytes(v: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The bits k..63 of each int64 element of a flat v: whole bytes as integer tensors of 4, 2 and 1
    bytes, and the bits past the last whole byte as bit planes (`bits.planes`) where that is smaller
    (`_packed`), else as one more byte. For k = 16: an int32 of bits 16..47 and an int16 of bits
    48..63; for k = 30: an int32 of bits 30..61 and two planes of bits 62 and 63 (34 bits in 4.25
    bytes), or for short tensors an int32 and a uint8."""
    h = lshr(v, k)
    nb = open_bits(k)
    packed = _packed(nb, v.numel())
    out, at = [], 0
    for w in _piece_widths(nb // 8 if packed else (nb + 7) // 8):
        out.append((h >> at).to(_PIECES[w]))  # keeps the low 8 w bits (two's complement)
        at += 8 * w
    if packed:
        out.append(planes(h, at, nb % 8))
    return out


def from_high_bytes(pieces: list[torch.Tensor], n: int) -> torch.Tensor:
    """Inverse of `high_bytes` for n elements: the int64 values (bits k..63 shifted down)."""
    h = torch.zeros(n, dtype=torch.int64, device=pieces[0].device)
    at = 0
    for p in pieces:
        if p.dim() == 2:  # bit planes of the bits left over
            for j, plane in enumerate(unpack(p, n)):
                h |= plane << (at + j)
            at += p.shape[0]
            continue
        w = p.element_size()
        h |= (p.to(torch.int64) & ((1 << (8 * w)) - 1)) << at
        at += 8 * w
    return h


def mask_open(ctx: Ctx, x: torch.Tensor, R: MaskRand, shift: int) -> Proto[Masked]:
    """Open x + r for a flat shared x (one round, 8 bytes per element; `open_nbytes` with a shift).

    shift = 0: P = c = x + r, so x = P - r exactly.
    shift = k: truncation to one unit in the last place. y = x + 2^62 lies in [0, 2^63) for
    |x| < 2^62; c = y + r. The wrap of y + r past 2^64 is exactly msb(r)*(1 - msb(c)), so
    y >> k = (c >> k) - (r >> k) + 2^(64-k)*(1 - msb(c))*msb(r) - borrow, borrow in {0, 1}.
    Only c >> k is used, so each party sends only the bits k..63 of its y_i + r_i; their sum is
    (c >> k) - carry mod 2^(64-k), carry in {0, 1} from the low bits. Dropping borrow and carry
    gives x >> k within one unit either way. Where the carry could change msb(c) or wrap (the sum
    is 2^(63-k) - 1 or 2^(64-k) - 1: about 2^-47 per element for k = 16), one more round opens those
    elements' low bits and the carry is added exactly, so there is never a large error.
    """
    if shift == 0:
        c = yield from open_sum(x + R.r)
        return Masked(c, R.s, R.sbits)
    k = shift
    y = x + (1 << OFFSET_BITS) if ctx.party == 0 else x
    v = y + R.r
    peer = yield high_bytes(v, k)
    top = (1 << (64 - k)) - 1
    H = (lshr(v, k) + from_high_bytes(peer, v.numel())) & top
    edge = torch.eq(H, top) | torch.eq(H, top >> 1)
    if bool(edge.any()):  # both parties see the same H, so both take this round or neither
        at = edge.nonzero().view(-1)
        low = v[at] & ((1 << k) - 1)
        (peer_low,) = yield [low]
        H[at] = (H[at] + ((low + peer_low) >> k)) & top
    P = H - (1 << (OFFSET_BITS - k))
    Q = (1 - lshr(H, 63 - k)) << (64 - k)
    return Masked(P, R.s, R.sbits, Q, R.m)


def deal_trunc(src: Source, n: int, shift: int) -> MaskRand:
    return deal_mask(src, n, shift, 0)


def trunc(ctx: Ctx, x: torch.Tensor, R: MaskRand, shift: int) -> Proto[torch.Tensor]:
    """Shares of x / 2^shift (floor, within one unit). One round, `open_nbytes(shift, n)` bytes for
    n elements (6 per element for a 16-bit shift, 4.25 for a 30-bit one)."""
    m = yield from mask_open(ctx, x.reshape(-1), R, shift)
    return m.share(ctx.party).reshape(x.shape)


@dataclass
class Truncated:
    """A truncation's result: this party's shares of y = x / 2^k, and the public part of the form
    y = P - s + 2^(64-k) q m it came from (q = 1 - msb(c), one bit per element).

    A linear layer or a product whose input is y need not open y again: with the truncation's own s
    as its input mask, only the bits q m remain secret, and they matter mod 2^k (`open_low`)."""

    shares: torch.Tensor
    P: torch.Tensor  # flat
    q: torch.Tensor  # flat, bool
    shift: int


def trunc_kept(ctx: Ctx, x: torch.Tensor, R: MaskRand, shift: int) -> Proto[Truncated]:
    """`trunc`, keeping the public part of the opening for consumers that reuse it. A shift of 0 is a
    remask: x + r opened under a fresh uniform r (8 bytes per element), x = P - r, no q m term; a
    product of it and another truncation's result is then local (`kept_mul`)."""
    m = yield from mask_open(ctx, x.reshape(-1), R, shift)
    if shift == 0:
        return Truncated(m.share(ctx.party).reshape(x.shape), m.P, torch.zeros_like(m.P, dtype=torch.bool), 0)
    assert m.Q is not None
    return Truncated(m.share(ctx.party).reshape(x.shape), m.P, m.Q != 0, shift)


def low_dtype(bits: int) -> torch.dtype:
    """The smallest wire type that holds a value mod 2^bits."""
    return torch.int16 if bits <= 16 else torch.int32 if bits <= 32 else torch.int64


def open_low(x: torch.Tensor, bits: int) -> Proto[torch.Tensor]:
    """Open an additively shared value mod 2^bits (one round, bits/8 bytes per element, rounded up to
    2, 4 or 8); the result lies in [0, 2^bits)."""
    mask = (1 << bits) - 1 if bits < 64 else -1
    mine = (x & mask).to(low_dtype(bits))  # the low bits, two's complement
    (peer,) = yield [mine]
    return (mine.to(torch.int64) + peer.to(torch.int64)) & mask


def _low_term(t: Truncated, M: MaskRand, a2: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """This party's shares, mod 2^k, of q m - a2 (what a fused consumer opens)."""
    assert M.m is not None
    return torch.where(t.q, M.m, 0).reshape(shape) - a2


# ---------------------------------------------------------------------------------------------
# A result in masked form, and small linear layers on it with no opening.


@dataclass
class AffineForm:
    """A step's result y = const + sum_t coefs[t] * T_t (element-wise, flat), where const and the
    coefs are public (the same on both parties) and the T_t are dealer values whose shares the
    producing step's randomness holds: what a bit injection leaves (a ReLU's output). A consumer
    that knows the T_t's order (`compare.inject_terms`) need not open y again (`form_linear`)."""

    shares: torch.Tensor
    const: torch.Tensor
    coefs: list[torch.Tensor]


FormTerms = list[tuple[torch.Tensor, int]]  # the T_t (dealer: values, party: shares) and the bits they matter to


@dataclass
class FormLinearRand:
    """A linear map W (O x I) on an `AffineForm` input of N rows: shares of G_t = B (x) T_t, (N, O, I) for
    each term (B: the dealer's weight mask), folded at `prepare_form_linear` into H_t = F (x) T_t_i + G_t_i,
    shares of W (x) T_t. `terms` (this party's shares of the T_t, (N, I)) is dropped once folded."""

    H: list[torch.Tensor]
    terms: list[torch.Tensor] | None


def deal_form_linear(src: Source, terms: FormTerms, B: torch.Tensor | None, rows: int, outs: int,
                     ins: int) -> FormLinearRand:
    """`B`: the dealer's weight mask as an (O, I) matrix; None on a party. Terms that matter mod
    2^bits (a truncation's m) are dealt mod 2^bits: their coefficients carry 2^(64 - bits)."""
    def product(T: torch.Tensor) -> Callable[[], torch.Tensor]:
        def value() -> torch.Tensor:
            assert B is not None  # only the dealer computes it
            return B.unsqueeze(0) * T.unsqueeze(1)

        return value

    Ts = [T.reshape(rows, ins) for T, _ in terms]
    H = [src.ring_from(f"G{t}", (rows, outs, ins), product(T), bits=bits)
         for t, (T, (_, bits)) in enumerate(zip(Ts, terms, strict=True))]
    return FormLinearRand(H, Ts)


def prepare_form_linear(R: FormLinearRand, F: torch.Tensor) -> FormLinearRand:
    """Party: H_t = F (x) T_t_i + G_t_i with F the opened W - B as an (O, I) matrix."""
    assert R.terms is not None
    return FormLinearRand([G + F.unsqueeze(0) * T.unsqueeze(1) for G, T in zip(R.H, R.terms, strict=True)], None)


def form_linear(x: AffineForm, R: FormLinearRand, apply: Apply, in_shape: tuple[int, ...]) -> Proto[torch.Tensor]:
    """W y for y = const + sum_t c_t T_t (`AffineForm`), with NO round and no byte:
        W y = op(const, wb_i) summed over the parties + sum_t sum_i c_t[i] (W[o, i] T_t[i]),
    the first local (const public, wb_0 + wb_1 = W), the second local given H_t, shares of W (x) T_t.
    Nothing is opened. Returns (rows, O); exact in the ring."""
    if False:  # a generator that never communicates
        yield []
    rows, ins = R.H[0].shape[0], R.H[0].shape[2]
    out = apply(x.const.reshape(in_shape)).reshape(rows, -1)
    for c, H in zip(x.coefs, R.H, strict=True):
        out = out + (c.reshape(rows, 1, ins) * H).sum(-1)
    return out


# ---------------------------------------------------------------------------------------------
# Beaver products.


@dataclass
class MulRand:
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor


def deal_mul(src: Source, xshape: tuple[int, ...], yshape: tuple[int, ...]) -> MulRand:
    a = src.ring("a", xshape)
    b = src.ring("b", yshape)
    oshape = tuple(torch.broadcast_shapes(xshape, yshape))  # type: ignore[no-untyped-call]
    c = src.ring_from("c", oshape, lambda: a * b)
    return MulRand(a, b, c)


@dataclass
class TruncMulRand:
    """Beaver randomness for x * y where x comes from a truncation with mask rand M: x's mask is
    a = -s (the truncation's, so x is never opened again), a2 masks q m mod 2^k, c2 = a2 * b."""

    M: MaskRand
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    a2: torch.Tensor
    c2: torch.Tensor


def deal_trunc_mul(src: Source, M: MaskRand, xshape: tuple[int, ...], yshape: tuple[int, ...]) -> TruncMulRand:
    a = -M.s.reshape(xshape)
    b = src.ring("b", yshape)
    oshape = tuple(torch.broadcast_shapes(xshape, yshape))  # type: ignore[no-untyped-call]
    c = src.ring_from("c", oshape, lambda: a * b)
    a2 = src.ring("a2", xshape)
    c2 = src.ring_from("c2", oshape, lambda: a2 * b, bits=M.shift)
    return TruncMulRand(M, a, b, c, a2, c2)


def trunc_mul(ctx: Ctx, x: Truncated, y: torch.Tensor, R: TruncMulRand) -> Proto[torch.Tensor]:
    """x * y (broadcasting) for x = P - s + 2^(64-k) q m from a truncation. One round, as `mul`, but
    x costs k/8 bytes per element instead of 8:

    1. open e2 = q m - a2 (mod 2^k) and f = y - b
    2. with a = -s: [x y] = P [y] + [a] f + [c] + 2^(64-k) ([e2 f] + e2 [b] + [a2] f + [c2])
    """
    k = x.shift
    xshape = tuple(x.shares.shape)
    opened: list[torch.Tensor] = yield from gather([open_low(_low_term(x, R.M, R.a2, xshape), k), open_sum(y - R.b)])
    e2, f = opened
    low = e2 * R.b + R.a2 * f + R.c2
    if ctx.party == 0:
        low = low + e2 * f
    return x.P.reshape(xshape) * y + R.a * f + R.c + (low << (64 - k))


@dataclass
class KeptMulRand:
    """Shares of the dealer's cross products for x * y where both come from truncations (masks Mx
    and My, laid out as x and y): s_x s_y, s_x m_y mod 2^k_y and m_x s_y mod 2^k_x. The m_x m_y
    term never matters: it carries 2^(128 - k_x - k_y), 0 mod 2^64 for k_x + k_y <= 64."""

    Mx: MaskRand
    My: MaskRand
    ss: torch.Tensor
    sm: torch.Tensor | None  # None where y is a remask (shift 0: no m term)
    ms: torch.Tensor | None  # None where x is a remask


def deal_kept_mul(src: Source, Mx: MaskRand, My: MaskRand, xshape: tuple[int, ...],
                  yshape: tuple[int, ...]) -> KeptMulRand:
    assert Mx.shift + My.shift <= 64 and (Mx.m is not None or not Mx.shift) and (My.m is not None or not My.shift)
    sx, sy = Mx.s.reshape(xshape), My.s.reshape(yshape)
    oshape = tuple(torch.broadcast_shapes(xshape, yshape))  # type: ignore[no-untyped-call]
    ss = src.ring_from("ss", oshape, lambda: sx * sy)
    sm = ms = None
    if My.m is not None:
        my = My.m.reshape(yshape)
        sm = src.ring_from("sm", oshape, lambda: sx * my, bits=My.shift)
    if Mx.m is not None:
        mx = Mx.m.reshape(xshape)
        ms = src.ring_from("ms", oshape, lambda: mx * sy, bits=Mx.shift)
    return KeptMulRand(Mx, My, ss, sm, ms)


def kept_mul(ctx: Ctx, x: Truncated, y: Truncated, R: KeptMulRand) -> Proto[torch.Tensor]:
    """x * y (broadcasting) for two truncations' results, with NO round and no byte: with
    x = P_x - s_x + Q_x m_x and y = P_y - s_y + Q_y m_y (P, Q = 2^(64-k) q public),
        x y = P_x P_y - P_x [s_y] - P_y [s_x] + [s_x s_y] + Q_y (P_x [m_y] - [s_x m_y])
              + Q_x (P_y [m_x] - [m_x s_y])
    is local given the dealer's cross products; nothing is opened, so nothing is learnt. Exact in the
    ring: the result is the product of the two truncations' results."""
    if False:  # a generator that never communicates
        yield []
    xs, ys = tuple(x.shares.shape), tuple(y.shares.shape)
    Px, Py = x.P.reshape(xs), y.P.reshape(ys)
    sx, sy = R.Mx.s.reshape(xs), R.My.s.reshape(ys)
    z = R.ss - Px * sy - Py * sx
    if y.shift:  # a remask (shift 0) has no q m term
        assert R.My.m is not None and R.sm is not None
        Qy = y.q.reshape(ys).to(torch.int64) << (64 - y.shift)
        z = z + Qy * (Px * R.My.m.reshape(ys) - R.sm)
    if x.shift:
        assert R.Mx.m is not None and R.ms is not None
        Qx = x.q.reshape(xs).to(torch.int64) << (64 - x.shift)
        z = z + Qx * (Py * R.Mx.m.reshape(xs) - R.ms)
    return z + Px * Py if ctx.party == 0 else z


def mul(ctx: Ctx, x: torch.Tensor, y: torch.Tensor, R: MulRand) -> Proto[torch.Tensor]:
    """Element-wise product with broadcasting (Beaver).

    1. open e = [x] - [a] and f = [y] - [b]            (one round, both in one message)
    2. [z] = [c] + e*[b] + [a]*f, party 0 adds e*f
    """
    e_, f_ = yield [x - R.a, y - R.b]
    e = x - R.a + e_
    f = y - R.b + f_
    z = R.c + e * R.b + R.a * f
    return z + e * f if ctx.party == 0 else z


# ---------------------------------------------------------------------------------------------
# Linear layers with secret weights.

LinearOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Apply = Callable[[torch.Tensor], torch.Tensor]  # op(., wb_i): a linear layer with this party's weights


@dataclass
class LinearRand:
    a: torch.Tensor
    pre: torch.Tensor  # op(A_i, F) + C_i, computed ahead of the online phase


def deal_linear(
    src: Source, in_shape: tuple[int, ...], out_shape: tuple[int, ...], op: LinearOp, mask: torch.Tensor
) -> LinearRand:
    """Input mask A (free) and C = op(A, B) (derived). `mask` is B on the dealer (full value); on a
    party it is ignored here, and `prepare_linear` adds op(A_i, F)."""
    a = src.ring("A", in_shape)
    c = src.ring_from("C", out_shape, lambda: op(a, mask))
    return LinearRand(a, c)


def prepare_linear(R: LinearRand, op: LinearOp, F: torch.Tensor) -> LinearRand:
    """Party: fold op(A_i, F) into the randomness before the online phase (A_i is input-independent)."""
    return LinearRand(R.a, R.pre + op(R.a, F))


@dataclass
class TruncLinearRand:
    """A linear layer whose input comes from a truncation (mask rand M): its input mask is A = -s, so
    pre = op(-s_i, F) + C_i with C = op(-s, B); a2 masks q m mod 2^k and pre2 = op(a2_i, F) + C2_i,
    C2 = op(a2, B) mod 2^k. `a` is dropped once folded into pre."""

    M: MaskRand
    a: torch.Tensor | None
    pre: torch.Tensor
    a2: torch.Tensor
    pre2: torch.Tensor


def deal_trunc_linear(src: Source, M: MaskRand, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                      op: LinearOp, mask: torch.Tensor, low_op: LinearOp | None = None) -> TruncLinearRand:
    """`low_op`: op mod 2^k for a first operand in [0, 2^k) (C2 only matters mod 2^k)."""
    a = -M.s.reshape(in_shape)
    c = src.ring_from("C", out_shape, lambda: op(a, mask))
    a2 = src.ring("A2", in_shape)
    low = (1 << M.shift) - 1
    c2 = src.ring_from("C2", out_shape, lambda: (low_op or op)(a2 & low, mask), bits=M.shift)
    return TruncLinearRand(M, a, c, a2, c2)


def prepare_trunc_linear(R: TruncLinearRand, op: LinearOp, F: torch.Tensor,
                         low_op: LinearOp | None = None) -> TruncLinearRand:
    assert R.a is not None
    low = (1 << R.M.shift) - 1
    return TruncLinearRand(R.M, None, R.pre + op(R.a, F), R.a2, R.pre2 + (low_op or op)(R.a2 & low, F))


def trunc_linear(ctx: Ctx, x: Truncated, R: TruncLinearRand, apply: Apply, low_apply: Apply) -> Proto[torch.Tensor]:
    """op(X, W) for X = P - s + 2^(64-k) q m from a truncation, W secret. One round, as `linear`, but
    k/8 bytes per input element instead of 8 (2 for k = 16):

    1. open e2 = q m - a2 (mod 2^k)
    2. [Z] = op(P, wb_i) + op(-s_i, F) + [C] + 2^(64-k) (op(e2, wb_i) + op(a2_i, F) + [C2])
    op(P, W) splits over wb_0 + wb_1 = W; the bracket is op(q m, W) mod 2^k, all the shift keeps.
    `apply` is op(., wb_i); `low_apply` the same mod 2^k (exactly, in float64 where the products allow).
    """
    k = x.shift
    shape = tuple(x.shares.shape)
    e2 = yield from open_low(_low_term(x, R.M, R.a2, shape), k)
    low = low_apply(e2) + R.pre2
    return apply(x.P.reshape(shape)) + R.pre + (low << (64 - k))


def linear(ctx: Ctx, x: torch.Tensor, R: LinearRand, apply: Apply) -> Proto[torch.Tensor]:
    """op(X, W) with W secret and its mask fixed at provisioning.

    At provisioning the dealer fixed B; the parties opened F = W - B once. Party 0 holds
    wb = F + B_0, party 1 wb = B_1. Per inference:
    1. open E = [X] - [A]                              (one round, 8 bytes per input element)
    2. [Z] = op(E, wb_i) + op([A], F) + [C]            (the last two were summed offline)
    The weights are never opened again, so the layer costs only its input size on the wire.
    `apply` is op(., wb_i).
    """
    e = yield from open_sum(x - R.a)
    return apply(e) + R.pre
