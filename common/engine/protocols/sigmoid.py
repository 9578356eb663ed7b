"""SecSigm: a piecewise cubic sigmoid whose interval is chosen by comparisons run in parallel.

sigmoid is fitted by a cubic on each interval between the breakpoints +-{0, 1, 2, 3, 4, 6, 8, 10}
(least squares on Chebyshev nodes; the negative side is 1 - p(-x)); it is 0 below -10 and 1 above
10. Max abs error of the real function: 3.6e-5 (fit) and 4.5e-5 (saturation). Written as
    f(x) = sum_j c_j(x) x^j,   c_j(x) = sum_k [x >= t_k] (p_k,j - p_(k-1),j)
the coefficients telescope: for |x| > 10 they are exactly 0 (or 1 for c_0) in the ring, so powers
of a huge x that wrap around are multiplied by an exact zero.

Rounds (inputs at scale f, or 2f with the truncation fused into the first opening):
1. open x + r                                                    1 round
2. in parallel: 15 comparisons x >= t_k on that one opening (2 rounds) then their bits to
   arithmetic (1 round); powers x^2, x^3 from one opening of x - a (1 round) then truncation (1)
3. Beaver products c_j * x^j (1 round), truncation of the sum (1 round)
Six rounds in all; coefficients carry 32 fractional bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np
import torch

from secdfd.common.engine.bits import words_for
from secdfd.common.engine.driver import gather
from secdfd.common.engine.protocols.arith import (
    Masked,
    MaskRand,
    MulRand,
    deal_mask,
    deal_mul,
    deal_trunc,
    mask_open,
    mul,
    trunc,
)
from secdfd.common.engine.protocols.base import Ctx, Proto, open_sum
from secdfd.common.engine.protocols.compare import CmpRand, InjectRand, bit_to_arith, deal_compare, deal_inject, sign
from secdfd.common.engine.randomness import Source

BREAKS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)
DEGREE = 3
COEF_BITS = 32


@cache
def pieces() -> tuple[tuple[float, ...], np.ndarray]:
    """Breakpoints t_k (ascending, both signs) and coefficient steps (K, DEGREE+1) as float64."""
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    edges = (0.0, *BREAKS)
    pos = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        xs = (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (np.arange(256) + 0.5) / 256)
        V = np.vander(xs, DEGREE + 1, increasing=True)
        pos.append(np.linalg.lstsq(V, sig(xs), rcond=None)[0])  # type: ignore[arg-type, no-untyped-call]
    sign = (-1.0) ** np.arange(DEGREE + 1)
    neg = [np.concatenate([[1.0 - c[0]], -(sign * c)[1:]]) for c in pos]  # 1 - p(-x)
    polys = [np.zeros(DEGREE + 1)] + neg[::-1] + pos + [np.eye(DEGREE + 1)[0]]
    breaks = tuple(-t for t in BREAKS[::-1]) + (0.0,) + BREAKS
    steps = np.stack([polys[k + 1] - polys[k] for k in range(len(breaks))])
    return breaks, steps


def reference(x: torch.Tensor) -> torch.Tensor:
    """The piecewise cubic in float64 (what the protocol computes, up to fixed-point rounding)."""
    breaks, steps = pieces()
    x = x.to(torch.float64)
    c = torch.zeros(*x.shape, DEGREE + 1, dtype=torch.float64)
    for t, st in zip(breaks, steps, strict=True):
        c = c + (x >= t).to(torch.float64)[..., None] * torch.from_numpy(st)
    return sum(c[..., j] * x**j for j in range(DEGREE + 1))  # type: ignore[return-value]


@dataclass
class SigmRand:
    mask: MaskRand
    cmp: CmpRand
    u: InjectRand
    pa: torch.Tensor
    pa2: torch.Tensor
    pa3: torch.Tensor
    tr2: MaskRand
    tr3: MaskRand
    mul: MulRand
    out: MaskRand


def deal_sigmoid(src: Source, n: int, shift: int, frac: int, L: int) -> SigmRand:
    breaks, _ = pieces()
    K = len(breaks)
    npad = words_for(n) * 64
    mask = deal_mask(src.child("mask"), npad, shift, L + 1)
    sbits = mask.sbits
    assert sbits is not None
    cmp = deal_compare(src.child("cmp"), sbits.repeat(1, K), K * npad, L)
    u = deal_inject(src.child("u"), K * npad, None, False)
    p = src.child("pow")
    a = p.ring("a", (npad,))
    a2 = p.ring_from("a2", (npad,), lambda: a * a)
    a3 = p.ring_from("a3", (npad,), lambda: a * a * a)
    tr2 = deal_trunc(src.child("t2"), npad, frac)
    tr3 = deal_trunc(src.child("t3"), npad, 2 * frac)
    m = deal_mul(src.child("mul"), (DEGREE, npad), (DEGREE, npad))
    out = deal_trunc(src.child("out"), npad, COEF_BITS)
    return SigmRand(mask, cmp, u, a, a2, a3, tr2, tr3, m, out)


def _coefficients(ctx: Ctx, m: Masked, R: SigmRand, npad: int) -> Proto[torch.Tensor]:
    """Shares of c_j(x), (DEGREE+1, npad) at COEF_BITS fractional bits."""
    breaks, steps = pieces()
    K = len(breaks)
    P = torch.cat([m.P - round(t * (1 << ctx.frac)) for t in breaks])
    tiled = Masked(P, m.s.repeat(K), m.sbits.repeat(1, K) if m.sbits is not None else None)
    bits = yield from sign(ctx, tiled, R.cmp)
    u = (yield from bit_to_arith(ctx, bits, R.u, K * npad)).view(K, npad)
    st = torch.from_numpy(np.round(steps * (1 << COEF_BITS)).astype(np.int64))  # (K, DEGREE+1)
    return st.t() @ u  # exact in the ring: int64 matmul wraps mod 2^64


def _powers(ctx: Ctx, x: torch.Tensor, R: SigmRand) -> Proto[torch.Tensor]:
    """Shares of x, x^2, x^3 at scale f, (DEGREE, npad): one power-triple round, one truncation."""
    e = yield from open_sum(x - R.pa)
    x2 = 2 * e * R.pa + R.pa2
    x3 = 3 * e * e * R.pa + 3 * e * R.pa2 + R.pa3
    if ctx.party == 0:
        x2 = x2 + e * e
        x3 = x3 + e * e * e
    t2, t3 = yield from gather([trunc(ctx, x2, R.tr2, ctx.frac), trunc(ctx, x3, R.tr3, 2 * ctx.frac)])
    return torch.stack([x, t2, t3])


def sigmoid(ctx: Ctx, x: torch.Tensor, R: SigmRand, shift: int = 0) -> Proto[torch.Tensor]:
    """Shares of sigmoid(x) at scale f for shares of x at scale f + shift."""
    shape, n = x.shape, x.numel()
    npad = words_for(n) * 64
    flat = torch.cat([x.reshape(-1), x.new_zeros(npad - n)])
    m = yield from mask_open(ctx, flat, R.mask, shift)
    xf = m.share(ctx.party)
    coef, pw = yield from gather([_coefficients(ctx, m, R, npad), _powers(ctx, xf, R)])
    terms = yield from mul(ctx, coef[1:], pw, R.mul)  # scale COEF_BITS + f
    acc = terms.sum(0) + (coef[0] << ctx.frac)
    y = yield from trunc(ctx, acc, R.out, COEF_BITS)
    return y[:n].reshape(shape)
