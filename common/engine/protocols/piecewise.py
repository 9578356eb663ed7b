"""Exact piecewise-linear activations by comparisons and selections: ReLU6, Hardtanh and clamps,
LeakyReLU, Hardsigmoid (and any continuous or discontinuous piecewise-linear function of x).

On interval i (x in [t_(i-1), t_i), public breakpoints t_0 < ... < t_(K-1)) f(x) = a_i x + c_i.
Telescoped over the breakpoints:
    f(x) = a_0 x + c_0 + sum_k [x >= t_k] ((a_k - a_(k-1)) x + (c_k - c_(k-1)))
Each bit b_k = [x >= t_k] is a comparison on ONE masked opening of x (the same as SecReLU's, shifted
by the public t_k), and one opening of d_k = b_k XOR beta_k gives both [b_k] and [b_k x]
(`compare.select`: x is reused in its masked form, no further opening). Then f is local.

1. open x + r (or the truncation opening: inputs at scale f + shift)   1 round, 8 bytes (6 if f = 16)
2. K comparisons side by side                                          1 round (cmp_bits up to 48),
                                                                        K * cmp bits (`compare.tree_bits`)
3. one opening of the K bits d_k = b_k XOR beta_k                     1 round, K bits
Three rounds, like SecReLU (four past `compare.ONE_ROUND_MAX` comparisons): 8 (6 with the truncation)
+ K (cmp + 1) / 8 bytes per element per server.

Exact: no approximation of the function. Integer slopes (ReLU6, Hardtanh, clamps) give the output
at scale f with no rounding beyond the fused truncation's unit and the offsets' encoding at 2^-f.
Other slopes (LeakyReLU's 0.01, Hardsigmoid's 1/6) are encoded with SLOPE_BITS = 20 fractional bits
and the output carries f + 20 fractional bits (the plan truncates where a consumer needs f): the
error is at most |x| 2^-21 + 2^-(f+20) per element from the slopes' encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secdfd.common.engine.bits import words_for
from secdfd.common.engine.protocols.arith import Masked, MaskRand, deal_mask, mask_open
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.protocols.compare import CmpRand, InjectRand, deal_compare, deal_inject, select, sign
from secdfd.common.engine.randomness import Source

SLOPE_BITS = 20


@dataclass(frozen=True)
class Pieces:
    """slopes[i] x + offsets[i] on interval i; K breakpoints, K + 1 intervals."""

    breaks: tuple[float, ...]
    slopes: tuple[float, ...]
    offsets: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.breaks or len(self.slopes) != len(self.breaks) + 1 or len(self.offsets) != len(self.slopes):
            raise ValueError("piecewise: K >= 1 breakpoints and K + 1 slopes and offsets")
        if list(self.breaks) != sorted(set(self.breaks)):
            raise ValueError("piecewise: breakpoints must be strictly ascending")

    @property
    def slope_bits(self) -> int:
        """Extra fractional bits of the output: 0 when every slope is an integer."""
        return 0 if all(float(a).is_integer() for a in self.slopes) else SLOPE_BITS


def hardtanh(lo: float, hi: float) -> Pieces:
    """clamp(x, lo, hi): ReLU6 is hardtanh(0, 6)."""
    return Pieces((float(lo), float(hi)), (0.0, 1.0, 0.0), (float(lo), 0.0, float(hi)))


def clamp_max(hi: float) -> Pieces:
    return Pieces((float(hi),), (1.0, 0.0), (0.0, float(hi)))


def clamp_min(lo: float) -> Pieces:
    return Pieces((float(lo),), (0.0, 1.0), (float(lo), 0.0))


def leaky_relu(slope: float) -> Pieces:
    return Pieces((0.0,), (float(slope), 1.0), (0.0, 0.0))


def hardsigmoid() -> Pieces:
    """relu6(x + 3) / 6."""
    return Pieces((-3.0, 3.0), (0.0, 1.0 / 6.0, 0.0), (0.0, 0.5, 1.0))


def reference(p: Pieces, x: torch.Tensor) -> torch.Tensor:
    """f(x) in float64 with the real slopes and offsets."""
    x = x.to(torch.float64)
    y = p.slopes[0] * x + p.offsets[0]
    for k, t in enumerate(p.breaks):
        b = (x >= t).to(torch.float64)
        y = y + b * ((p.slopes[k + 1] - p.slopes[k]) * x + (p.offsets[k + 1] - p.offsets[k]))
    return y


@dataclass
class PiecesRand:
    mask: MaskRand
    cmp: CmpRand
    sel: InjectRand


def deal_pieces(src: Source, n: int, shift: int, L: int, K: int) -> PiecesRand:
    """Randomness for `pieces` with K breakpoints on n elements at input scale f + shift."""
    npad = words_for(n) * 64
    mask = deal_mask(src.child("mask"), npad, shift, L + 1)
    assert mask.sbits is not None
    cmp = deal_compare(src.child("cmp"), mask.sbits.repeat(1, K), K * npad, L)
    tiled = MaskRand(mask.r, mask.s.repeat(K), mask.m.repeat(K) if mask.m is not None else None, None, shift)
    sel = deal_inject(src.child("sel"), K * npad, tiled, shift > 0)
    return PiecesRand(mask, cmp, sel)


def pieces(ctx: Ctx, x: torch.Tensor, R: PiecesRand, p: Pieces, shift: int = 0) -> Proto[torch.Tensor]:
    """Shares of f(x) at scale f + p.slope_bits for shares of x at scale f + shift (three rounds)."""
    shape, n = x.shape, x.numel()
    K = len(p.breaks)
    npad = words_for(n) * 64
    flat = torch.cat([x.reshape(-1), x.new_zeros(npad - n)])
    m = yield from mask_open(ctx, flat, R.mask, shift)
    P = torch.cat([m.P - round(t * (1 << ctx.frac)) for t in p.breaks])
    bits = yield from sign(ctx, Masked(P, m.s.repeat(K), m.sbits.repeat(1, K) if m.sbits is not None else None),
                           R.cmp)
    tiled = Masked(m.P.repeat(K), m.s.repeat(K), None, m.Q.repeat(K) if m.Q is not None else None,
                   m.m.repeat(K) if m.m is not None else None)
    bx, b = yield from select(ctx, bits, tiled, R.sel)
    bx, b = bx.view(K, npad), b.view(K, npad)
    S = p.slope_bits
    slope = [round(a * (1 << S)) for a in p.slopes]
    offset = [round(c * (1 << (ctx.frac + S))) for c in p.offsets]
    y = slope[0] * m.share(ctx.party)
    if ctx.party == 0:
        y = y + offset[0]
    for k in range(K):
        if slope[k + 1] != slope[k]:
            y = y + (slope[k + 1] - slope[k]) * bx[k]
        if offset[k + 1] != offset[k]:
            y = y + (offset[k + 1] - offset[k]) * b[k]
    return y[:n].reshape(shape)
