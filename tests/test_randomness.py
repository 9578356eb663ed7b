import pytest
import torch

from secdfd.common.engine.evaluator import Dealer
from secdfd.common.engine.plan import build_plan
from secdfd.common.engine.prng import new_seed
from secdfd.common.engine.randomness import Bundle, Provision, Source
from secdfd.common.errors import RandomnessError


def _deal(src: Source):
    a = src.ring("a", (10,))
    b = src.ring("b", (10,))
    c = src.ring_from("c", (10,), lambda: a * b)
    w = src.bits("w", (3,))
    x = src.bits_from("x", (3,), lambda: w & 5)
    return a, b, c, w, x


def test_seed_compression_gives_consistent_shares():
    seeds = (new_seed(), new_seed())
    d = Source.dealer(seeds, "s")
    a, b, c, w, x = _deal(d)
    p0 = _deal(Source.party(0, seeds[0], "s"))
    p1 = _deal(Source.party(1, seeds[1], "s", d.corrections))
    assert torch.equal(p0[0] + p1[0], a) and torch.equal(p0[1] + p1[1], b)
    assert torch.equal(p0[2] + p1[2], a * b)
    assert torch.equal(p0[3] ^ p1[3], w) and torch.equal(p0[4] ^ p1[4], w & 5)
    # only derived values travel: c (10 words) and x (3 words)
    assert sum(t.numel() for t in d.corrections) == 13


def test_bundle_single_use_and_roundtrip():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    plan = build_plan(model, (1, 1, 6, 6))
    dealer = Dealer(plan, "split-1")
    b0, b1 = dealer.bundle("id-1")
    with pytest.raises(RandomnessError):
        dealer.bundle("id-1")
    again = Bundle.from_bytes(b1.to_bytes())
    assert again.bundle_id == "id-1" and again.role == 1 and again.seed == b1.seed
    for k, ts in b1.corrections.items():
        assert all(torch.equal(x, y) for x, y in zip(ts, again.corrections[k], strict=True))
    b0.consume()
    with pytest.raises(RandomnessError):
        b0.consume()


def test_malformed_bundle_and_provision_rejected():
    with pytest.raises(RandomnessError):
        Bundle.from_bytes(b"\x05\x00\x00\x00hello")
    with pytest.raises(RandomnessError):
        Provision.from_bytes(b"\x02" + bytes(32))
    p = Provision(1, new_seed(), "s" * 32)
    assert Provision.from_bytes(p.to_bytes()) == p
