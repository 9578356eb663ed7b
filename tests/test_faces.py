"""The client's face detector (MTCNN with the bundled weights), its crops and the main-face tracker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter

from secdfd.common.ml import faces
from secdfd.common.ml.data import open_rgb

ROOT = Path(__file__).resolve().parents[1]
FACE = ROOT / "examples" / "face.png"
FACE_BOX = (58, 40, 165, 170)  # drawn by hand around examples/face.png's face, brow to chin


@pytest.fixture(scope="module")
def detector() -> faces.FaceDetector:
    return faces.FaceDetector()


def face_image() -> Image.Image:
    return Image.open(FACE).convert("RGB")


def two_faces() -> tuple[Image.Image, list[tuple[float, float, float, float]]]:
    """face.png and its mirror image side by side on a grey 640 x 360 canvas, with their boxes."""
    canvas = Image.new("RGB", (640, 360), (128, 128, 128))
    face = face_image()
    canvas.paste(face, (20, 50))
    canvas.paste(face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (360, 80))
    x1, y1, x2, y2 = FACE_BOX
    return canvas, [(x1 + 20, y1 + 50, x2 + 20, y2 + 50), (256 - x2 + 360, y1 + 80, 256 - x1 + 360, y2 + 80)]


def scene(seed: int = 0, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A picture without a face: a gradient sky, ground, a house, a sun and some texture."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.float32)
    a[..., 0] = np.linspace(90, 200, h)[:, None]
    a[..., 1] = np.linspace(140, 220, h)[:, None]
    a[..., 2] = 240
    a[h * 2 // 3:] = (70, 120, 50)
    a += rng.normal(0, 6, a.shape)
    img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle((w // 5, h // 3, w // 2, h * 3 // 4), fill=(170, 90, 60))
    d.polygon([(w // 5 - 10, h // 3), (w * 7 // 20, h // 8), (w // 2 + 10, h // 3)], fill=(120, 40, 30))
    d.rectangle((w // 3, h // 2, w // 3 + 30, h * 3 // 4), fill=(60, 40, 20))
    d.ellipse((w - 110, 20, w - 40, 90), fill=(250, 220, 80))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def test_weights_load_into_our_modules():
    for name, net in (("pnet", faces.PNet()), ("rnet", faces.RNet()), ("onet", faces.ONet())):
        state = torch.load(faces.WEIGHTS / f"{name}.pt", weights_only=True)
        assert set(state) == set(net.state_dict())
        net.load_state_dict(state, strict=True)
    assert (faces.WEIGHTS / "LICENSE").read_text().startswith("The face detector weights")


def test_the_bundled_face_photo_has_one_face(detector):
    found = detector.detect(face_image())
    assert len(found) == 1
    assert faces.iou(found[0].box, FACE_BOX) >= 0.6 and found[0].score >= 0.95


def test_two_faces_give_two_boxes(detector):
    img, truth = two_faces()
    found = detector.detect(img)
    assert len(found) == 2
    for box in truth:
        assert max(faces.iou(f.box, box) for f in found) >= 0.6


@pytest.mark.parametrize("seed", [0, 1])
def test_a_picture_without_a_face_has_none(detector, seed):
    assert detector.detect(scene(seed)) == []
    assert detector.detect(Image.new("RGB", (300, 200), (200, 200, 200))) == []


def test_large_images_are_searched_downscaled_and_boxes_mapped_back(detector):
    img = Image.new("RGB", (2600, 1400), (128, 128, 128))
    img.paste(face_image().resize((768, 768)), (1500, 300))  # 3x: long side 2600 > MAX_SIDE
    found = detector.detect(img)
    x1, y1, x2, y2 = FACE_BOX
    truth = (3 * x1 + 1500, 3 * y1 + 300, 3 * x2 + 1500, 3 * y2 + 300)
    assert len(found) == 1 and faces.iou(found[0].box, truth) >= 0.6


def test_images_smaller_than_a_face_have_none(detector):
    assert detector.detect(np.zeros((19, 300, 3), np.uint8)) == []
    with pytest.raises(ValueError, match="at least 12"):
        faces.FaceDetector(min_face=8)


def test_exif_orientation_is_applied_before_the_search(detector, tmp_path):
    """A camera that stores the photo turned and says so in EXIF (orientation 6: turn 90° clockwise)."""
    path = tmp_path / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    face_image().transpose(Image.Transpose.ROTATE_90).save(path, quality=95, exif=exif)
    found = detector.detect(open_rgb(path))
    assert len(found) == 1 and faces.iou(found[0].box, FACE_BOX) >= 0.5


def test_crop_box_is_a_square_with_margin_inside_the_image():
    assert faces.crop_box((100, 100, 200, 180), 1000, 1000, 1.3) == (85, 75, 215, 205)
    assert faces.crop_box((100, 100, 200, 180), 1000, 1000, 1.0) == (100, 90, 200, 190)
    # near a corner the square moves inside rather than being cut (no distortion when resized)
    assert faces.crop_box((0, 0, 50, 60), 300, 200, 1.3) == (0, 0, 78, 78)
    assert faces.crop_box((250, 150, 300, 200), 300, 200, 1.5) == (225, 125, 300, 200)
    # larger than the image: the image's shorter side
    assert faces.crop_box((10, 10, 190, 190), 300, 200, 1.3) == (0, 0, 200, 200)


def test_crop_face_is_the_models_input():
    img = face_image()
    x = faces.crop_face(img, FACE_BOX, 32)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 4, 4]], dtype=torch.float32)
    scores = torch.tensor([0.8, 0.9, 0.7, 0.95])
    assert faces.nms(boxes, scores, 0.5).tolist() == [3, 1, 2]
    # over the smaller area, a box that mostly covers the better small one goes too
    assert faces.nms(boxes, scores, 0.5, by_min=True).tolist() == [3, 2]
    assert faces.nms(torch.zeros(0, 4), torch.zeros(0), 0.5).tolist() == []


def test_tracker_follows_the_main_face():
    big, small = faces.Face((100, 100, 200, 200), 0.99), faces.Face((300, 50, 340, 90), 0.999)
    moved = faces.Face((110, 105, 210, 205), 0.97)
    far = faces.Face((400, 300, 440, 340), 0.99)
    near = faces.Face((230, 120, 330, 220), 0.98)  # does not overlap `moved`, but is closer than `far`
    assert faces.track([[], [small, big], [far, moved], [], [far, near]]) == [None, big, moved, None, near]
