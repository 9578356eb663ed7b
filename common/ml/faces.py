"""Finding faces in a plaintext image, on the client, before anything is shared.

The detector is MTCNN (Zhang et al., "Joint Face Detection and Alignment using Multi-task Cascaded
Convolutional Networks", 2016): a cascade of three small networks.

1. P-Net, fully convolutional, runs over an image pyramid (scales 12 / min_face_size x 0.709^k) and
   scores every 12 x 12 window (stride 2) of each scale; windows above the first threshold become
   candidate boxes, moved by the network's box regression, thinned by non-maximum suppression (NMS)
   per scale and then over all scales, and made square.
2. R-Net re-scores each candidate from a 24 x 24 crop, refines its box; NMS; square.
3. O-Net does the same from a 48 x 48 crop with a stricter threshold; a last NMS measures overlap
   against the smaller box, so a box nested in a larger one goes.

Crops that reach past the image border are padded with black, as in the paper's code. The weights
are the published MTCNN weights (`models/mtcnn/`, with their licence); the networks below declare
the same parameter names and layout, so the files load as plain state dictionaries with
`weights_only=True`. Fully connected layers read their input transposed (width before height), the
order in which those weights were converted.

For the DeepFake detector each face becomes a square crop of `margin` x the box's larger side
around its centre (`crop_box`), the FaceForensics++ convention (margin 1.3), resized to the model's
input like every other image (`data.resize`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from secdfd.common.ml.data import image_input

WEIGHTS = Path(__file__).resolve().parent / "models" / "mtcnn"
MIN_FACE = 20  # pixels: the smallest face searched for, and the smallest image side accepted
MAX_SIDE = 1280  # images are downscaled to this long side for detection; boxes are mapped back
MARGIN = 1.3
SCORE = 0.95  # O-Net probability needed to report a face
THRESHOLDS = (0.6, 0.7)  # P-Net, R-Net: candidate thresholds of the cascade
FACTOR = 0.709  # pyramid step (area halves every two scales)

Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels, x2/y2 exclusive


@dataclass(frozen=True)
class Face:
    """One detected face: its box in the image's pixels and the detector's probability."""

    box: Box
    score: float

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.box
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    def rounded(self) -> list[int]:
        """The box as whole pixels (for output)."""
        return [round(v) for v in self.box]


# --- the three networks ---------------------------------------------------------------------


class PNet(nn.Module):
    """Proposal network: 12 x 12 windows, stride 2; outputs (box offsets, face probability) maps."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 10, 3)
        self.prelu1 = nn.PReLU(10)
        self.conv2 = nn.Conv2d(10, 16, 3)
        self.prelu2 = nn.PReLU(16)
        self.conv3 = nn.Conv2d(16, 32, 3)
        self.prelu3 = nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # face / not face
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return self.conv4_2(x), F.softmax(self.conv4_1(x), dim=1)[:, 1]


class RNet(nn.Module):
    """Refinement network on 24 x 24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 28, 3)
        self.prelu1 = nn.PReLU(28)
        self.conv2 = nn.Conv2d(28, 48, 3)
        self.prelu2 = nn.PReLU(48)
        self.conv3 = nn.Conv2d(48, 64, 2)
        self.prelu3 = nn.PReLU(64)
        self.dense4 = nn.Linear(64 * 3 * 3, 128)
        self.prelu4 = nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(x))
        x = self.prelu4(self.dense4(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output network on 48 x 48 crops (its five landmarks, `dense6_3`, are not used here)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3)
        self.prelu1 = nn.PReLU(32)
        self.conv2 = nn.Conv2d(32, 64, 3)
        self.prelu2 = nn.PReLU(64)
        self.conv3 = nn.Conv2d(64, 64, 3)
        self.prelu3 = nn.PReLU(64)
        self.conv4 = nn.Conv2d(64, 128, 2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(128 * 3 * 3, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)
        x = self.prelu4(self.conv4(x))
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))
        return self.dense6_2(x), F.softmax(self.dense6_1(x), dim=1)[:, 1]


def _load(net: nn.Module, name: str) -> nn.Module:
    state = torch.load(WEIGHTS / f"{name}.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


# --- boxes ------------------------------------------------------------------------------------


def _areas(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, by_min: bool = False) -> torch.Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    A box goes when its overlap with a kept, better box exceeds `threshold`; overlap is
    intersection over union, or over the smaller of the two areas with `by_min`.
    """
    order = scores.argsort(descending=True)
    areas = _areas(boxes)
    keep: list[int] = []
    while order.numel():
        i, rest = int(order[0]), order[1:]
        keep.append(i)
        lo = torch.maximum(boxes[rest, :2], boxes[i, :2])
        hi = torch.minimum(boxes[rest, 2:4], boxes[i, 2:4])
        inter = (hi - lo).clamp(min=0).prod(dim=1)
        base = torch.minimum(areas[rest], areas[i]) if by_min else areas[rest] + areas[i] - inter
        order = rest[inter <= threshold * base]
    return torch.tensor(keep, dtype=torch.int64)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Move each box's corners by the network's offsets, in units of the box's width and height."""
    size = (boxes[:, 2:4] - boxes[:, :2]).repeat(1, 2)
    return boxes[:, :4] + offsets * size


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """The square with each box's centre and larger side."""
    centre = (boxes[:, :2] + boxes[:, 2:4]) / 2
    half = (boxes[:, 2:4] - boxes[:, :2]).max(dim=1).values.unsqueeze(1) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when they do not overlap)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def crop_box(box: Box, width: int, height: int, margin: float = MARGIN) -> tuple[int, int, int, int]:
    """The crop for a face: a square of `margin` x the box's larger side around its centre.

    The square is moved inside the image where it reaches past a border (so the face keeps its
    aspect ratio and stays in the crop), and shrinks to the image's shorter side if it is larger.
    """
    x1, y1, x2, y2 = box
    side = max(1, min(round(max(x2 - x1, y2 - y1) * margin), width, height))
    left = min(max(round((x1 + x2 - side) / 2), 0), width - side)
    top = min(max(round((y1 + y2 - side) / 2), 0), height - side)
    return left, top, left + side, top + side


def crop_face(img: Image.Image, box: Box, size: int, margin: float = MARGIN) -> torch.Tensor:
    """The detector's input for one face: (1, 3, size, size) float32 in [0, 1].

    The same resize as for whole images (`data.load_image`), applied to the face's crop.
    """
    return image_input(img.crop(crop_box(box, img.width, img.height, margin)), size)


# --- the detector -----------------------------------------------------------------------------


class FaceDetector:
    """MTCNN with the bundled weights; `detect(image)` -> the faces, best first. Load once, reuse."""

    def __init__(self, min_face: int = MIN_FACE, score: float = SCORE, max_side: int = MAX_SIDE,
                 thresholds: tuple[float, float] = THRESHOLDS, factor: float = FACTOR) -> None:
        if min_face < 12:
            raise ValueError(f"the smallest face searched for must be at least 12 pixels, got {min_face}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"pyramid factor must be in (0, 1), got {factor}")
        self.min_face, self.score, self.max_side = min_face, score, max_side
        self.thresholds, self.factor = thresholds, factor
        self.pnet = _load(PNet(), "pnet")
        self.rnet = _load(RNet(), "rnet")
        self.onet = _load(ONet(), "onet")

    def detect(self, img: Image.Image | np.ndarray) -> list[Face]:
        """Every face in an RGB image (Pillow, or H x W x 3 uint8), most probable first.

        Images with a side above `max_side` are searched downscaled; the boxes are in the given
        image's pixels, clipped to it. An image smaller than `min_face` has no face.
        """
        pil = img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))
        pil = pil.convert("RGB")
        w, h = pil.size
        if min(w, h) < self.min_face:
            return []
        scale = min(1.0, self.max_side / max(w, h))
        if scale < 1.0:
            pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
        x = torch.from_numpy(np.asarray(pil, dtype=np.float32)).permute(2, 0, 1).unsqueeze(0).contiguous()
        with torch.inference_mode():
            boxes, scores = self._cascade(x)
        boxes = boxes / scale
        limit = torch.tensor([w, h, w, h], dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), limit)
        faces = [Face((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(s))
                 for b, s in zip(boxes.tolist(), scores.tolist(), strict=True)]
        return [f for f in faces if f.area > 0]

    def _cascade(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 4) boxes and (N,) scores for one (1, 3, H, W) image in 0..255."""
        boxes, scores = self._propose(x)
        for net, side, threshold, last in ((self.rnet, 24, self.thresholds[1], False),
                                           (self.onet, 48, self.score, True)):
            if not len(boxes):
                break
            offsets, prob = net(_normalise(_crops(x, boxes, side)))
            ok = prob >= threshold
            boxes, scores, offsets = boxes[ok], prob[ok], offsets[ok]
            if last:  # O-Net: regress first, then drop boxes nested in better ones
                boxes = _regress(boxes, offsets)
                keep = nms(boxes, scores, 0.7, by_min=True)
                boxes, scores = boxes[keep], scores[keep]
            else:
                keep = nms(boxes, scores, 0.7)
                boxes, scores = _square(_regress(boxes[keep], offsets[keep])), scores[keep]
        return boxes, scores

    def _propose(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P-Net over the pyramid: square candidate boxes and their scores."""
        h, w = x.shape[2:]
        found: list[torch.Tensor] = []
        scale = 12.0 / self.min_face
        while min(h, w) * scale >= 12:
            size = (math.ceil(h * scale), math.ceil(w * scale))
            offsets, prob = self.pnet(_normalise(F.interpolate(x, size=size, mode="area")))
            rows, cols = torch.nonzero(prob[0] >= self.thresholds[0], as_tuple=True)
            if len(rows):
                # window (col, row) of the map covers [2 col, 2 col + 12) pixels of the scaled image
                corner = torch.stack([cols, rows], dim=1).to(x.dtype) * 2
                cand = torch.cat([corner / scale, (corner + 12) / scale, prob[0, rows, cols].unsqueeze(1),
                                  offsets[0][:, rows, cols].T], dim=1)
                found.append(cand[nms(cand[:, :4], cand[:, 4], 0.5)])
            scale *= self.factor
        if not found:
            return torch.zeros(0, 4), torch.zeros(0)
        cand = torch.cat(found)
        cand = cand[nms(cand[:, :4], cand[:, 4], 0.7)]
        return _square(_regress(cand[:, :4], cand[:, 5:9])), cand[:, 4]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Pixels 0..255 -> the networks' input range (x - 127.5) / 128."""
    return (x - 127.5) / 128.0


def _crops(x: torch.Tensor, boxes: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, side, side): each box cut from x (black beyond the border), resized by area averaging."""
    _, _, h, w = x.shape
    out = []
    for x1, y1, x2, y2 in boxes.round().to(torch.int64).tolist():
        bw, bh = max(1, x2 - x1), max(1, y2 - y1)
        patch = x.new_zeros((1, 3, bh, bw))
        sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x1 + bw, w), min(y1 + bh, h)
        if sx2 > sx1 and sy2 > sy1:
            patch[:, :, sy1 - y1:sy2 - y1, sx1 - x1:sx2 - x1] = x[:, :, sy1:sy2, sx1:sx2]
        out.append(F.interpolate(patch, size=(side, side), mode="area"))
    return torch.cat(out)


# --- the main face of a video -----------------------------------------------------------------


class Tracker:
    """Follows the main face of a video: the largest face of the first frame that has one, then in
    each next frame the face that overlaps the previous choice most (the nearest one when none
    overlaps). A frame without a face gives None and the previous choice is kept."""

    def __init__(self) -> None:
        self.last: Face | None = None

    def update(self, faces: Sequence[Face]) -> Face | None:
        if not faces:
            return None
        ref = self.last
        if ref is None:
            pick = max(faces, key=lambda f: f.area)
        else:
            pick = max(faces, key=lambda f: (iou(f.box, ref.box), -_centre_distance(f.box, ref.box)))
        self.last = pick
        return pick


def track(frames: Sequence[Sequence[Face]]) -> list[Face | None]:
    """The main face in each of a sequence of frames' detections (see `Tracker`)."""
    tracker = Tracker()
    return [tracker.update(faces) for faces in frames]


def _centre_distance(a: Box, b: Box) -> float:
    return math.hypot((a[0] + a[2] - b[0] - b[2]) / 2, (a[1] + a[3] - b[1] - b[3]) / 2)
