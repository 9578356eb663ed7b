"""The activations users meet, as protocols: exact piecewise-linear ones (ReLU6, Hardtanh, clamps,
LeakyReLU, Hardsigmoid) and piecewise polynomials (Tanh, SiLU, GELU, Hardswish), each against the
real function with its error bound, its bytes per element and its rounds."""

import math

import pytest
import torch

from secdfd.common.engine.protocols import arith, compare, piecewise, spline
from secdfd.common.engine.ring import FixedPoint

L = 32  # the deployment's comparison range
N = 64 * 300  # whole words: the byte counts below are exact


def _inputs() -> torch.Tensor:
    """A dense grid where the functions bend, values on every breakpoint, and the range's edges."""
    x = torch.linspace(-16, 16, N - 16, dtype=torch.float64)
    edges = [0.0, 1e-5, -1e-5, 3.0, -3.0, 6.0, 12.0, 1e3, -1e3, 3e4, -3e4, 65000.0, -65000.0, 0.5, -4.5, 5.0]
    return torch.cat([x, torch.tensor(edges, dtype=torch.float64)])


PIECES = {
    "relu6": (piecewise.hardtanh(0.0, 6.0), 0),
    "hardtanh": (piecewise.hardtanh(-1.0, 1.0), 0),
    "clamp_max": (piecewise.clamp_max(2.5), 0),
    "leaky_relu": (piecewise.leaky_relu(0.01), piecewise.SLOPE_BITS),
    "hardsigmoid": (piecewise.hardsigmoid(), piecewise.SLOPE_BITS),
}
TORCH = {
    "relu6": torch.nn.functional.relu6,
    "hardtanh": torch.nn.functional.hardtanh,
    "clamp_max": lambda x: x.clamp(max=2.5),
    "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01),
    "hardsigmoid": torch.nn.functional.hardsigmoid,
}


@pytest.mark.parametrize("name", sorted(PIECES))
@pytest.mark.parametrize("shift", [0, 16])
def test_piecewise_linear_is_exact(run2, name, shift):
    p, slope_bits = PIECES[name]
    assert p.slope_bits == slope_bits
    x = _inputs()
    xr = FixedPoint(16).encode(x) << shift  # the input of a fused truncation carries shift more bits
    K = len(p.breaks)
    out, fig = run2(lambda s: piecewise.deal_pieces(s, N, shift, L, K),
                    lambda c, R, v: piecewise.pieces(c, R=R, x=v, p=p, shift=shift), xr, 16, L)
    y = FixedPoint(16 + slope_bits).decode(out)
    exact = TORCH[name](FixedPoint(16).decode(FixedPoint(16).encode(x)))  # the encoded input, exactly
    # integer slopes: the truncation's unit at most; other slopes: |x| 2^-21 from their encoding
    bound = 2.0**-16 * (1 if shift else 0) + 1e-12 + (x.abs() * 2.0**-21 + 2.0**-36 if slope_bits else 0)
    assert bool(((y - exact).abs() <= bound).all())
    assert fig["rounds"] == 2 + compare.tree_rounds(L, K * N) == 3  # K * N is within the one-round bound
    assert fig["bytes_per_party"][0] == arith.open_nbytes(shift, N) + K * N * (compare.tree_bits(L, K * N) + 1) // 8


# the fit's own error (spline.py) plus a few units of 2^-16: each truncation is within one unit either way
FUNCTIONS = {"tanh": 2.3e-4, "silu": 2.3e-4, "gelu": 1.6e-4, "gelu_tanh": 1.6e-4, "hardswish": 8e-5}


def _fixed_point_units(sp: spline.Spline) -> float:
    """Units of 2^-16 the fixed point adds to the fit's error, at most: the input's encoding (half a
    unit) and its truncation (one) times the steepest piece's slope, the truncations of x^2 and x^3
    (one each) times the largest c2 and c3, the output's truncation and the coefficients' 32-bit
    encoding (one each). Which way each truncation rounds depends on the masks, so a bound tighter
    than this fails now and then (tanh after a 40-bit truncation: 2.312e-4 once against 2.3e-4)."""
    slope = 0.0
    edges = (-8.0, *sp.breaks, 8.0)
    for c, lo, hi in zip(sp.polys, edges[:-1], edges[1:], strict=True):
        t = torch.linspace(lo, hi, 1001, dtype=torch.float64)
        d = sum(j * c[j] * t ** (j - 1) for j in range(1, sp.degree + 1))
        slope = max(slope, float(torch.as_tensor(d).abs().max()) + (1.0 if sp.tail and lo >= sp.breaks[-1] else 0.0))
    high = [max(abs(c[j]) for c in sp.polys) for j in range(2, sp.degree + 1)]
    return 1.5 * slope + sum(high) + 2


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_spline_error_bytes_and_rounds(run2, name):
    sp = spline.get(name)
    shift = 16 if name in ("gelu", "hardswish") else 0
    x = _inputs()
    out, fig = run2(lambda s: spline.deal_spline(s, N, shift, 16, L, sp),
                    lambda c, R, v: spline.spline(c, v, R, sp, shift), FixedPoint(16).encode(x) << shift, 16, L)
    err = (FixedPoint(16).decode(out) - spline.FUNCTIONS[name](x)).abs().max().item()
    assert err <= FUNCTIONS[name]
    D, K = sp.degree, len(sp.breaks)
    # 4 rounds with one-round comparison trees (K * N = 211,200 comparisons at most, within their
    # bound). The powers come from the first opening and each u_k x^j is local once the comparison
    # bits are open: no opening of x - a, no Beaver products, no bit for the tail.
    assert fig["rounds"] == 3 + compare.tree_rounds(L, K * N) == 4
    f = 16
    opened = (arith.open_nbytes(shift, N) + sum(arith.open_nbytes((j - 1) * f, N) for j in range(2, D + 1))
              + arith.open_nbytes(spline.COEF_BITS, N))
    bits = K * (compare.tree_bits(L, K * N) + 1)
    assert fig["bytes_per_party"][0] == opened + N * bits // 8


def test_gelu_within_1e3_over_the_real_line():
    """The fit itself, measured: every float64 from -70000 to 70000 on a 1e-4 grid near the bends."""
    sp = spline.get("gelu")
    near = torch.arange(-60_000, 60_001, dtype=torch.float64) * 1e-4  # [-6, 6] step 1e-4
    far = torch.cat([torch.linspace(-7e4, -6, 20_001, dtype=torch.float64),
                     torch.linspace(6, 7e4, 20_001, dtype=torch.float64)])
    for x in (near, far):
        err = (spline.reference(sp, x) - torch.nn.functional.gelu(x)).abs().max().item()
        assert err <= 1.0e-4  # the contract is 1e-3; the fixed point adds a few 2^-16
    for name, bound in (("tanh", 1.9e-4), ("silu", 1.7e-4), ("gelu_tanh", 1.0e-4), ("hardswish", 1e-12)):
        ref = spline.reference(spline.get(name), near)
        assert (ref - spline.FUNCTIONS[name](near)).abs().max().item() <= bound


def test_splines_are_constant_or_linear_outside_their_breakpoints():
    for name in spline.SPLINES:
        sp = spline.get(name)
        assert not any(sp.polys[0][1:]) and not any(sp.polys[-1][1:])
        assert sp.degree <= spline.MAX_DEGREE and math.isclose(sp.breaks[0], -sp.breaks[-1]) or name == "hardswish"


@pytest.mark.parametrize(("name", "L", "shift"), [("silu", 22, 40), ("tanh", 22, 40), ("tanh", 20, 43)])
def test_spline_powers_after_a_fused_truncation_of_more_than_32_bits(run2, name, L, shift):
    # Narrow comparisons leave room for wide fused truncations (up to 63 - L bits). The powers come
    # from the first opening x = P - s + Q m with Q = 2^(64 - k) q: for k > 32, Q^2 no longer vanishes
    # mod 2^64 (the terms Q^2 m and Q^2 (m s) of x^2 and x^3), and for k >= 43 neither does Q^3 (the
    # term Q^3 m of x^3; m is a bit).
    sp = spline.get(name)
    edge = 7.9 if L == 22 else 6.9  # x - t stays inside the comparison range for every breakpoint t
    x = torch.cat([torch.linspace(-edge, edge, N - 4, dtype=torch.float64),
                   torch.tensor([0.0, 2.25, -3.75, 5.0], dtype=torch.float64)])
    out, fig = run2(lambda s: spline.deal_spline(s, N, shift, 16, L, sp),
                    lambda c, R, v: spline.spline(c, v, R, sp, shift), FixedPoint(16).encode(x) << shift, 16, L)
    err = (FixedPoint(16).decode(out) - spline.FUNCTIONS[name](x)).abs().max().item()
    fit = (spline.reference(sp, x) - spline.FUNCTIONS[name](x)).abs().max().item()
    assert err <= fit + _fixed_point_units(sp) * 2.0**-16
    assert fig["rounds"] == 3 + compare.tree_rounds(L, len(sp.breaks) * N)
