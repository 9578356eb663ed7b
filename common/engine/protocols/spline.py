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
1. open x + r: x = P - s + Q m in masked form            1 round, 8 bytes (the 64 - shift bits if fused)
2. in parallel: K comparisons x >= t_k on that one opening (1 round at cmp_bits up to 48); and
   x^2 .. x^D computed locally from the masked form (dealt s^2, s^3, m s, m s^2), then truncated
   to scale f (1 round), which leaves each x^j in masked form too
3. open d_k = b_k XOR beta_k for the comparison bits (1 round, K bits): every u_k x^j (u_k the bit
   as a ring element) is then local from dealt beta_k times each x^j's mask, as is the tail
   [x >= t_(K-1)] x; truncation of the sum (1 round, 4 bytes)
Four rounds in all, whatever the function (five when K times the elements exceed
`compare.ONE_ROUND_MAX`, whose comparison trees take two). Coefficients carry COEF_BITS = 32 fractional bits.
Bytes per element per server: 8 (open; 6 with a fused 16-bit truncation, 4.25 with a 30-bit one) +
6 + 4 (truncations of x^2 and x^3: a truncation by k sends the 64 - k bits above k) + 4 (last
truncation) + K (cmp + 1) / 8 for the comparison trees and bits, where cmp is the number of bits one
comparison opens (`compare.tree_bits`). The dealer pays for the local products: 2 D K ring elements
per element (beta_k times the mask of each x^j) and the mask's monomials.

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

from secdfd.common.engine.bits import unpack, words_for
from secdfd.common.engine.driver import gather
from secdfd.common.engine.protocols.arith import (
    Masked,
    MaskRand,
    Truncated,
    deal_mask,
    deal_trunc,
    mask_open,
    trunc,
    trunc_kept,
)
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.protocols.compare import (
    CmpRand,
    InjectRand,
    arith_bit,
    deal_compare,
    deal_inject,
    injected,
    open_bits,
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
    """The piecewise polynomial in float64 (what the protocol computes, up to fixed-point rounding).

    Each x takes its interval's coefficients directly. Summing the float64 steps instead would leave
    about 1e-17 where the ring's telescoped coefficients are exactly 0, which a far x^3 turns into an
    error (4e-3 at x = 7e4) that depends on the machine's least-squares rounding."""
    x = x.to(torch.float64)
    interval = torch.searchsorted(torch.tensor(sp.breaks, dtype=torch.float64), x, right=True)  # breaks <= x
    c = torch.tensor(sp.polys, dtype=torch.float64)[interval]
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
    pow: dict[str, torch.Tensor]  # shares of s^2, s^3 (and m s, m s^2 mod 2^shift) of the first mask
    tr: list[MaskRand]  # truncations of x^2 .. x^D
    u: list[InjectRand]  # per power x^j: the comparison bits' beta (one for all j) times x^j's mask
    out: MaskRand


def _tile(t: torch.Tensor | None, K: int) -> torch.Tensor | None:
    return None if t is None else t.repeat(K)


def deal_spline(src: Source, n: int, shift: int, frac: int, L: int, sp: Spline) -> SplineRand:
    """Randomness for `spline` on n elements (padded to whole words) at input scale frac + shift."""
    K, D = len(sp.breaks), sp.degree
    npad = words_for(n) * 64
    mask = deal_mask(src.child("mask"), npad, shift, L + 1)
    sbits = mask.sbits
    assert sbits is not None
    cmp = deal_compare(src.child("cmp"), sbits.repeat(1, K), K * npad, L)
    pw = _deal_powers(src.child("pow"), mask, D)
    tr = [deal_trunc(src.child(f"t{j}"), npad, (j - 1) * frac) for j in range(2, D + 1)]
    # one beta per comparison bit; x^j's mask times it for every j, so u_k x^j is local once d is open
    u = [deal_inject(src.child("u"), K * npad, MaskRand(mask.r, mask.s.repeat(K), _tile(mask.m, K), None, shift),
                     shift > 0)]
    for j, t in enumerate(tr, start=2):
        u.append(_deal_times_beta(src.child(f"u{j}"), u[0], K * npad, t.s.repeat(K), _tile(t.m, K), t.shift))
    out = deal_trunc(src.child("out"), npad, COEF_BITS)
    return SplineRand(mask, cmp, pw, tr, u, out)


def _deal_powers(src: Source, mask: MaskRand, D: int) -> dict[str, torch.Tensor]:
    """Shares of the monomials of the first opening's mask that x^2 .. x^D need (`_raw_powers`).
    m is a bit (m^2 = m), and a term with m is multiplied by a multiple of 2^(64 - shift)."""
    s, m, n = mask.s, mask.m, mask.s.shape[0]
    out: dict[str, torch.Tensor] = {}
    if D >= 2:
        out["s2"] = src.ring_from("s2", (n,), lambda: s * s)
    if D >= 3:
        out["s3"] = src.ring_from("s3", (n,), lambda: s * s * s)
    if m is not None:
        if D >= 2:
            out["ms"] = src.ring_from("ms", (n,), lambda: m * s, bits=mask.shift)
        if D >= 3:
            out["ms2"] = src.ring_from("ms2", (n,), lambda: m * s * s, bits=mask.shift)
    return out


def _deal_times_beta(src: Source, base: InjectRand, n: int, s: torch.Tensor, m: torch.Tensor | None,
                     shift: int) -> InjectRand:
    """`base`'s bits (the same beta) with shares of beta * s and beta * m for another masked value."""
    beta = base.beta
    beta_s = src.ring_from("beta_s", (n,), lambda: unpack(beta, n) * s)
    beta_m = None if m is None else src.ring_from("beta_m", (n,), lambda: unpack(beta, n) * m, bits=shift)
    return InjectRand(beta, base.beta_a, beta_s, beta_m)


# ---------------------------------------------------------------------------------------------
# Online.


def _raw_powers(ctx: Ctx, x: Masked, R: SplineRand, D: int) -> list[torch.Tensor]:
    """Shares of x^2 .. x^D (scales 2f .. Df) from the masked form x = P + z, z = Q m - s, with no
    opening: x^2 = P^2 + 2 P z + z^2, x^3 = P^3 + 3 P^2 z + 3 P z^2 + z^3, where
    z^2 = Q^2 m - 2 Q (m s) + s^2 and z^3 = Q^3 m - 3 Q^2 (m s) + 3 Q (m s^2) - s^3 (m is a bit)."""
    P, Q = x.P, x.Q
    z1 = -x.s
    z2 = R.pow["s2"] if D >= 2 else None
    z3 = -R.pow["s3"] if D >= 3 else None
    if Q is not None:
        assert x.m is not None
        z1 = z1 + Q * x.m
        if z2 is not None:
            z2 = z2 + Q * Q * x.m - 2 * Q * R.pow["ms"]
        if z3 is not None:
            z3 = z3 + Q * Q * Q * x.m - 3 * Q * Q * R.pow["ms"] + 3 * Q * R.pow["ms2"]
    out = []
    if z2 is not None:
        out.append(2 * P * z1 + z2 + (P * P if ctx.party == 0 else 0))
    if z3 is not None:
        assert z2 is not None
        out.append(3 * P * P * z1 + 3 * P * z2 + z3 + (P * P * P if ctx.party == 0 else 0))
    return out


def _sum(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline,
         shift: int) -> Proto[tuple[torch.Tensor, torch.Tensor | None]]:
    """Shares of sum_j c_j(x) x^j at scale COEF_BITS + f and of the tail, padded to whole words.

    Round 1 opens x; round 2 runs the K comparisons and truncates x^2 .. x^D (computed locally from
    the first opening) side by side; round 3 opens d = b XOR beta for the comparison bits b, and
    every u_k x^j is then local (`compare.injected`: each x^j is in masked form)."""
    n = x.numel()
    npad = words_for(n) * 64
    K, D = len(sp.breaks), sp.degree
    flat = torch.cat([x.reshape(-1), x.new_zeros(npad - n)])
    m = yield from mask_open(ctx, flat, R.mask, shift)
    P = torch.cat([m.P - round(t * (1 << ctx.frac)) for t in sp.breaks])
    tiled = Masked(P, m.s.repeat(K), m.sbits.repeat(1, K) if m.sbits is not None else None)
    raw = _raw_powers(ctx, m, R, D)
    bits, *powers = yield from gather([sign(ctx, tiled, R.cmp)]
                                      + [mask_open(ctx, xj, r, r.shift) for xj, r in zip(raw, R.tr, strict=True)])
    d = yield from open_bits(ctx, bits, R.u[0], K * npad)
    st = torch.from_numpy(np.round(sp.steps() * (1 << COEF_BITS)).astype(np.int64)).to(d.device)  # (K, D+1)
    base = [round(c * (1 << COEF_BITS)) for c in sp.polys[0]]
    u = arith_bit(ctx, d, R.u[0]).view(K, npad)
    const = (st[:, 0, None] * u).sum(0) + (base[0] if ctx.party == 0 else 0)
    acc = const << ctx.frac
    tail = None
    for j, (xj, Rj) in enumerate(zip([m, *powers], R.u, strict=True), start=1):
        reps = Masked(xj.P.repeat(K), xj.s.repeat(K), None, _tile(xj.Q, K), _tile(xj.m, K))
        ux = injected(ctx, d, reps, Rj).view(K, npad)  # u_k x^j, exact in the ring
        # exact in the ring (int64 products wrap mod 2^64); element-wise, so it runs on any device
        acc = acc + (st[:, j, None] * ux).sum(0) + base[j] * xj.share(ctx.party)
        if j == 1 and sp.tail:
            tail = ux[K - 1]  # [x >= t_last] x
    return acc, tail


def spline(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline, shift: int = 0) -> Proto[torch.Tensor]:
    """Shares of f(x) at scale f for shares of x at scale f + shift (four rounds)."""
    acc, tail = yield from _sum(ctx, x, R, sp, shift)
    y = yield from trunc(ctx, acc, R.out, COEF_BITS)
    if tail is not None:
        y = y + tail
    return y[: x.numel()].reshape(x.shape)


def spline_kept(ctx: Ctx, x: torch.Tensor, R: SplineRand, sp: Spline, shift: int = 0) -> Proto[Truncated]:
    """`spline` for a function with no tail (the sigmoid), keeping the last truncation's public part:
    a product with the result reuses it (`arith.trunc_mul`, `arith.kept_mul`). Its mask is
    `kept_mask(R, n)`."""
    assert not sp.tail
    n = x.numel()
    acc, _ = yield from _sum(ctx, x, R, sp, shift)
    t = yield from trunc_kept(ctx, acc, R.out, COEF_BITS)
    return Truncated(t.shares[:n].reshape(x.shape), t.P[:n], t.q[:n], COEF_BITS)


def kept_mask(R: SplineRand, n: int) -> MaskRand:
    """The mask of `spline_kept`'s truncation for its n elements (the rest is padding)."""
    M = R.out
    assert M.m is not None
    return MaskRand(M.r[:n], M.s[:n], M.m[:n], None, M.shift)
