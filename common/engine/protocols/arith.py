"""Arithmetic protocols on additive shares in Z_2^64: masking, truncation, Beaver products and
linear layers with secret weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from secdfd.common.engine.bits import planes, words_for
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


def mask_open(ctx: Ctx, x: torch.Tensor, R: MaskRand, shift: int) -> Proto[Masked]:
    """Open x + r for a flat shared x (one round, 8 bytes per element).

    shift = 0: P = c = x + r, so x = P - r exactly.
    shift = k: exact truncation to one unit in the last place. y = x + 2^62 lies in [0, 2^63) for
    |x| < 2^62; open c = y + r. The wrap of y + r past 2^64 is exactly msb(r)*(1 - msb(c)), so
    y >> k = (c >> k) - (r >> k) + 2^(64-k)*(1 - msb(c))*msb(r) - borrow, borrow in {0, 1}.
    Dropping the borrow gives x >> k up to +1 unit, never a large error.
    """
    if shift == 0:
        c = yield from open_sum(x + R.r)
        return Masked(c, R.s, R.sbits)
    y = x + (1 << OFFSET_BITS) if ctx.party == 0 else x
    c = yield from open_sum(y + R.r)
    P = lshr(c, shift) - (1 << (OFFSET_BITS - shift))
    Q = (1 - msb(c)) << (64 - shift)
    return Masked(P, R.s, R.sbits, Q, R.m)


def deal_trunc(src: Source, n: int, shift: int) -> MaskRand:
    return deal_mask(src, n, shift, 0)


def trunc(ctx: Ctx, x: torch.Tensor, R: MaskRand, shift: int) -> Proto[torch.Tensor]:
    """Shares of x / 2^shift (floor, +1 at most). One round, 8 bytes per element."""
    m = yield from mask_open(ctx, x.reshape(-1), R, shift)
    return m.share(ctx.party).reshape(x.shape)


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


def linear(ctx: Ctx, x: torch.Tensor, R: LinearRand, op: LinearOp, wb: torch.Tensor) -> Proto[torch.Tensor]:
    """op(X, W) with W secret and its mask fixed at provisioning.

    At provisioning the dealer fixed B; the parties opened F = W - B once. Party 0 holds
    wb = F + B_0, party 1 wb = B_1. Per inference:
    1. open E = [X] - [A]                              (one round, 8 bytes per input element)
    2. [Z] = op(E, wb_i) + op([A], F) + [C]            (the last two were summed offline)
    The weights are never opened again, so the layer costs only its input size on the wire.
    """
    e = yield from open_sum(x - R.a)
    return op(e, wb) + R.pre
