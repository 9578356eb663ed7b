"""Export: BN and YCbCr folds agree with the trained streams, files carry a verified checksum."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from secdfd.common.errors import ModelError
from secdfd.common.ml.dfdnet import YCBCR_MATRIX, YCBCR_OFFSET, DFDNet, rgb_to_ycbcr
from secdfd.common.ml.export import (
    DEFAULT_MODEL,
    fold_colour_map,
    fold_stream,
    fuse,
    load_deployable,
    load_plain_streams,
    read_deployable_meta,
    save_deployable,
)

WIDTH, SIZE = 0.0625, 64


def _trained_like(seed: int) -> DFDNet:
    """A small stream whose BatchNorms hold non-trivial statistics and affine parameters."""
    torch.manual_seed(seed)
    model = DFDNet(WIDTH, SIZE)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def test_bn_fold_matches() -> None:
    model = _trained_like(0)
    folded = fold_stream(model, "rgb")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)


def test_ycbcr_fold_matches_and_reads_rgb() -> None:
    model = _trained_like(1)
    folded = fold_stream(model, "ycbcr")
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(rgb_to_ycbcr(x)), atol=1e-5, rtol=0)


def test_colour_fold_single_conv_exact() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, bias=True).double()
    x = torch.rand(2, 3, 9, 9, dtype=torch.float64)
    w, b = fold_colour_map(conv.weight, conv.bias, YCBCR_MATRIX, YCBCR_OFFSET)
    torch.testing.assert_close(nn.functional.conv2d(x, w, b), conv(rgb_to_ycbcr(x)), atol=1e-12, rtol=0)


def test_export_checks_architecture_width(tmp_path: Path) -> None:
    fused = fuse(_trained_like(3), _trained_like(4))
    with pytest.raises(ModelError, match="width"):  # dfdnet-s is wider than this test model
        save_deployable(fused, tmp_path / "m.pt", "dfdnet-s")
    with pytest.raises(ModelError, match="only folded"):
        from secdfd.common.ml.dfdnet import FusedDFDNet

        save_deployable(FusedDFDNet(_trained_like(3), _trained_like(4)), tmp_path / "m.pt", "dfdnet-s")


def test_save_load_verify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from secdfd.common.ml import dfdnet as model_mod

    monkeypatch.setitem(model_mod.MODELS, "tiny", model_mod.ModelSpec("tiny", WIDTH, "test"))
    rgb, ycc = _trained_like(3), _trained_like(4)
    fused = fuse(rgb, ycc)
    path = tmp_path / "m.pt"
    save_deployable(fused, path, "tiny", "float32", {"note": "test"})
    meta = read_deployable_meta(path)
    assert (meta.arch, meta.width, meta.size, meta.dtype, meta.extra) == ("tiny", WIDTH, SIZE, "float32",
                                                                          {"note": "test"})
    loaded = load_deployable(path)
    assert not loaded.training
    x = torch.rand(5, 3, SIZE, SIZE)
    with torch.no_grad():
        p = loaded(x)
        expected = 0.5 * (torch.softmax(rgb(x), 1)[:, 1] + torch.softmax(ycc(rgb_to_ycbcr(x)), 1)[:, 1])
    assert p.shape == (5, 1) and p.dtype == torch.float32
    assert bool(((p >= 0) & (p <= 1)).all())
    torch.testing.assert_close(p[:, 0], expected, atol=1e-5, rtol=0)
    s_rgb, s_ycc = load_plain_streams(path)
    with torch.no_grad():
        torch.testing.assert_close(s_rgb(x), rgb(x), atol=1e-5, rtol=0)

    # half-precision storage: same module, weights rounded
    save_deployable(fused, tmp_path / "h.pt", "tiny", "float16")
    with torch.no_grad():
        assert float((load_deployable(tmp_path / "h.pt")(x) - p).abs().max()) < 1e-2

    # a flipped byte in the weights fails the checksum
    payload = torch.load(path, weights_only=True)
    key = next(iter(payload["state_dict"]))
    payload["state_dict"][key].view(-1)[0] += 1.0
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelError, match="checksum"):
        load_deployable(tmp_path / "bad.pt")


def test_not_a_model_file(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="not a deployable model"):
        load_deployable(tmp_path / "x.pt")
    with pytest.raises(ModelError, match="no such model file"):
        load_deployable(tmp_path / "absent.pt")


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="embedded model not built")
def test_embedded_default_loads() -> None:
    meta = read_deployable_meta()
    assert (meta.arch, meta.size) == ("dfdnet-s", 128)
    model = load_deployable()
    with torch.no_grad():
        p = model(torch.rand(2, 3, 128, 128))
    assert p.shape == (2, 1) and bool(((p >= 0) & (p <= 1)).all())
    assert DEFAULT_MODEL.stat().st_size < 25 * 2**20
