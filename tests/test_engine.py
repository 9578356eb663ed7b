"""Secure evaluation of whole modules: the CNN block of the engine's bars, attention, and a reduced
DFDNet, against plaintext PyTorch."""

from pathlib import Path

import pytest
import torch
from torch import nn

from secdfd.common.cli.bench import load_factory
from secdfd.common.engine.evaluator import Dealer, Party
from secdfd.common.engine.plan import ShiftAttrs, build_plan
from secdfd.common.engine.twoparty import TwoParty

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _randomise_bn(m: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for b in m.modules():
        if isinstance(b, nn.BatchNorm2d):
            b.running_mean.copy_(torch.rand(b.num_features, generator=g) - 0.5)
            b.running_var.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.weight.data.copy_(torch.rand(b.num_features, generator=g) + 0.5)
            b.bias.data.copy_(torch.rand(b.num_features, generator=g) * 0.4 - 0.2)


def test_cnn_block_bars_at_full_size():
    # the same factory as `secdfd bench model examples/cnn_block.py:build`
    m = load_factory(str(EXAMPLES / "cnn_block.py") + ":build")
    tp = TwoParty(m, (1, 3, 128, 128))
    x = torch.rand(1, 3, 128, 128)
    y, rep = tp(x)
    with torch.no_grad():
        ref = m(x).double()
    assert (y - ref).abs().max().item() <= 1e-3
    assert rep.rounds <= 240
    assert max(rep.bytes_per_party) <= 125e6
    assert rep.bytes_per_party[0] == rep.bytes_per_party[1]  # symmetric protocols
    # per-step breakdown adds up to the totals
    assert sum(s.bytes_per_party[0] for s in rep.steps) == rep.bytes_per_party[0]
    # a second inference uses a fresh bundle and gives the same answer
    y2, rep2 = tp(x)
    assert (y2 - ref).abs().max().item() <= 1e-3 and rep2.rounds == rep.rounds


def test_reduced_dfdnet_matches_plaintext():
    from secdfd.common.ml.dfdnet import FusedDFDNet, build_model, init_weights

    torch.manual_seed(0)
    streams = [build_model("dfdnet-s", 64), build_model("dfdnet-s", 64)]
    for s in streams:
        init_weights(s)
        _randomise_bn(s)
    fused = FusedDFDNet(*streams).eval()
    tp = TwoParty(fused, (1, 3, 64, 64))
    x = torch.rand(1, 3, 64, 64)
    y, rep = tp(x)
    with torch.no_grad():
        ref = fused(x).double()
    assert y.shape == (1, 1)
    assert (y - ref).abs().max().item() <= 1e-3
    assert 0.0 <= y.item() <= 1.0
    assert rep.rounds <= 1500


def test_setup_can_run_again_after_a_peer_restart():
    from secdfd.common.engine.channel import run_pair

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()
    tp = TwoParty(m, (1, 3, 8, 8))
    x = torch.rand(1, 3, 8, 8)
    F_before = {k: v.clone() for k, v in tp.parties[0].weights.F.items()}
    run_pair(tp.parties[0].setup, tp.parties[1].setup)
    assert all(torch.equal(F_before[k], v) for k, v in tp.parties[0].weights.F.items())
    y, _ = tp(x)
    with torch.no_grad():
        assert (y - m(x).double()).abs().max().item() <= 1e-3


class _ConvGate(nn.Module):
    """conv -> conv (a truncation feeds a linear layer) and x * sigmoid(mean x) (one feeds a product)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(self.a(x))
        return y * torch.sigmoid(y.mean(dim=(2, 3), keepdim=True))


def _secure_small(m: nn.Module, seed: int):
    """m (eval) on a random 1x3x8x8 input, securely: (TwoParty, report), after checking the result
    against plaintext within 1e-3."""
    torch.manual_seed(seed)
    m = m.eval()
    tp = TwoParty(m, (1, 3, 8, 8))
    x = torch.rand(1, 3, 8, 8)
    y, rep = tp(x)
    with torch.no_grad():
        ref = m(x).double()
    assert (y - ref).abs().max().item() <= 1e-3
    return tp, rep


def test_layers_after_a_truncation_reuse_its_opening():
    # The truncation of a's output is opened once (6 bytes per element); b reuses it and opens 2 bytes
    # per element (the low 16 bits of q m), not 8. The product's other operand is a sigmoid's result,
    # itself a truncation's: the product opens nothing and takes no round. The results match plaintext.
    tp, rep = _secure_small(_ConvGate(), 3)
    by_step = {s.index: s for s in rep.steps}
    ops = {s.index: s.op for s in tp.plan.steps}
    fed = [s for s in tp.plan.steps if s.op in ("linear", "mul") and any(ops[i] == "trunc" for i in s.inputs)]
    assert {s.op for s in fed} == {"linear", "mul"}
    for s in fed:
        t = next(i for i in s.inputs if ops[i] == "trunc")
        n = _numel(tp.plan.steps[t].shape)
        other = sum(8 * _numel(tp.plan.steps[i].shape) for i in s.inputs if i != t)
        assert by_step[t].bytes_per_party[0] == 6 * n  # the 48 bits above the 16-bit shift
        if s.op == "mul":
            assert sorted(ops[i] for i in s.inputs) == ["sigmoid", "trunc"]
            assert (by_step[s.index].bytes_per_party, by_step[s.index].rounds) == ((0, 0), 0)
        else:
            assert by_step[s.index].bytes_per_party[0] == 2 * n + other


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _EdgeMaxima(nn.Module):
    """Maxima after truncations the reuse does not take (a 24-bit one after an average pool) or
    that have no comparison layer at all (a 1-wide window, a max over one channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        p = nn.functional.max_pool2d(nn.functional.avg_pool2d(y, 2), 2)  # after a 24-bit truncation
        q = nn.functional.max_pool2d(y, 1, 2)  # 1-wide window: no comparison
        r = torch.amax(self.b(y), dim=1, keepdim=True)  # over one channel: no comparison
        return p.sum() + q.mean() + r.mean()


def test_maxima_after_truncations_they_cannot_or_need_not_reuse():
    _secure_small(_EdgeMaxima(), 4)


class _SepConvs(nn.Module):
    """Two separable convs (depthwise then pointwise), a ReLU between them and a max-pool after."""

    def __init__(self) -> None:
        super().__init__()
        self.dw1 = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.pw1 = nn.Conv2d(3, 6, 1)
        self.dw2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw2 = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pw2(self.dw2(torch.relu(self.pw1(self.dw1(x)))))
        return nn.functional.max_pool2d(y, 2)


def _secure_at_32(m: nn.Module, chain: bool):
    torch.manual_seed(6)
    m = m.eval()
    tp = TwoParty(m, (1, 3, 8, 8), cmp_bits=32, chain=chain)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y, rep = tp(x)
    with torch.no_grad():
        ref = m(x).double()
    return tp, rep, (y - ref).abs().max().item()


def test_a_pointwise_conv_takes_the_depthwise_product_untruncated():
    # At 32-bit comparisons the pointwise conv reads the depthwise conv's 2f product (weights at f - 2
    # bits): no truncation between them. Its 3f - 2 output fuses into the ReLU (shift 30), and the
    # max-pool reuses the opening of the 30-bit truncation: one round fewer per pair, the same bytes
    # where the truncation's 6 + 2 become the pointwise's 8, fewer where a 30-bit shift sends 34 bits
    # (4.25 bytes: the 2 bits past the int32 as bit planes).
    m = _SepConvs()
    tp, rep, err = _secure_at_32(m, chain=True)
    tp0, rep0, err0 = _secure_at_32(m, chain=False)
    assert err <= 1e-3 and err0 <= 1e-3
    ops = [s.op for s in tp.plan.steps]
    assert ops == ["input", "linear", "linear", "relu", "linear", "linear", "trunc", "maxpool", "output"]
    assert [s.op for s in tp0.plan.steps].count("trunc") == 3
    pw1, relu, pw2, trunc = (tp.plan.steps[i] for i in (2, 3, 5, 6))
    assert (tp.plan.steps[pw1.inputs[0]].scale, pw1.scale, pw2.scale) == (32, 46, 46)
    assert relu.get(ShiftAttrs).shift == 30 and trunc.get(ShiftAttrs).shift == 30
    assert tp.plan.weight_fracs()["pw1.weight"] == 14 and tp.plan.weight_fracs()["pw1.bias"] == 46
    assert rep.rounds == rep0.rounds - 2
    by, by0 = ({op: [s.bytes_per_party[0] for s in r.steps if s.op == op] for op in ("linear", "trunc", "relu",
                                                                                     "maxpool")} for r in (rep, rep0))
    assert by["linear"][1] == 8 * 3 * 64 and by0["linear"][1] == 2 * 3 * 64  # the pointwise opens the product
    assert by["trunc"] == [4 * 4 * 64 + 2 * 8 * 4] and by0["trunc"] == [6 * 3 * 64, 6 * 6 * 64, 6 * 4 * 64]
    assert sum(by["linear"] + by["trunc"]) < sum(by0["linear"] + by0["trunc"])
    assert by["maxpool"] == by0["maxpool"]  # reused at 30 bits as at 16
    assert by["relu"][0] < by0["relu"][0]


class _SharedPointwise(nn.Module):
    """One pointwise conv applied to a depthwise product (chained) and then to a ReLU's result."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.pw = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw(self.dw(x)) + self.pw(torch.relu(x)))


def test_a_weight_shared_by_a_chained_layer_lifts_its_other_inputs():
    tp, rep, err = _secure_at_32(_SharedPointwise(), chain=True)
    assert err <= 1e-3
    lift = next(s for s in tp.plan.steps if s.name.endswith(".lift"))
    assert lift.op == "add" and (tp.plan.steps[lift.inputs[0]].scale, lift.scale) == (16, 32)
    assert {s.scale for s in tp.plan.steps if s.op == "linear" and s.name == "pw"} == {46}


def test_comparisons_wider_than_the_plan_are_refused():
    m = _SepConvs().eval()
    plan = build_plan(m, (1, 3, 8, 8), cmp_bits=32)
    with pytest.raises(ValueError, match="comparisons of 40 bits on a plan lowered for 32"):
        Dealer(plan, "ab" * 16, cmp_bits=40)
    p0, _ = Dealer(plan, "ab" * 16, cmp_bits=32).provision()
    with pytest.raises(ValueError, match="comparisons of 40 bits on a plan lowered for 32"):
        Party(0, plan, {}, p0, None, cmp_bits=40)  # type: ignore[arg-type]


class _Large(nn.Module):
    """A depthwise conv (x 200) and a chained pointwise one (x 1.5) whose outputs reach 60,000: near
    the edge of the 32-bit comparison range (|x| < 2^16), which a chained layer's 3f - 2 scale keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(3, 3, 1, groups=3, bias=False)
        self.pw = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.dw.weight.fill_(200.0)
            self.pw.weight.copy_(torch.eye(3).view(3, 3, 1, 1) * 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pw(self.dw(x)))  # the fused truncation sees values up to 60,000


def test_a_chained_layer_is_exact_up_to_the_comparison_range():
    m = _Large().eval()
    tp = TwoParty(m, (1, 3, 8, 8), cmp_bits=32)
    assert any(s.op == "linear" and s.scale == 46 for s in tp.plan.steps)
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 200
    y, _ = tp(x)
    with torch.no_grad():  # float64 on the input as encoded (2^-16 steps): what remains is truncation
        ref = m.double()(torch.round(x.double() * 65536) / 65536)
    assert float(ref.max()) > 59_000
    assert (y - ref).abs().max().item() <= 1e-3
