"""The conformance zoo: small models written as their home codebases write them (tests/zoo/), each
lowered with no change, evaluated securely (both parties in one process, the deployment's 32-bit
comparisons) and in plaintext. Bytes and rounds depend on shapes only, so they are exact."""

from __future__ import annotations

import importlib
import time

import pytest
import torch
from torch import nn

from secdfd.common.engine.plan import Plan, build_plan
from secdfd.common.engine.twoparty import TwoParty

# model: (max abs error, bytes per server, rounds)
ZOO: dict[str, tuple[float, int, int]] = {
    "se_resnet": (2e-4, 64_924, 19),
    # cbam: its channel and spatial maxima take wider layers since reduce_plan weighs 200 kB per round
    # (was 187_960 bytes, 68 rounds with max-of-4 layers)
    # Layers, products and maxima fed by a truncation reuse its opening, and a truncation sends only
    # the bits above its shift (were 83_712, 211_744, 816_536, 115_768, 1_420_904, 678_200 bytes;
    # cbam 62 and xception_ff 82 rounds). Every comparison tree is one round (6 leaf groups under one
    # node), opening 10 bits instead of 16 (were 72_396, 150_152, 700_776, 97_336, 1_227_912,
    # 455_176 bytes and 25, 61, 30, 24, 42, 79 rounds). A gate from a sigmoid times a truncation's
    # result costs nothing (cbam and efficientnet were 137_672 and 1_137_672 bytes, 51 and 37 rounds).
    # A linear layer on a product at 2f (a depthwise conv, a gated feature map) takes it untruncated
    # with weights at f - 1 bits (mobilenetv3, shufflenet, efficientnet and xception_ff were 686_808,
    # 94_696, 1_126_024 and 433_672 bytes, 26, 20, 36 and 66 rounds). Splines and sigmoids take four
    # rounds: powers from the first opening, each comparison bit times each power local once the bits
    # are open (se_resnet, cbam, mobilenetv3 and efficientnet were 70_284, 133_672, 684_504 and
    # 1_128_328 bytes, 21, 50, 25 and 35 rounds). The 2 bits above a 30-bit truncation's 4 bytes travel
    # as bit planes, not as a fifth byte (mobilenetv3, shufflenet, efficientnet and xception_ff were
    # 314_712, 93_400, 539_392 and 419_464 bytes). A channel mean beside the channel max is truncated on
    # its own, in the rounds of the max, not after the cat (cbam was 119_336 bytes and 47 rounds).
    # Maxima take layers of up to 12, weighing the selectors' dealt monomials: cbam's small maxima
    # trade 58 kB for 3 rounds (it was 119_636 bytes and 46 rounds with layers of up to 8). A layer of
    # 4 or more opens each value once, not each difference (cbam was 177_972 bytes). A product of a
    # truncation's result and another value remasks the other as soon as it exists, and is then local
    # (se_resnet, cbam, mobilenetv3 and efficientnet were 66_700, 106_292, 312_984 and 537_664 bytes,
    # 20, 43, 23 and 30 rounds). A small matrix layer takes a ReLU's output in masked form, with no
    # opening (se_resnet, cbam and mobilenetv3 were 64_972, 103_092 and 312_856 bytes, 20, 43 and 22
    # rounds).
    "cbam": (2e-4, 102_996, 41),
    "mobilenetv3": (2e-4, 312_792, 21),
    "shufflenet": (2e-4, 92_440, 18),
    "efficientnet": (2e-4, 537_536, 29),
    "xception_ff": (2e-4, 408_072, 60),
}


def randomise_bn(m: nn.Module, seed: int = 1) -> None:
    """Trained-looking BatchNorm statistics, so that folding them matters (test weights only)."""
    g = torch.Generator().manual_seed(seed)
    for b in m.modules():
        if isinstance(b, nn.modules.batchnorm._BatchNorm):
            b.running_mean.copy_((torch.rand(b.num_features, generator=g) - 0.5) * 0.4)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.weight.data.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.bias.data.copy_(torch.rand(b.num_features, generator=g) * 0.4 - 0.2)


def zoo_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    mod = importlib.import_module(f"zoo.{name}")
    torch.manual_seed(0)  # test weights only
    m = mod.build()
    randomise_bn(m)
    return m.eval(), tuple(mod.INPUT)


def run(name: str) -> dict[str, float]:
    m, shape = zoo_model(name)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m(x)
        t = time.perf_counter()
        ref = m(x).double()
        plain_s = time.perf_counter() - t
    tp = TwoParty(m, shape, cmp_bits=32)
    y, rep = tp(x)
    return {"error": (y - ref).abs().max().item(), "bytes": rep.bytes_per_party[0], "rounds": rep.rounds,
            "seconds": rep.seconds, "plain_seconds": plain_s, "steps": len(tp.plan.steps),
            "symmetric": rep.bytes_per_party[0] == rep.bytes_per_party[1]}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_secure_matches_plaintext(name):
    tol, nbytes, rounds = ZOO[name]
    fig = run(name)
    assert fig["error"] <= tol
    assert fig["symmetric"]
    assert (fig["bytes"], fig["rounds"]) == (nbytes, rounds)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_plan_survives_json(name):
    m, shape = zoo_model(name)
    plan = build_plan(m, shape, cmp_bits=32)
    assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()
