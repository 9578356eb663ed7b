"""SecChannel and SecSpatial: DFDNet's CBAM modules evaluated securely, alone and gating their input,
and the sharing of rounds by independent branches."""

import torch
from torch import nn

from secdfd.common.engine.twoparty import TwoParty
from secdfd.common.ml.dfdnet import ChannelAttention, SpatialAttention


class Gated(nn.Module):
    def __init__(self, att: nn.Module) -> None:
        super().__init__()
        self.att = att

    def forward(self, x):
        return self.att(x) * x


def _check(module: nn.Module, shape: tuple[int, ...], bound: float) -> int:
    torch.manual_seed(3)
    x = torch.randn(shape) * 2
    tp = TwoParty(module.eval(), shape)
    y, rep = tp(x)
    with torch.no_grad():
        ref = module(x).double()
    assert (y - ref).abs().max().item() <= bound
    return rep.rounds


def test_sec_channel_attention():
    torch.manual_seed(0)
    rounds = _check(ChannelAttention(64), (1, 64, 8, 8), 2e-4)
    # global max over 64 (2 layers of max-of-8, 8 rounds) dominates the avg branch; the shared MLP's
    # two calls run side by side: conv (1) + ReLU (3, its truncation fused) + conv (0: it takes the
    # ReLU's output in masked form) + sigmoid (4) = 8 (was 9, the second conv opening its input)
    assert rounds == 8 + 8
    _check(Gated(ChannelAttention(64)), (1, 64, 8, 8), 1e-3)


def test_sec_spatial_attention():
    torch.manual_seed(1)
    rounds = _check(SpatialAttention(), (1, 32, 12, 12), 2e-4)
    # channel max over 32 (max-of-4 then max-of-8: 8 rounds), conv7x7, sigmoid; the channel mean is
    # truncated on its own while the max runs, so the conv follows the max at once (was one round more)
    assert rounds == 8 + 1 + 4
    _check(Gated(SpatialAttention()), (1, 32, 12, 12), 1e-3)


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1))

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_independent_branches_share_rounds():
    one = TwoParty(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1)), (1, 3, 12, 12))
    two = TwoParty(TwoBranches(), (1, 3, 12, 12))
    x = torch.rand(1, 3, 12, 12)
    _, r1 = one(x)
    _, r2 = two(x)
    assert r2.rounds == r1.rounds  # the second branch adds bytes, not rounds
    assert r2.bytes_per_party[0] > 1.9 * r1.bytes_per_party[0]
