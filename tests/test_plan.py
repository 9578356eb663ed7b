import pytest
import torch
from torch import nn

from secdfd.common.engine.plan import ShiftAttrs, build_plan, extract_weights
from secdfd.common.errors import PlanError


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ELU()

    def forward(self, x):
        return self.act(self.conv(x))


def test_unsupported_layer_is_named():
    with pytest.raises(PlanError) as e:
        build_plan(Odd(), (1, 3, 8, 8))
    msg = str(e.value)
    assert "act" in msg and "ELU" in msg and "nn.SiLU" in msg  # the nearest supported rewrite
    assert "test_plan.py:" in msg and "self.act(self.conv(x))" in msg  # the user's source line


def test_bn_is_folded_and_truncation_fused_into_relu():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    plan = build_plan(m, (1, 3, 8, 8))
    ops = [s.op for s in plan.steps]
    assert ops == ["input", "linear", "relu", "linear", "trunc", "output"]
    assert plan.steps[2].get(ShiftAttrs).shift == 16  # conv output at 2f goes straight into ReLU
    m.eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    w = extract_weights(m, plan)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    folded = torch.nn.functional.conv2d(x, w["0.weight+1"], w["0.bias+1"])  # the folded weights have their own keys
    with torch.no_grad():
        ref = m[1].double()(m[0].double()(x))
    assert (folded - ref).abs().max().item() < 1e-10


def test_plan_depends_on_architecture_only():
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    pa, pb = build_plan(a, (1, 3, 8, 8)), build_plan(b, (1, 3, 8, 8))
    assert pa.steps == pb.steps and pa.weights == pb.weights


def test_full_width_dfdnet_plan_builds():
    from secdfd.common.ml.dfdnet import FusedDFDNet, build_model

    fused = FusedDFDNet(build_model("dfdnet"), build_model("dfdnet"))
    plan = build_plan(fused, (1, 3, 128, 128))
    counts = plan.describe()
    # 2 x 136 convs and fcs; the fusion's fixed differences and mean are local, not layers
    assert counts["linear"] == 272 and counts["sigmoid"] == 50 and counts["maxpool"] == 8
    n_params = sum(torch.Size(s).numel() for s in plan.weights.values())
    assert abs(n_params - 2 * 28.15e6) / (2 * 28.15e6) < 0.01


class _PoolBeside(nn.Module):
    """A mean over channels beside a channel max (CBAM's spatial pool), a conv, or its own input."""

    def __init__(self, beside: str) -> None:
        super().__init__()
        self.beside = beside
        self.conv = nn.Conv2d(8, 1, 1)

    def forward(self, x):
        if self.beside == "input":
            x = torch.relu(x)
            return torch.cat([x[:, :1], torch.mean(x, 1, keepdim=True)], 1)
        first = self.conv(x) if self.beside == "conv" else torch.amax(x, 1, keepdim=True)
        return torch.cat([first, torch.mean(x, 1, keepdim=True)], 1)


def test_a_mean_beside_a_later_comparison_is_truncated_before_the_cat():
    # The mean is local and ready with its input; the max takes rounds after it. Truncating the mean
    # on its own lets its round pass while the max runs, and the cat is at f.
    plan = build_plan(_PoolBeside("max"), (1, 8, 4, 4), cmp_bits=32)
    (cat,) = (s for s in plan.steps if s.op == "cat")
    inputs = [plan.steps[i] for i in cat.inputs]
    assert cat.scale == 16 and [s.scale for s in inputs] == [16, 16]
    assert inputs[1].op == "trunc" and inputs[1].get(ShiftAttrs).shift == 24
    # Beside a conv's 2f output, or beside the mean's own input (a ReLU before it, no later than the
    # mean), there is no such gain and a later comparison may fuse one truncation of the whole cat:
    # both are lifted.
    for beside, scales in (("conv", [32, 40]), ("input", [16, 40])):
        plan = build_plan(_PoolBeside(beside), (1, 8, 4, 4), cmp_bits=32)
        (cat,) = (s for s in plan.steps if s.op == "cat")
        assert cat.scale == 40 and [plan.steps[i].scale for i in cat.inputs] == scales


class _PooledMax(nn.Module):
    """A conv, a max-pool, and the pooled map's global max added back to it (the pool stays in use)."""

    def __init__(self, k: int, s: int, p: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pool = nn.MaxPool2d(k, s, p)

    def forward(self, x):
        y = self.pool(self.conv(x))
        return torch.amax(y, dim=(2, 3), keepdim=True) + y


class _PooledAmax(nn.Module):
    """The pooled map's max over channels and space, without keepdim (the pool is then unused)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x):
        return torch.amax(self.pool(self.conv(x)), dim=(1, 2, 3))


def test_a_max_over_channels_and_space_after_a_covering_pool_drops_the_pool():
    from secdfd.common.engine.twoparty import TwoParty

    m = _PooledAmax().eval()
    plan = build_plan(m, (1, 3, 9, 9), cmp_bits=32)
    assert [s.op for s in plan.steps if s.op in ("maxpool", "maxreduce")] == ["maxreduce"]  # the pool is pruned
    x = torch.randn(1, 3, 9, 9) * 3
    y, _ = TwoParty(m, (1, 3, 9, 9), cmp_bits=32)(x)
    with torch.no_grad():
        assert y.shape == (1,) and (y - m(x).double()).abs().max().item() < 1e-3


@pytest.mark.parametrize("k, s, p, covers", [(3, 2, 1, True), (3, 3, 0, True), (2, 3, 0, False), (2, 2, 0, False)])
def test_a_global_max_after_a_covering_max_pool_starts_from_the_pool_input(k, s, p, covers):
    """Windows that cover every input element (an Xception block's 3 x 3 / 2 pool) keep the global
    maximum: the reduction then starts from the pool's input, a truncation's result, in the rounds of
    the pool. A stride past the kernel (2 / 3) skips elements, and 2 / 2 on 9 x 9 drops the last row
    and column: those reduce the pooled map."""
    from secdfd.common.engine.twoparty import TwoParty

    m = _PooledMax(k, s, p).eval()
    plan = build_plan(m, (1, 3, 9, 9), cmp_bits=32)
    (red,) = (st for st in plan.steps if st.op == "maxreduce")
    src = plan.steps[red.inputs[0]]
    assert src.op == ("trunc" if covers else "maxpool") and (src.shape[2:] == (9, 9)) == covers
    x = torch.randn(1, 3, 9, 9) * 3
    y, rep = TwoParty(m, (1, 3, 9, 9), cmp_bits=32)(x)
    with torch.no_grad():
        assert (y - m(x).double()).abs().max().item() < 1e-3


class _GatedPool(nn.Module):
    """A max-pooled map gated by a sigmoid of its mean (channel attention on an entry block's output)."""

    def __init__(self, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = torch.nn.functional.max_pool2d(torch.relu(self.conv(x)), 3, 2, 1)
        gate = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return gate * y if self.gated else gate


def test_a_product_remasks_its_early_operand_and_costs_no_round():
    """gate * y, y max-pooled (not a truncation's result), the gate a sigmoid's: y is remasked (a
    truncation by 0, 8 bytes per element) as soon as it exists, the product is local, and the gated
    map costs one round more than the gate alone: its own truncation, not the product's opening."""
    from secdfd.common.engine.steps import kept_inputs
    from secdfd.common.engine.twoparty import TwoParty

    m = _GatedPool(True).eval()
    plan = build_plan(m, (1, 3, 8, 8), cmp_bits=32)
    (mul,) = (st for st in plan.steps if st.op == "mul")
    ins = [plan.steps[i] for i in mul.inputs]
    assert sorted(st.op for st in ins) == ["sigmoid", "trunc"]
    (remask,) = (st for st in ins if st.op == "trunc")
    assert remask.get(ShiftAttrs).shift == 0 and plan.steps[remask.inputs[0]].op == "maxpool"
    assert kept_inputs(plan, mul) == (0, 1)
    x = torch.randn(1, 3, 8, 8) * 2
    y, rep = TwoParty(m, (1, 3, 8, 8), cmp_bits=32)(x)
    with torch.no_grad():
        assert (y - m(x).double()).abs().max().item() < 1e-3
    _, alone = TwoParty(_GatedPool(False).eval(), (1, 3, 8, 8), cmp_bits=32)(x)
    assert rep.rounds == alone.rounds + 1
    (fig,) = (f for f in rep.steps if f.index == remask.index)
    assert fig.bytes_per_party == (8 * 4 * 4 * 4, 8 * 4 * 4 * 4) and fig.rounds == 1


def test_a_matrix_layer_takes_a_relus_form_up_to_its_bound_for_any_batch():
    """CBAM's channel MLP (1 x 1 convs on 1 x 1 maps) takes its ReLU's output in masked form, also in
    a plan widened to 4 crops (the bound counts weights, not rows); an fc past FORM_MAX_PRODUCTS
    weights, or a 3 x 3 conv, opens its input as any linear layer."""
    from secdfd.common.engine.steps import FORM_MAX_PRODUCTS, kept_inputs, takes_form
    from secdfd.common.ml.dfdnet import ChannelAttention

    plan = build_plan(ChannelAttention(1024).eval(), (1, 1024, 4, 4), cmp_bits=32)
    for p in (plan, plan.batched(4)):
        seconds = [s for s in p.steps if s.op == "linear" and p.steps[s.inputs[0]].op == "relu"]
        assert len(seconds) == 2  # the shared MLP on the average and on the maximum
        assert all(takes_form(p, s) and kept_inputs(p, s) == (0,) for s in seconds)
    big = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), nn.Linear(512, 512))  # 262,144 weights
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3))
    for m, shape in ((big, (1, 8)), (conv, (1, 3, 6, 6))):
        p = build_plan(m.eval(), shape, cmp_bits=32)
        (last,) = (s for s in p.steps if s.op == "linear" and p.steps[s.inputs[0]].op == "relu")
        assert not takes_form(p, last) and kept_inputs(p, last) == ()
    assert 512 * 512 > FORM_MAX_PRODUCTS >= 1024 * 64
