"""Shape idioms, functional forms, in-place calls and the new layers, each lowered and evaluated
securely (both parties in one process) against plaintext PyTorch; refusals that name the line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secdfd.common.engine.plaintext import run_plain
from secdfd.common.engine.plan import Plan, build_plan, extract_weights
from secdfd.common.engine.twoparty import TwoParty
from secdfd.common.errors import PlanError

CMP = 32


def check(m: nn.Module, shape: tuple[int, ...], tol: float = 1e-3, seed: int = 0) -> tuple[Plan, dict]:
    """Secure vs plaintext on one input; the plan survives JSON and its plaintext run is the module."""
    m.eval()
    g = torch.Generator().manual_seed(seed)  # test data only
    x = torch.rand(shape, generator=g) * 4 - 2
    plan = build_plan(m, shape, cmp_bits=CMP)
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).to_json() == plan.to_json()
    with torch.no_grad():
        ref = m(x).double()
    assert (run_plain(plan, extract_weights(m, plan), x) - ref).abs().max().item() < 1e-5
    y, rep = TwoParty(m, shape, cmp_bits=CMP)(x)
    assert y.shape == ref.shape
    assert (y - ref).abs().max().item() <= tol
    return plan, {"rounds": rep.rounds, "bytes": rep.bytes_per_party[0]}


class Shapes(nn.Module):
    """getitem with None, slices, ellipsis and integers; unsqueeze, squeeze, permute, transpose,
    contiguous, sizes as Python values, view/reshape from them, flatten(start_dim), chunk, split."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.size()
        y = x[:, 1:3, None, ::2][..., 1]  # (b, 2, 1, h//2)
        z = x[0, -1][None, None] + x.mean(dim=1, keepdim=True) * 0  # ints, negative index
        a, bb = x.chunk(2, dim=1)
        p, q, r = torch.split(x, [1, 1, c - 2], dim=1)
        t = x.permute(0, 2, 3, 1).contiguous().transpose(1, 2).reshape(b, -1)
        u = torch.flatten(z, start_dim=1)
        v = y.squeeze(2).unsqueeze(-1).view(b, -1)
        n = x.shape[2] * x.shape[3]
        return torch.cat([t, u, v, (a + bb).view(b, -1), (p - q + r.sum(1, keepdim=True)).reshape(b, n)], dim=1)


class Broadcasts(nn.Module):
    """expand, expand_as, repeat as a broadcast and as a tile, torch.stack, unbind, .T, x.dim()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = x.mean((2, 3))
        e = g.view(g.size(0), g.size(1), 1, 1).expand_as(x)
        f = x[:, :, :1, :1].expand(-1, -1, x.size(2), x.size(3))
        r = x[:, :1].repeat(1, x.size(1), 1, 1)  # a broadcast
        tile = x[:, :, :2, :2].repeat(1, 1, 2, 3)  # a real repeat
        parts = x.unbind(1)
        s = torch.stack([parts[0], parts[-1]], dim=1)
        if x.dim() == 4:
            s = s * 2
        return torch.cat([(e + f + r - x).flatten(1), tile.flatten(1), s.flatten(1), x[0, 0].T.reshape(1, -1)], 1)


def test_shape_idioms_are_local():
    plan, fig = check(Shapes(), (1, 4, 6, 6))
    assert fig["rounds"] == 1  # the one truncation of the mean; every shape step is local
    assert {"index", "permute", "reshape"} <= set(plan.describe())


def test_broadcasts_and_repeats():
    plan, fig = check(Broadcasts(), (1, 3, 4, 4))
    assert {"expand", "repeat"} <= set(plan.describe()) and fig["rounds"] == 1


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1))
        a = F.max_pool2d(y, 3, 2, 1)
        b = F.avg_pool2d(y, 3, 1, 1, count_include_pad=False)
        c = F.avg_pool2d(y, 3, stride=2, padding=1)  # count_include_pad=True
        g = F.adaptive_avg_pool2d(b, 1).flatten(1) + F.adaptive_avg_pool2d(c, (1, 1)).flatten(1)
        return torch.cat([F.linear(g, self.fc.weight, self.fc.bias), a.amax((2, 3))], 1)


def test_functional_forms():
    plan, _ = check(Functional(), (1, 3, 9, 9))
    assert plan.weights == {"conv.weight": (6, 3, 3, 3), "conv.bias": (6,), "fc.weight": (4, 6), "fc.bias": (4,)}
    assert any(s.op == "sumpool" and s.attrs.exclude_pad for s in plan.steps)


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        out += x  # in place, then read again below
        y = out.clone()
        out.relu_()
        z = F.relu(y - 1, inplace=True)
        self.act(y)
        return out + y + z  # y was changed in place by the module


def test_in_place_calls_change_what_later_reads():
    check(InPlace(), (1, 3, 5, 5))


def test_in_place_update_of_a_view_is_refused():
    class Bad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x[:, :1].relu_()
            return x * 2

    with pytest.raises(PlanError, match="in-place update of a view"):
        build_plan(Bad(), (1, 2, 3, 3))


ACTIVATIONS = {
    "relu6": (nn.ReLU6(), 3, 1e-4), "hardtanh": (nn.Hardtanh(-0.5, 1.5), 3, 1e-4),
    "leaky": (nn.LeakyReLU(0.1), 4, 1e-4), "hardsigmoid": (nn.Hardsigmoid(), 4, 1e-4),
    "hardswish": (nn.Hardswish(), 4, 1e-4), "tanh": (nn.Tanh(), 4, 3e-4), "silu": (nn.SiLU(), 4, 3e-4),
    "gelu": (nn.GELU(), 4, 3e-4), "gelu_tanh": (nn.GELU(approximate="tanh"), 4, 3e-4),
}


class After(nn.Module):
    """conv -> activation -> conv: the activation takes the conv's 2f output (truncation fused)."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.a, self.act, self.b = nn.Conv2d(2, 4, 3, padding=1), act, nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_layers(name):
    act, rounds, tol = ACTIVATIONS[name]
    torch.manual_seed(1)  # test weights only
    m = After(act)
    with torch.no_grad():
        m.a.weight.mul_(3)  # inputs that reach every piece
    plan, fig = check(m, (1, 2, 5, 5), tol)
    # the first linear, the activation (with a truncation of its 20 extra bits for non-integer
    # slopes), the second linear and the truncation of the output
    assert fig["rounds"] == 1 + rounds + 1 + 1
    assert plan.steps[2].op in ("piecewise", "spline") and plan.steps[2].attrs.shift == 16


class Functions(nn.Module):
    """The functional and method spellings of the same activations, clamps, max/min and softmax."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.relu6(x), F.hardtanh(x, -1.0, 1.0), x.clamp(min=-0.5), torch.clamp(x, max=0.3), x.clamp(0, 1),
                 F.leaky_relu(x, 0.2), F.hardsigmoid(x), F.hardswish(x), torch.tanh(x), x.tanh(), F.silu(x),
                 F.gelu(x), x.sigmoid(), torch.maximum(x, -x), torch.min(x, x * 0.5)]
        v, _ = torch.max(x, dim=1, keepdim=True)
        w = torch.min(x, 1)[0]
        s = F.softmax(x[:, :2], dim=1) + torch.softmax(x.view(1, 2, -1), 1).view(1, 2, 4, 4)[:, :, :, :1].sum()
        return torch.cat([p.flatten(1) for p in [*parts, v, w, s, x.amin(dim=(2, 3)), torch.max(x)[None, None]]], 1)


def test_functional_activations_max_min_and_softmax():
    plan, _ = check(Functions(), (1, 2, 4, 4), tol=4e-4)
    assert plan.describe()["piecewise"] == 7 and plan.describe()["spline"] == 5


def test_softmax_over_two_classes_is_one_sigmoid():
    plan, fig = check(nn.Sequential(nn.Flatten(), nn.Linear(6, 2), nn.Softmax(dim=1)), (1, 6))
    assert plan.describe()["sigmoid"] == 1 and fig["rounds"] == 1 + 4


class Norms(nn.Module):
    """BatchNorm1d after a Linear (folded), BatchNorm1d and BatchNorm2d on their own (affine)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn1 = nn.Linear(8, 5), nn.BatchNorm1d(5)
        self.bn2, self.bn3 = nn.BatchNorm2d(2), nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(x)  # not after a conv
        z = self.bn1(self.fc(y.flatten(1)))  # folded into the Linear
        return self.bn3(torch.relu(z))


def test_batchnorm_1d_and_2d():
    m = Norms()
    g = torch.Generator().manual_seed(2)
    for bn in (m.bn1, m.bn2, m.bn3):
        bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
    plan, _ = check(m, (1, 2, 2, 2))
    linear = [s.attrs for s in plan.steps if s.op == "linear"]
    assert [(a.kind, a.affine_bn, a.bn) for a in linear] == [("conv", True, None), ("fc", False, "bn1"),
                                                             ("conv", True, None)]


class GlobalMax(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d((2, 3))  # 3 x 3 windows of the 6 x 9 input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))  # CBAM's spelling
        b = F.avg_pool2d(x, x.shape[2:])
        c = F.adaptive_max_pool2d(x, 1) + self.pool(x).mean((2, 3), keepdim=True)
        return torch.cat([a, b, c], 1)


def test_global_pooling_at_any_size():
    plan, fig = check(GlobalMax(), (1, 2, 6, 9))
    assert plan.describe()["maxreduce"] == 2 and plan.describe()["maxpool"] == 1


def test_refusals_name_the_line_and_the_rewrite():
    class Users(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(x)

    with pytest.raises(PlanError) as e:
        build_plan(Users(), (1, 4))
    msg = str(e.value)
    assert "LayerNorm" in msg and "test_idioms.py:" in msg and "self.norm(x)" in msg and "BatchNorm" in msg

    class Softmax3(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.softmax(dim=1)

    with pytest.raises(PlanError, match="3 classes.*sigmoid"):
        build_plan(Softmax3(), (1, 3))

    class Gather(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, [0, 2]]

    with pytest.raises(PlanError, match="advanced indexing"):
        build_plan(Gather(), (1, 3))

    class Exp(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.exp()

    with pytest.raises(PlanError, match=r"x\.exp\(\).*sigmoid, tanh"):
        build_plan(Exp(), (1, 3))

    class Branch(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(PlanError, match="control flow can only depend on shapes"):
        build_plan(Branch(), (1, 3))

    class Argmax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.max(x, 1)[1].float()

    with pytest.raises(PlanError, match="indices"):
        build_plan(Argmax(), (1, 3))
