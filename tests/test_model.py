"""DFDNet: parameter count and shapes at full width, registry, colour map, fusion, fx tracing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secdfd.common.errors import ModelError
from secdfd.common.ml.dfdnet import (
    MODELS,
    DFDNet,
    FusedDFDNet,
    ModelSpec,
    build_model,
    count_params,
    register,
    rgb_to_ycbcr,
)

# Engine-supported graph nodes (see the module docstring of secdfd.common.ml.dfdnet).
SUPPORTED_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                     nn.AdaptiveMaxPool2d, nn.Linear, nn.Sigmoid)
SUPPORTED_FUNCTIONS = {"add", "sub", "mul", "cat", "flatten", "mean", "amax", "getitem"}


def test_full_width_params_and_shapes() -> None:
    model = build_model("dfdnet").eval()
    n = count_params(model)
    assert abs(n - 28.15e6) / 28.15e6 < 0.005
    assert n == 28_148_018  # the published model's count
    with torch.no_grad():
        assert model(torch.rand(1, 3, 128, 128)).shape == (1, 2)
        assert model(torch.rand(1, 3, 256, 256)).shape == (1, 2)


def test_small_variant_and_feature_widths() -> None:
    model = build_model("dfdnet-s")
    assert model.width == 0.25
    assert model.fc1.in_features == 512 + 16 + 32 + 64 + 182  # exit + aggregated (y1..y4)
    assert model.fc2.out_features == 2
    assert 1.7e6 < count_params(model) < 1.9e6


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(ModelError, match="dfdnet, dfdnet-s"):
        build_model("xception")


def test_registry_rejects_duplicates() -> None:
    with pytest.raises(ModelError, match="already registered"):
        register(ModelSpec("dfdnet", 1.0, "again"))
    assert set(MODELS) == {"dfdnet", "dfdnet-s"}


def test_bad_input_size() -> None:
    with pytest.raises(ModelError, match="input size"):
        DFDNet(0.125, size=16)


def test_ycbcr_matches_bt601_formula() -> None:
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.2, 0.5, 0.7]])
    x = rgb.T.reshape(1, 3, 5, 1)
    ycc = rgb_to_ycbcr(x).reshape(3, 5).T
    r, g, b = rgb.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 0.5 + (b - y) / 1.772
    cr = 0.5 + (r - y) / 1.402
    torch.testing.assert_close(ycc, torch.stack([y, cb, cr], 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ycc[3], torch.tensor([1.0, 0.5, 0.5]), atol=1e-6, rtol=0)  # white is neutral


def test_fused_output_is_softmax_mean() -> None:
    torch.manual_seed(0)
    rgb, ycc = DFDNet(0.0625, 64).eval(), DFDNet(0.0625, 64).eval()
    fused = FusedDFDNet(rgb, ycc).eval()
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        p = fused(x)
        expected = 0.5 * (torch.softmax(rgb(x), 1)[:, 1] + torch.softmax(ycc(x), 1)[:, 1])
    assert p.shape == (3, 1)
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p[:, 0], expected, atol=1e-6, rtol=0)


def test_files_with_the_fused_heads_fixed_weights_load_and_others_are_refused() -> None:
    """Files written while the fusion's difference and mean were Linear(2, 1) layers hold their fixed
    weights; they load when those are exactly [-1, 1] and [1/2, 1/2] and are refused otherwise."""
    torch.manual_seed(0)
    fused = FusedDFDNet(DFDNet(0.0625, 64), DFDNet(0.0625, 64)).eval()
    state = fused.state_dict()
    assert not any(k.startswith(("diff.", "mean.")) for k in state)
    old = {**state, "diff.weight": torch.tensor([[-1.0, 1.0]]), "mean.weight": torch.tensor([[0.5, 0.5]])}
    again = FusedDFDNet(DFDNet(0.0625, 64), DFDNet(0.0625, 64)).eval()
    again.load_state_dict(old, strict=True)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), fused(x))
    with pytest.raises(RuntimeError, match="diff.weight"):
        again.load_state_dict({**old, "diff.weight": torch.tensor([[-1.0, 2.0]])}, strict=True)


def test_fx_trace_uses_only_supported_ops() -> None:
    model = FusedDFDNet(DFDNet(0.0625, 64, folded=True), DFDNet(0.0625, 64, folded=True)).eval()
    traced = torch.fx.symbolic_trace(model)
    for node in traced.graph.nodes:
        if node.op == "call_module":
            assert isinstance(traced.get_submodule(node.target), SUPPORTED_MODULES), node.target
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else node.target.__name__
            assert name in SUPPORTED_FUNCTIONS, name
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
