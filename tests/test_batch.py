"""Several inputs in one secure inference (`Plan.batched`): each input's result is what it gets alone,
the rounds are those of one input, the bytes are N times one input's, and a plan that would mix the
inputs of a batch is refused with the step that does it."""

from __future__ import annotations

import pytest
import torch
from test_zoo import ZOO, zoo_model
from torch import nn

from secdfd.common.engine.evaluator import Dealer
from secdfd.common.engine.plan import build_plan
from secdfd.common.engine.protocols import compare
from secdfd.common.engine.randomness import MAX_BATCH, Bundle
from secdfd.common.engine.twoparty import TwoParty
from secdfd.common.errors import PlanError, RandomnessError


def _tiny_dfdnet(size: int = 32) -> nn.Module:
    from secdfd.common.ml.dfdnet import FusedDFDNet, build_model, init_weights

    torch.manual_seed(0)  # test weights only
    streams = [build_model("dfdnet-s", size), build_model("dfdnet-s", size)]
    for s in streams:
        init_weights(s)
    return FusedDFDNet(*streams).eval()


def test_a_batch_of_three_dfdnet_crops_gives_each_crop_its_own_result_in_the_rounds_of_one():
    m = _tiny_dfdnet()
    tp = TwoParty(m, (1, 3, 32, 32), cmp_bits=32)
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    y3, rep3 = tp(x)
    y1, rep1 = tp(x[1:2])
    with torch.no_grad():
        ref = m(x).double()
    assert y3.shape == (3, 1)
    assert (y3 - ref).abs().max().item() <= 1e-3
    assert abs(y3[1, 0].item() - y1[0, 0].item()) <= 1e-3
    assert rep3.rounds == rep1.rounds
    # the openings are those of three crops, less the padding of packed bit planes shared by the batch
    # (4_313_262 and 11_776_266 with two-round comparison trees, which open 16 bits, not 10, and with
    # products of a sigmoid's gate and a truncation's result that opened the gate; 3_931_134 and
    # 10_775_514 with a truncation between each depthwise and pointwise conv; 3_845_586 and 10_518_870
    # with five-round sigmoids that opened x - a and Beaver products; 3_515_858 and 9_708_886 with the
    # 2 bits above a 30-bit truncation's 4 bytes sent as a whole byte; 3_445_730 and 9_497_574 with the
    # spatial attention's channel mean truncated after the cat with the channel max; 3_446_342 and
    # 9_499_410 in 579 rounds with max layers of up to 8; 3_584_742 and 9_860_290 while a max layer opened
    # its differences, not its values; 3_242_326 and 9_192_722 in 569 rounds while channel attention's
    # max after an entry block's max-pool waited for the pool, and a gated max-pooled map was opened
    # by its product; 3_298_326 and 9_378_338 in 551 rounds while the fusion's fixed difference and mean
    # were layers with secret weights and each channel MLP's second conv opened its ReLU's output)
    assert rep1.bytes_per_party == [3_294_178] * 2
    assert rep3.bytes_per_party == [9_366_342] * 2
    assert rep1.rounds == 536
    # the dealt bits of the wide maxima's selectors pad to 64 rows, which three crops fill better
    assert 2.3 * rep1.dealer_bytes < rep3.dealer_bytes < 3 * rep1.dealer_bytes  # 2.49 measured


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_run_batched_with_each_result_as_alone(name):
    m, shape = zoo_model(name)
    plan = build_plan(m, shape, cmp_bits=32)
    assert plan.batch_refusal() is None
    tp = TwoParty(m, shape, cmp_bits=32)
    x = torch.rand((2, *shape[1:]), generator=torch.Generator().manual_seed(5)) * 2 - 1
    y, rep = tp(x)
    with torch.no_grad():
        ref = m(x).double()
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= 2e-4
    # the rounds of one input: the largest comparison step, efficientnet's two SiLUs over 32 x 12 x 12
    # with 11 breaks, compares 2 x 50,688 values, within compare.ONE_ROUND_MAX
    assert compare.ONE_ROUND_MAX >= 2 * 50_688
    assert rep.rounds == ZOO[name][2]
    # twice one input's openings, less the padding of packed bit planes the two share (and a maximum's
    # layers, planned for twice the rows, may be laid out more cheaply: cbam's small maxima, whose
    # bits fill few words, 1.75 times)
    assert 1.7 * ZOO[name][1] <= rep.bytes_per_party[0] <= 2 * ZOO[name][1]


class _FoldsTheBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).reshape(-1)  # one flat vector: the batch dimension is gone


class _SumsTheBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).sum(dim=0, keepdim=True)


class _Transposes(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).transpose(0, 1)


@pytest.mark.parametrize(("module", "why"), [
    (_FoldsTheBatch(), "the batch dimension does not stay in front"),
    (_SumsTheBatch(), "reduces over the batch dimension"),
    (_Transposes(), "does not stay in front"),
])
def test_a_plan_that_mixes_the_inputs_of_a_batch_is_refused_with_its_step(module, why):
    plan = build_plan(module, (1, 4, 2, 2))
    assert why in (plan.batch_refusal() or "")
    with pytest.raises(PlanError, match="cannot run several inputs at once"):
        plan.batched(2)
    assert plan.batched(1) is plan  # one input at a time always works


def test_batch_sizes_are_bounded_and_a_bundle_says_its_batch():
    plan = build_plan(nn.ReLU(), (1, 4))
    for n in (0, MAX_BATCH + 1):
        with pytest.raises(PlanError, match=f"1 to {MAX_BATCH}"):
            plan.batched(n)
    assert plan.batched(5).input_shape == (5, 4)
    assert [s.shape[0] for s in plan.batched(5).steps] == [5] * len(plan.steps)
    b0, b1 = Dealer(plan, "ab" * 16).bundle("7", 5)
    again = Bundle.from_bytes(b1.to_bytes())
    assert (b0.batch, again.batch, again.bundle_id) == (5, 5, "7")
    # a bundle claiming a batch outside the bounds is malformed, never a huge allocation
    forged = Bundle("8", 1, b1.seed, batch=MAX_BATCH + 1).to_bytes()
    with pytest.raises(RandomnessError, match="malformed bundle"):
        Bundle.from_bytes(forged)


def test_a_bundle_for_one_batch_size_cannot_serve_another():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).eval()
    tp = TwoParty(m, (1, 3, 8, 8))
    b0, _ = tp.dealer.bundle("x", 2)
    r0 = tp.parties[0].prepare(b0)
    with pytest.raises(ValueError, match="the bundle is for"):
        tp.parties[0].run(torch.zeros(3, 3, 8, 8, dtype=torch.int64), r0)
