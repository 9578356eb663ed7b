"""Smooth activations as piecewise polynomials whose interval is chosen by comparisons run in
parallel: the interval selection of SecSigm, for any function that is a polynomial of degree at most
3 between public breakpoints t_0 < ... < t_(K-1), a constant outside them, and optionally x itself
right of the last breakpoint (`tail`: SiLU, GELU, Hardswish grow like x).

    f(x) = sum_j c_j(x) x^j  (+ [x >= t_(K-1)] * x  with a tail)
    c_j(x) = base_j + sum_k [x >= t_k] (p_k,j - p_(k-1),j)

The coefficients telescope: outside [t_0, t_(K-1)) every c_j with j >= 1 is exactly 0 in the ring,
so powers of a huge x that wrap around are multiplied by an exact zero. The tail is a bit injection
into x (exact), so large positive inputs never meet the coefficients' scale.

Rounds (inputs at scale f, or f + shift with the truncation fused into the first opening):
1. open x + r                                                    1 round, 8 bytes (6 if fused)
2. in parallel: K comparisons x >= t_k on that one opening (1 round at cmp_bits up to 48) then
   their bits to arithmetic, and the tail's bit injected into x (1 round, K (+1) bits); powers
   x^2 .. x^D from one opening of x - a (1 round) then their truncations (1 round)
3. Beaver products c_j * x^j (1 round, 16 D bytes), truncation of the sum (1 round, 4 bytes)
Five rounds in all, whatever the function (six when K times the elements exceed
`compare.ONE_ROUND_MAX`, whose comparison trees take two). Coefficients carry COEF_BITS = 32 fractional bits.
Bytes per element per server: 8 (open; 6 with a fused 16-bit truncation) + 8 (powers, D >= 2) +
6 + 4 (truncations of x^2 and x^3: a truncation by k sends the 64 - k bits above k) + 16 D
(products) + 4 (last truncation) + K (cmp + 1) / 8 for the comparison trees and bits, where cmp is
the number of bits one comparison opens (`compare.tree_bits`).

Instances (`SPLINES`), fitted by least squares on Chebyshev nodes per interval; max abs error of
the real function over the whole real line, measured on a grid of step 1e-4 (the secure result adds
a few units of 2^-16):
- tanh: 11 breakpoints +-{0, 0.5, 1.25, 2.25, 3.75, 5}, -1 / +1 outside:        1.9e-4
- silu (x sigmoid(x)): 11 breakpoints +-{0, 1, 2.25, 3.75, 7, 12}, 0 / x outside: 1.7e-4
- gelu (x Phi(x), erf form): 11 breakpoints +-{0, .5, 1.25, 2, 3.5, 4.5}:        1.0e-4
- gelu_tanh (the tanh approximation): the same breakpoints:                      9.1e-5
- hardswish (x relu6(x + 3) / 6): breakpoints -3, 3, the exact quadratic between them: exact up to
  the fixed-point rounding (2^-32 on the coefficient 1/6)
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
    Truncated,
    deal_mask,
    deal_mul,
    deal_trunc,
    mask_open,
    mul,
    trunc,
    trunc_kept,
)
from secdfd.common.engine.protocols.base import Ctx, Proto, open_sum
from secdfd.common.engine.protocols.compare import (
    CmpRand,
    InjectRand,
    bit_to_arith,
    deal_compare,
    deal_inject,
    inject,
    sign,
)
from secdfd.common.engine.randomness import Source

COEF_BITS = 32
MAX_DEGREE = 3  # x^3 at scale 3f = 48 bits still truncates exactly (|x| < 2^14 inside the breakpoints)


@dataclass(frozen=True)
class Spline:
    """f on each interval: polys[0] left of breaks[0] (a constant), polys[i] on [breaks[i-1], breaks[i]),
    polys[K] right of the last breakpoint (a constant, plus x with `tail`). Increasing powers."""

    name: str
    breaks: tuple[float, ...]
    polys: tuple[tuple[float, ...], ...]
    tail: bool = False

    def __post_init__(self) -> None:
        degree = len(self.polys[0]) - 1
        if len(self.polys) != len(self.breaks) + 1 or any(len(p) != degree + 1 for p in self.polys):
            raise ValueError(f"spline {self.name}: one polynomial per interval, all of one degree")
        if not 1 <= degree <= MAX_DEGREE or list(self.breaks) != sorted(set(self.breaks)):
            raise ValueError(f"spline {self.name}: degree 1..{MAX_DEGREE}, ascending breakpoints")
        if any(self.polys[0][1:]) or any(self.polys[-1][1:]):
            raise ValueError(f"spline {self.name}: constant outside the breakpoints (a tail gives x)")

    @property
    def degree(self) -> int:
        return len(self.polys[0]) - 1

    def steps(self) -> np.ndarray:
        """Coefficient jumps at each breakpoint, (K, degree + 1)."""
        p = np.array(self.polys, dtype=np.float64)
        return p[1:] - p[:-1]


def reference(sp: Spline, x: torch.Tensor) -> torch.Tensor:
    """The piecewise polynomial in float64 (what the protocol computes, up to fixed-point rounding)."""
    x = x.to(torch.float64)
    c = torch.tensor(sp.polys[0], dtype=torch.float64).expand(*x.shape, sp.degree + 1)
    for t, st in zip(sp.breaks, sp.steps(), strict=True):
        c = c + (x >= t).to(torch.float64)[..., None] * torch.from_numpy(st)
    y = sum(c[..., j] * x**j for j in range(sp.degree + 1))
    if sp.tail:
        y = y + (x >= sp.breaks[-1]).to(torch.float64) * x
    return y  # type: ignore[return-value]


def fit(name: str, fn: Callable[[np.ndarray], np.ndarray], breaks: tuple[float, ...], low: float, high: float,
        tail: bool = False, degree: int = 3) -> Spline:
    """Least-squares fit of degree `degree` on 256 Chebyshev nodes per interval between `breaks`;
    `low` left of them, `high` (+ x with `tail`) right of them."""
    polys = [(low,) + (0.0,) * degree]
    for a, b in zip(breaks[:-1], breaks[1:], strict=True):
        xs = (a + b) / 2 + (b - a) / 2 * np.cos(np.pi * (np.arange(256) + 0.5) / 256)
        V = np.vander(xs, degree + 1, increasing=True)
        coef = np.linalg.lstsq(V, fn(xs), rcond=None)[0]
        polys.append(tuple(float(c) for c in coef))
    polys.append((high,) + (0.0,) * degree)
    return Spline(name, breaks, tuple(polys), tail)


def _symmetric(*positive: float) -> tuple[float, ...]:
    return tuple(sorted({-t for t in positive} | set(positive)))


def _sigm(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))  # type: ignore[no-any-return]


_erf = np.vectorize(math.erf)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))  # type: ignore[no-any-return]


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


GELU_BREAKS = _symmetric(0.0, 0.5, 1.25, 2.0, 3.5, 4.5)

# name -> the spline, built once. Every party derives the same coefficients from the name.
SPLINES: dict[str, Callable[[], Spline]] = {
    "tanh": cache(lambda: fit("tanh", np.tanh, _symmetric(0.0, 0.5, 1.25, 2.25, 3.75, 5.0), -1.0, 1.0)),
    "silu": cache(lambda: fit("silu", lambda x: x * _sigm(x), _symmetric(0.0, 1.0, 2.25, 3.75, 7.0, 12.0), 0.0, 0.0,
                              tail=True)),
    "gelu": cache(lambda: fit("gelu", _gelu, GELU_BREAKS, 0.0, 0.0, tail=True)),
    "gelu_tanh": cache(lambda: fit("gelu_tanh", _gelu_tanh, GELU_BREAKS, 0.0, 0.0, tail=True)),
    "hardswish": cache(lambda: Spline("hardswish", (-3.0, 3.0),
                                      ((0.0, 0.0, 0.0), (0.0, 0.5, 1.0 / 6.0), (0.0, 0.0, 0.0)), tail=True)),
}

# The real functions, for tests, calibration and the plaintext evaluation of a plan.
FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "hardswish": torch.nn.functional.hardswish,
}


def get(name: str) -> Spline:
    """The spline called `name` (KeyError for an unknown name)."""
    return SPLINES[name]()


# ---------------------------------------------------------------------------------------------
# Randomness.


@dataclass
class SplineRand:
    mask: MaskRand
    cmp: CmpRand
    u: InjectRand
    pa: list[torch.Tensor]  # shares of a, a^2, ..., a^D (empty for D = 1)
    tr: list[MaskRand]  # truncations of x^2 .. x^D
    mul: MulRand
    out: MaskRand
    tail: InjectRand | None


def deal_spline(src: Source, n: int, shift: int, frac: int, L: int, sp: Spline) -> SplineRand:
    """Randomness for `spline` on n elements (padded to whole words) at input scale frac + shift."""
    K, D = len(sp.breaks), sp.degree
    npad = words_for(n) * 64
    mask = deal_mask(src.child("mask"), npad, shift, L + 1)
    sbits = mask.sbits
    assert sbits is not None
    cmp = deal_compare(src.child("cmp"), sbits.repeat(1, K), K * npad, L)
    u = deal_inject(src.child("u"), K * npad, None, False)
    pa: list[torch.Tensor] = []
    if D > 1:
        p = src.child("pow")
        a = p.ring("a", (npad,))
        pa.append(a)
        for j in range(2, D + 1):
            pa.append(p.ring_from(f"a{j}", (npad,), _power_of(a, j)))
    tr = [deal_trunc(src.child(f"t{j}"), npad, (j - 1) * frac) for j in range(2, D + 1)]
    m = deal_mul(src.child("mul"), (D, npad), (D, npad))
    out = deal_trunc(src.child("out"), npad, COEF_BITS)
    tail = deal_inject(src.child("tail"), npad, mask, shift > 0) if sp.tail else None
    return SplineRand(mask, cmp, u, pa, tr, m, out, tail)


def _power_of(a: torch.Tensor, j: int) -> Callable[[], torch.Tensor]:
    return lambda: _power(a, j)


def _power(a: torch.Tensor, j: int) -> torch.Tensor:
    out = a
    for _ in range(j - 1):
        out = out * a  # int64 products wrap mod 2^64
    return out


# ---------------------------------------------------------------------------------------------
# Online.


def _coefficients(ctx: Ctx, m: Masked, R: SplineRand, sp: Spline,
                  npad: int) -> Proto[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of c_j(x), (D+1, npad) at COEF_BITS fractional bits, and of the tail [x >= t_last] x."""
    K = len(sp.breaks)
    P = torch.cat([m.P - round(t * (1 << ctx.frac)) for t in sp.breaks])
    tiled = Masked(P, m.s.repeat(K), m.sbits.repeat(1, K) if m.sbits is not None else None)
    bits = yield from sign(ctx, tiled, R.cmp)
    tail = None
    if R.tail is not None:
        words = npad // 64
        u, tail = yield from gather([bit_to_arith(ctx, bits, R.u, K * npad),
                                     inject(ctx, bits[(K - 1) * words:], m, R.tail)])
    else:
        u = yield from bit_to_arith(ctx, bits, R.u, K * npad)
    st = torch.from_numpy(np.round(sp.steps() * (1 << COEF_BITS)).astype(np.int64)).to(u.device)  # (K, D+1)
    # exact in the ring (int64 products wrap mod 2^64); element-wise, so it runs on any device
    coef = (st.t()[:, :, None] * u.view(1, K, npad)).sum(1)
    if ctx.party == 0:
        base = torch.tensor([round(c * (1 << COEF_BITS)) for c in sp.polys[0]], dtype=torch.int64, device=u.device)
        coef = coef + base[:, None]
    return coef, tail


def _powers(ctx: Ctx, x: torch.Tensor, R: SplineRand, degree: int) -> Proto[torch.Tensor]:
    """Shares of x, x^2 .. x^D at scale f, (D, npad): one power-opening round, one truncation round."""
    if degree == 1:
        if False:  # a generator that never communicates
            yield []
        return x[None]
    e = yield from open_sum(x - R.pa[0])
    raw = []
    for j in range(2, degree + 1):
        # x^j = (e + a)^j = sum_i C(j, i) e^(j-i) a^i; the public e^j term is added by party 0
        xj = R.pa[j - 1] + sum(math.comb(j, i) * _power(e, j - i) * R.pa[i - 1] for i in range(1, j))
        raw.append(xj + _power(e, j) if ctx.party == 0 else xj)
    truncated = yield from gather([trunc(ctx, xj, r, (j - 1) * ctx.frac)
                                   for j, (xj, r) in enumerate(zip(raw, R.tr, strict=True), start=2)])
    return torch.stack([x, *truncated])


def _sum(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline,
         shift: int) -> Proto[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of sum_j c_j(x) x^j at scale COEF_BITS + f and of the tail, padded to whole words."""
    n = x.numel()
    npad = words_for(n) * 64
    flat = torch.cat([x.reshape(-1), x.new_zeros(npad - n)])
    m = yield from mask_open(ctx, flat, R.mask, shift)
    xf = m.share(ctx.party)
    (coef, tail), pw = yield from gather([_coefficients(ctx, m, R, sp, npad), _powers(ctx, xf, R, sp.degree)])
    terms = yield from mul(ctx, coef[1:], pw, R.mul)  # scale COEF_BITS + f
    return terms.sum(0) + (coef[0] << ctx.frac), tail


def spline(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline, shift: int = 0) -> Proto[torch.Tensor]:
    """Shares of f(x) at scale f for shares of x at scale f + shift (five rounds)."""
    acc, tail = yield from _sum(ctx, x, R, sp, shift)
    y = yield from trunc(ctx, acc, R.out, COEF_BITS)
    if tail is not None:
        y = y + tail
    return y[: x.numel()].reshape(x.shape)


def spline_kept(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline, shift: int = 0) -> Proto[Truncated]:
    """`spline` for a function with no tail (the sigmoid), keeping the last truncation's public part:
    a product with the result reuses it (`arith.trunc_mul`, `arith.kept_mul`). Its mask is
    `kept_mask(R, n)`."""
    assert R.tail is None
    n = x.numel()
    acc, _ = yield from _sum(ctx, x, R, sp, shift)
    t = yield from trunc_kept(ctx, acc, R.out, COEF_BITS)
    return Truncated(t.shares[:n].reshape(x.shape), t.P[:n], t.q[:n], COEF_BITS)


def kept_mask(R: SplineRand, n: int) -> MaskRand:
    """The mask of `spline_kept`'s truncation for its n elements (the rest is padding)."""
    M = R.out
    assert M.m is not None
    return MaskRand(M.r[:n], M.s[:n], M.m[:n], None, M.shift)
