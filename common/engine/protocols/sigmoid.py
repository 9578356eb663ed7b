"""SecSigm: a piecewise cubic sigmoid whose interval is chosen by comparisons run in parallel.

sigmoid is fitted by a cubic on each interval between the breakpoints +-{0, 1, 2, 3, 4, 6, 8, 10}
(least squares on Chebyshev nodes; the negative side is 1 - p(-x)); it is 0 below -10 and 1 above
10. Max abs error of the real function: 3.6e-5 (fit) and 4.5e-5 (saturation). It is one instance of
the interval selection in `secdfd.common.engine.protocols.spline` (see there for the recipe):

Rounds (inputs at scale f, or f + shift with the truncation fused into the first opening):
1. open x + r                                                    1 round
2. in parallel: 15 comparisons x >= t_k on that one opening (1 round); powers x^2, x^3 computed
   locally from that opening, then truncated (1 round)
3. the comparison bits opened under a dealer's mask (1 round): each bit times each power is then
   local; truncation of the sum (1 round)
Four rounds in all (five above 69,888 elements, padded to whole words: 15 comparisons each, past
`compare.ONE_ROUND_MAX`); coefficients carry 32 fractional bits.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from secdfd.common.engine.protocols import spline as _spline
from secdfd.common.engine.protocols.arith import Truncated
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.randomness import Source

BREAKS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)
DEGREE = 3
COEF_BITS = _spline.COEF_BITS
SigmRand = _spline.SplineRand


@cache
def as_spline() -> _spline.Spline:
    """The sigmoid's pieces: odd-symmetric about (0, 1/2), 0 below -10 and 1 above 10."""
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
    return _spline.Spline("sigmoid", breaks, tuple(tuple(float(c) for c in p) for p in polys))


def pieces() -> tuple[tuple[float, ...], np.ndarray]:
    """Breakpoints t_k (ascending, both signs) and coefficient steps (K, DEGREE+1) as float64."""
    sp = as_spline()
    return sp.breaks, sp.steps()


def reference(x: torch.Tensor) -> torch.Tensor:
    """The piecewise cubic in float64 (what the protocol computes, up to fixed-point rounding)."""
    return _spline.reference(as_spline(), x)


def deal_sigmoid(src: Source, n: int, shift: int, frac: int, L: int) -> _spline.SplineRand:
    return _spline.deal_spline(src, n, shift, frac, L, as_spline())


def sigmoid(ctx: Ctx, x: torch.Tensor, R: _spline.SplineRand, shift: int = 0) -> Proto[torch.Tensor]:
    """Shares of sigmoid(x) at scale f for shares of x at scale f + shift."""
    return (yield from _spline.spline(ctx, x, R, as_spline(), shift))


def sigmoid_kept(ctx: Ctx, x: torch.Tensor, R: _spline.SplineRand, shift: int = 0) -> Proto[Truncated]:
    """`sigmoid` keeping its last truncation's public part (`spline.spline_kept`): a gate multiplied
    by a truncation's result then costs no round (`arith.kept_mul`)."""
    return (yield from _spline.spline_kept(ctx, x, R, as_spline(), shift))
