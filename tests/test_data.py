"""Image decoding (odd modes, corrupt files, bombs), the folder layout, split and augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from secdfd.common.errors import DataError
from secdfd.common.ml import data
from secdfd.common.ml.data import Augment, batches, load_folder, load_image, split_of


def _gradient(h: int = 40, w: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), np.full_like(x, 200)], -1).astype(np.uint8)


def test_rgb_png_roundtrip_exact(tmp_path: Path) -> None:
    arr = _gradient()
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 48)
    assert x.shape == (1, 3, 48, 48) and x.dtype == torch.float32
    # 40x48 is stretched to 48x48, so check a column that keeps its value under resizing in y
    assert float(x[0, 2].min()) == pytest.approx(200 / 255, abs=1e-6)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_grayscale_rgba_palette_and_16bit(tmp_path: Path) -> None:
    gray = np.full((32, 32), 100, np.uint8)
    Image.fromarray(gray, "L").save(tmp_path / "gray.png")
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 250, 10  # nearly transparent red: alpha is dropped
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(_gradient(32, 32)).convert("P").save(tmp_path / "pal.gif")
    deep = np.full((32, 32), 65535 // 2, np.uint16)  # mid-grey in 16 bits must not clip to white
    Image.fromarray(deep).save(tmp_path / "deep.png")

    g = load_image(tmp_path / "gray.png", 32)
    assert torch.allclose(g, torch.full_like(g, 100 / 255))
    r = load_image(tmp_path / "rgba.png", 32)
    assert float(r[0, 0].mean()) == pytest.approx(250 / 255) and float(r[0, 1:].max()) == 0.0
    assert load_image(tmp_path / "pal.gif", 32).shape == (1, 3, 32, 32)
    d = load_image(tmp_path / "deep.png", 32)
    assert float(d.mean()) == pytest.approx(128 / 255, abs=1.5 / 255)


def test_non_image_corrupt_and_missing(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    good = tmp_path / "good.jpg"
    Image.fromarray(_gradient()).save(good, quality=90)
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable image"):
        load_image(tmp_path / "notes.txt", 32)
    with pytest.raises(DataError, match="cannot decode"):
        load_image(tmp_path / "cut.jpg", 32)
    with pytest.raises(DataError, match="no such file"):
        load_image(tmp_path / "absent.png", 32)


def test_decompression_bomb_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(data, "MAX_PIXELS", 64 * 63)
    with pytest.raises(DataError, match="exceeds the limit"):
        load_image(tmp_path / "big.png", 32)


def _folder(root: Path, n: int = 10) -> None:
    for name, value in (("real", 60), ("fake", 190)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(root / name / f"{i}.png")


def test_folder_skips_bad_files_and_labels(tmp_path: Path) -> None:
    _folder(tmp_path)
    (tmp_path / "fake" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    (tmp_path / "fake" / ".hidden").write_text("ignored")
    s = load_folder(tmp_path, 16, "all")
    assert s.images.shape == (20, 3, 16, 16) and s.images.dtype == torch.uint8
    assert s.counts() == {"real": 10, "fake": 10}
    assert len(s.skipped) == 1 and "broken.png" in s.skipped[0]
    assert bool((s.images[s.labels == 0] == 60).all()) and bool((s.images[s.labels == 1] == 190).all())


def test_split_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    _folder(tmp_path, 40)
    a = load_folder(tmp_path, 8, "train", 0.25)
    b = load_folder(tmp_path, 8, "val", 0.25)
    assert len(a) + len(b) == 80
    assert not set(a.paths) & set(b.paths)
    assert [p.name for p in load_folder(tmp_path, 8, "val", 0.25).paths] == [p.name for p in b.paths]
    fractions = [split_of(f"real/{i}.png", 0.2) == "val" for i in range(2000)]
    assert abs(sum(fractions) / 2000 - 0.2) < 0.03


def test_missing_class_folder(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    with pytest.raises(DataError, match="fake/ folder"):
        load_folder(tmp_path, 16)


def test_augment_keeps_range_and_flips(tmp_path: Path) -> None:
    img = torch.from_numpy(_gradient(16, 16)).permute(2, 0, 1).contiguous()
    rng = np.random.default_rng(0)
    flip_only = Augment(flip=1.0, jpeg=0.0, blur=0.0, gamma=0.0)
    torch.testing.assert_close(flip_only(img, rng), img.flip(2).float() / 255)
    everything = Augment(flip=1.0, jpeg=1.0, blur=1.0, gamma=1.0)
    out = everything(img, rng)
    assert out.shape == (3, 16, 16) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float((out - img.flip(2).float() / 255).abs().mean()) > 0.005  # something changed


def test_batches_cover_every_image_once(tmp_path: Path) -> None:
    _folder(tmp_path, 5)
    s = load_folder(tmp_path, 8)
    seen = torch.cat([y for _, y in batches(s, 3, np.random.default_rng(1), Augment())])
    assert sorted(seen.tolist()) == sorted(s.labels.tolist())


def test_pillow_bomb_gets_the_size_message(tmp_path: Path) -> None:
    # A PNG header claiming 20000 x 20000 pixels: Pillow refuses it before our own size check runs.
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    with pytest.raises(DataError, match="exceeds the limit of 67,108,864 pixels"):
        load_image(path, 32)
