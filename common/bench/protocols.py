"""Protocol and model benchmarks with both parties in one process (`secdfd bench protocols|model`).

Both parties run in one process (two threads over an in-memory channel); the figures are what one
party sends, the rounds of the whole computation, and what the dealer sends both parties. Timings
are wall-clock on this machine; compare ratios measured side by side in one run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from secdfd.common.engine.channel import pair, run_pair
from secdfd.common.engine.driver import drive
from secdfd.common.engine.protocols import arith, compare, piecewise, pool, sigmoid, spline
from secdfd.common.engine.protocols.base import Ctx, Proto
from secdfd.common.engine.randomness import Source
from secdfd.common.engine.ring import FixedPoint
from secdfd.common.engine.sharing import share


def run_protocol(
    deal: Callable[[Source], Any],
    proto: Callable[[Ctx, Any, torch.Tensor], Proto[torch.Tensor]],
    x: torch.Tensor,
    frac: int = 16,
    cmp_bits: int = 40,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Deal, share x (ring), run both parties; return the reconstructed ring output and figures."""
    from secdfd.common.engine.prng import new_seed

    seeds = (new_seed(), new_seed())
    t0 = time.perf_counter()
    dsrc = Source.dealer(seeds, "bench")
    deal(dsrc)
    dealer_s = time.perf_counter() - t0
    R0 = deal(Source.party(0, seeds[0], "bench"))
    R1 = deal(Source.party(1, seeds[1], "bench", dsrc.corrections))
    x0, x1 = share(x)
    c0, c1 = pair()
    t1 = time.perf_counter()
    y0, y1 = run_pair(
        lambda: drive(c0, proto(Ctx(0, frac, cmp_bits), R0, x0), "bench"),
        lambda: drive(c1, proto(Ctx(1, frac, cmp_bits), R1, x1), "bench"),
    )
    online = time.perf_counter() - t1
    dealer_bytes = sum(t.numel() * t.element_size() for t in dsrc.corrections) + 64
    return y0 + y1, {
        "seconds": online,
        "bytes_per_party": [c0.stats.bytes, c1.stats.bytes],
        "rounds": c0.stats.rounds,
        "dealer_bytes": dealer_bytes,
        "dealer_seconds": dealer_s,
    }


def bench_protocols(n: int, frac: int = 16, cmp_bits: int = 40) -> dict[str, dict[str, Any]]:
    """Per protocol: seconds, bytes per party per element, rounds, dealer bytes per element, error."""
    fp = FixedPoint(frac)
    gen = torch.Generator().manual_seed(7)  # benchmark data only; never used for secrets
    xr = torch.randn(n, generator=gen, dtype=torch.float64) * 8
    x = fp.encode(xr)
    out: dict[str, dict[str, Any]] = {}

    def record(name: str, y: torch.Tensor, fig: dict[str, Any], ref: torch.Tensor, elements: int) -> None:
        out[name] = {
            "elements": elements,
            "seconds": fig["seconds"],
            "bytes_per_party_per_element": fig["bytes_per_party"][0] / elements,
            "rounds": fig["rounds"],
            "dealer_bytes_per_element": fig["dealer_bytes"] / elements,
            "max_abs_error": float((fp.decode(y) - ref).abs().max()),
        }

    y2 = fp.encode(torch.randn(n, generator=gen, dtype=torch.float64) * 8)
    y, fig = run_protocol(lambda s: _MulTrunc(arith.deal_mul(s, (n,), (n,)), arith.deal_trunc(s.child("t"), n, frac)),
                          lambda c, R, a: _mul_then_trunc(c, R, a, y2), x, frac, cmp_bits)
    record("mul", y, fig, fp.decode(x) * fp.decode(y2), n)  # the product with its truncation
    xx = x * (1 << frac)  # a product at scale 2f
    y, fig = run_protocol(lambda s: arith.deal_trunc(s, n, frac), lambda c, R, a: arith.trunc(c, a, R, frac), xx,
                          frac, cmp_bits)
    record("trunc", y, fig, fp.decode(x), n)
    y, fig = run_protocol(lambda s: compare.deal_relu(s, n, 0, cmp_bits), lambda c, R, a: compare.relu(c, a, R, 0), x,
                          frac, cmp_bits)
    record("relu", y, fig, fp.decode(x).clamp(min=0), n)
    side = max(2, int((n // 64) ** 0.5))
    shape = (1, 64, side, side)
    xm = fp.encode(torch.randn(shape, generator=gen, dtype=torch.float64) * 8)
    y, fig = run_protocol(lambda s: pool.deal_maxpool(s, shape, 3, 2, 1, cmp_bits),
                          lambda c, R, a: pool.maxpool2d(c, a, R, 3, 2, 1), xm, frac, cmp_bits)
    record("maxpool", y, fig, torch.nn.functional.max_pool2d(fp.decode(xm), 3, 2, 1), xm.numel())
    ns = max(64, n // 8)
    xs = fp.encode(torch.linspace(-60, 60, ns, dtype=torch.float64))
    y, fig = run_protocol(lambda s: sigmoid.deal_sigmoid(s, ns, 0, frac, cmp_bits),
                          lambda c, R, a: sigmoid.sigmoid(c, a, R, 0), xs, frac, cmp_bits)
    record("sigmoid", y, fig, torch.sigmoid(fp.decode(xs)), ns)
    p6 = piecewise.hardtanh(0.0, 6.0)
    y, fig = run_protocol(lambda s: piecewise.deal_pieces(s, n, 0, cmp_bits, 2),
                          lambda c, R, a: piecewise.pieces(c, a, R, p6, 0), x, frac, cmp_bits)
    record("relu6", y, fig, fp.decode(x).clamp(0, 6), n)
    gelu = spline.get("gelu")
    y, fig = run_protocol(lambda s: spline.deal_spline(s, ns, 0, frac, cmp_bits, gelu),
                          lambda c, R, a: spline.spline(c, a, R, gelu, 0), xs, frac, cmp_bits)
    record("gelu", y, fig, torch.nn.functional.gelu(fp.decode(xs)), ns)
    return out


class _MulTrunc:
    def __init__(self, mul: Any, trunc: Any) -> None:
        self.mul, self.trunc = mul, trunc


def _mul_then_trunc(ctx: Ctx, R: Any, x: torch.Tensor, y_ring: torch.Tensor) -> Proto[torch.Tensor]:
    # The second operand is shared by party 0 alone here (party 1 holds 0): a valid sharing.
    y = y_ring if ctx.party == 0 else torch.zeros_like(y_ring)
    z = yield from arith.mul(ctx, x, y, R.mul)
    return (yield from arith.trunc(ctx, z, R.trunc, ctx.frac))


def bench_model(model: nn.Module, shape: tuple[int, ...], seed: int = 0, frac: int = 16, cmp_bits: int = 40,
                runs: int = 1) -> dict[str, Any]:
    from secdfd.common.engine.twoparty import TwoParty

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g)
    tp = TwoParty(model, shape, frac, cmp_bits)
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        ref = model(x)
        plain_s = time.perf_counter() - t
    best = None
    for _ in range(runs):
        y, rep = tp(x)
        if best is None or rep.seconds < best[1].seconds:
            best = (y, rep)
    assert best is not None
    y, rep = best
    d = rep.as_dict()
    d.update({
        "input_shape": list(shape),
        "max_abs_error": float((y - ref.double()).abs().max()),
        "plaintext_seconds": plain_s,
        "plan": tp.plan.describe(),
    })
    return d


