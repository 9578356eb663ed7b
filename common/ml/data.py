"""Images in, tensors out: decoding, the real/fake folder layout, the split and augmentations.

Layout: ``ROOT/real/...`` and ``ROOT/fake/...`` (sub-folders allowed), any format Pillow reads
(JPEG, PNG incl. 16-bit and palette, BMP, GIF, TIFF, WebP, ...). Files that cannot be decoded are
reported and skipped, never fatal. The train/validation split is a hash of each file's path relative
to the root, so it is deterministic, needs no stored index and does not move when files are added.

No torchvision: Pillow decodes and resizes, numpy and torch do the rest. Randomness here (split,
augmentation) is not secret and uses seeded numpy generators.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from secdfd.common.errors import DataError

# Refuse decompression bombs: a face crop needs nothing near this (8192 x 8192).
MAX_PIXELS = 8192 * 8192
CLASSES = ("real", "fake")  # label 0 = real, 1 = fake
SPLITS = ("train", "val", "all")


def open_rgb(path: str | Path) -> Image.Image:
    """Decode one image file into an 8-bit RGB Pillow image.

    Handles grayscale, palette (with or without transparency), RGBA/LA (alpha dropped), CMYK,
    16-bit and 32-bit integer grayscale (rescaled, not clipped) and EXIF orientation. Raises
    DataError for non-images, unreadable files and images above MAX_PIXELS.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise DataError(f"{path}: {w}x{h} pixels exceeds the limit of {MAX_PIXELS:,} pixels "
                                    f"(8192 x 8192); "
                                    "downscale the image first")
                img.load()
                return _to_rgb(ImageOps.exif_transpose(img))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Image.DecompressionBombError:  # so large that Pillow refuses to open it at all
        raise DataError(f"{path}: image exceeds the limit of {MAX_PIXELS:,} pixels (8192 x 8192); downscale the "
                        "image first") from None
    except UnidentifiedImageError as e:
        raise DataError(f"{path}: not a readable image ({e.__class__.__name__})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, scaling high bit depths instead of clipping them."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        peak = a.max(initial=0.0)
        if img.mode.startswith("I;16"):
            top = 65535.0
        elif img.mode == "F" and peak <= 1.0:  # float images in [0, 1]
            top = 1.0
        else:  # 32-bit integer (or float) of unknown range: 8-bit if it fits, else 16-bit
            top = 255.0 if peak < 256 else 65535.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        img = img.convert("RGBA")
    return img.convert("RGB")


def resize(img: Image.Image, size: int) -> Image.Image:
    """Resize to size x size (the detector's input; faces are expected to be pre-cropped)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def load_image(path: str | Path, size: int) -> torch.Tensor:
    """One image as the detector's input: (1, 3, size, size) float32 in [0, 1].

    The same decode and resize as training, so the client's plaintext and secure inputs match
    what the model saw. Raises DataError on non-images, unreadable files and decompression bombs.
    """
    return image_input(open_rgb(path), size)


def image_input(img: Image.Image, size: int) -> torch.Tensor:
    """An RGB image (a whole image, a face crop, a video frame) as the detector's input."""
    return to_tensor(resize(img, size)).unsqueeze(0).float() / 255.0


# --- folder layout and split ----------------------------------------------------------------


def split_of(relpath: str, val_fraction: float, seed: int = 0) -> str:
    """'train' or 'val' for a file, from a hash of its root-relative path (deterministic)."""
    digest = hashlib.sha256(f"{seed}:{relpath}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "val" if u < val_fraction else "train"


def scan(root: str | Path) -> list[tuple[Path, int]]:
    """All candidate files under ROOT/real and ROOT/fake with their labels, in a stable order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder; expected {root}/real and {root}/fake")
    found: list[tuple[Path, int]] = []
    for label, name in enumerate(CLASSES):
        folder = root / name
        if not folder.is_dir():
            raise DataError(f"{root}: missing the {name}/ folder (layout: {root}/real, {root}/fake)")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        found.extend((p, label) for p in files)
    return found


@dataclass
class ImageSet:
    """Decoded images of one split, kept in memory as uint8 (N x 3 x size x size bytes)."""

    images: torch.Tensor  # (N, 3, size, size) uint8
    labels: torch.Tensor  # (N,) int64, 0 real, 1 fake
    paths: list[Path]
    skipped: list[str] = field(default_factory=list)  # "path: reason" for each bad file

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self) -> dict[str, int]:
        """Number of images per class."""
        return {name: int((self.labels == i).sum()) for i, name in enumerate(CLASSES)}


def load_folder(root: str | Path, size: int, split: str = "all", val_fraction: float = 0.2,
                seed: int = 0) -> ImageSet:
    """Decode and resize every image of a split; bad files are listed in `skipped`, not raised."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"validation fraction must be in (0, 1), got {val_fraction}")
    root = Path(root)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    paths: list[Path] = []
    skipped: list[str] = []
    for path, label in scan(root):
        if split != "all" and split_of(path.relative_to(root).as_posix(), val_fraction, seed) != split:
            continue
        try:
            images.append(to_tensor(resize(open_rgb(path), size)))
        except DataError as e:
            skipped.append(str(e))
            continue
        labels.append(label)
        paths.append(path)
    if not images:
        raise DataError(f"{root}: no readable images in the {split} split")
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.int64), paths, skipped)


# --- augmentation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Training augmentations (the ones robustness claims rest on), each with a probability."""

    flip: float = 0.5
    jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (60, 95)
    blur: float = 0.15
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.4)

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, H, W) float32 in [0, 1], augmented."""
        img = Image.fromarray(image.permute(1, 2, 0).numpy())
        if rng.random() < self.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.jpeg:
            img = jpeg_roundtrip(img, int(rng.integers(self.jpeg_quality[0], self.jpeg_quality[1] + 1)))
        if rng.random() < self.blur:
            img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(*self.blur_sigma))))
        x = to_tensor(img).float() / 255.0
        if rng.random() < self.gamma:
            x = x.pow(float(rng.uniform(*self.gamma_range)))
        return x


NO_AUGMENT = Augment(flip=0.0, jpeg=0.0, blur=0.0, gamma=0.0)


def jpeg_roundtrip(img: Image.Image, quality: int) -> Image.Image:
    """Re-compress an image as JPEG at `quality` and decode it again."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        return out.convert("RGB")


def batches(data: ImageSet, batch_size: int, rng: np.random.Generator | None = None,
            augment: Augment = NO_AUGMENT, drop_lone: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches, x float32 in [0, 1]; shuffled and augmented when `rng` is given.

    `drop_lone` (training) leaves a lone last image out of this pass: BatchNorm cannot train on one
    value per channel, which is what one image gives at the 1x1 maps of small inputs.
    """
    order = rng.permutation(len(data)) if rng is not None else np.arange(len(data))
    for start in range(0, len(order), batch_size):
        idx = torch.from_numpy(order[start:start + batch_size].copy())
        if drop_lone and len(idx) == 1 and len(order) > 1:
            return
        if rng is None:
            x = data.images[idx].float() / 255.0
        else:
            x = torch.stack([augment(data.images[int(i)], rng) for i in idx])
        yield x, data.labels[idx]
