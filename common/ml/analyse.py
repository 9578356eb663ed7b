"""What a detection does with each file before and after the model: `secdfd-client detect` (one
secure inference per crop) and `secdfd detect` (the plaintext reference) run the same steps.

The client owns the image, so it finds the faces in plaintext and shares only the crops:

- an image: EXIF orientation applied, faces found (MTCNN, `ml.faces`), each face cropped (a square
  of `margin` x the box's larger side) and detected on its own; the client sends the crops of an
  image in requests of several crops, each request one secure session (the rounds shared). The
  image is fake if any face is; its `p_fake` is the highest of its faces'. No face is a result.
- with `crop=False` the whole image is the model's input (it is a face crop already), as before:
  the result is exactly `Client.detect_tensor`'s.
- a video: `frames` evenly spaced frames; the main face is followed from frame to frame
  (`ml.faces.Tracker`) and detected in each; the video's `p_fake` is the mean over the frames where
  the face was found, `fake_share` the share of those frames called fake.

The secure step is any function (tensor, name) -> `Client.detect_tensor`'s dict, so this module
runs against the servers or against the plaintext model (`secdfd detect`, tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from secdfd.common import roster
from secdfd.common.errors import DataError
from secdfd.common.ml import faces, video
from secdfd.common.ml.data import image_input, load_image, open_rgb

SecureDetect = Callable[[torch.Tensor, str], dict[str, Any]]
SecureCrops = Callable[[list[torch.Tensor], str], list[dict[str, Any]]]  # several crops, one result each

# Suffixes of the files taken from a folder (a file named on the command line is also taken if its
# header is an image's; videos by their suffix, see `ml.video.SUFFIXES`).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm", ".pbm", ".pnm"})
NO_FACE = "no face"


@dataclass(frozen=True)
class Settings:
    crop: bool = True  # find faces; False: the whole image is one face crop
    margin: float = faces.MARGIN
    min_face: int = faces.MIN_FACE
    face_score: float = faces.SCORE
    frames: int = 16  # per video

    def __post_init__(self) -> None:
        if self.margin < 1.0:
            raise ValueError(f"margin must be at least 1.0 (the face's own box), got {self.margin:g}")
        if self.min_face < 12:
            raise ValueError(f"the smallest face must be at least 12 pixels, got {self.min_face}")
        if not 0.0 < self.face_score < 1.0:
            raise ValueError(f"the face score must be in (0, 1), got {self.face_score:g}")
        if self.frames < 1:
            raise ValueError(f"at least one frame per video, got {self.frames}")


def collect(paths: Iterable[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """The files to detect, and (path, reason) for each path refused before any detection.

    A folder gives the image files below it (recursively, sorted, hidden ones skipped), or a refusal
    if it holds none. A named file is taken if its suffix is an image's or a video's, or if Pillow
    recognises its header (an image without a suffix); a missing file or any other file is refused
    here, on this machine, so that nothing is sent for it.
    """
    files: list[Path] = []
    refused: list[tuple[Path, str]] = []
    for p in paths:
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES and q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                refused.append((p, "no image files in this folder"))
            files += found
        elif not p.exists():
            refused.append((p, "no such file"))
        elif p.suffix.lower() in IMAGE_SUFFIXES or video.is_video(p) or _image_header(p):
            files.append(p)
        else:
            refused.append((p, "not an image or a video (images: " + " ".join(sorted(IMAGE_SUFFIXES))
                            + "; videos: " + " ".join(sorted(video.SUFFIXES)) + ")"))
    return files, refused


def _image_header(path: Path) -> bool:
    """Whether Pillow recognises the file's header as an image (it reads the header only)."""
    try:
        with Image.open(path):
            return True
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _sums(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The secure figures of several inferences added up (what the client waited, the servers'
    online time, the bytes each server sent, the rounds); the crops of one request (one `request`
    id, a batch) count once."""
    seen: set[str] = set()
    once = []
    for p in parts:
        if p.get("request") not in seen:
            once.append(p)
        if p.get("request") is not None:
            seen.add(p["request"])
    parts = once
    return {
        "seconds": sum(p["seconds"] for p in parts),
        "online_seconds": sum(p["online_seconds"] for p in parts),
        "bytes_per_server": [sum(p["bytes_per_server"][i] for p in parts) for i in range(2)],
        "rounds": sum(p["rounds"] for p in parts),
    }


class Analyser:
    """Detect files one at a time; `file(path)` -> one result dict (see the module docstring)."""

    def __init__(self, secure: SecureDetect, size: int, settings: Settings | None = None,
                 secure_crops: SecureCrops | None = None) -> None:
        """`secure` detects one input; `secure_crops`, if given, several crops at once (the client:
        the faces of an image, the frames of a video, in requests of several crops)."""
        self.secure, self.size = secure, size
        self.secure_crops = secure_crops or (lambda xs, name: [secure(x, name) for x in xs])
        self.settings = settings or Settings()
        s = self.settings
        self.detector = faces.FaceDetector(s.min_face, s.face_score) if s.crop else None

    def file(self, path: Path) -> dict[str, Any]:
        return self.video(path) if video.is_video(path) else self.image(path)

    def image(self, path: Path) -> dict[str, Any]:
        if self.detector is None:
            return self.secure(load_image(path, self.size), str(path))
        return self.faces_in(open_rgb(path), str(path))

    def find(self, img: Image.Image, name: str) -> list[faces.Face]:
        """The faces of an image; DataError if it is too small to hold one."""
        if self.detector is None:
            raise ValueError("face detection is off (crop=False)")
        w, h = img.size
        if min(w, h) < self.settings.min_face:
            raise DataError(f"{name}: {w}x{h} pixels is too small to hold a face (at least {self.settings.min_face} "
                            "px on the shorter side); add --no-crop if the image is a face crop already")
        return self.detector.detect(img)

    def _faces(self, shots: Sequence[tuple[Image.Image, faces.Face]], name: str) -> list[dict[str, Any]]:
        """Secure detections of the faces' crops (all at once: the client sends them in requests of
        several crops), each with where the face and the crop are."""
        m = self.settings.margin
        results = self.secure_crops([faces.crop_face(img, f.box, self.size, m) for img, f in shots], name)
        return [{"box": f.rounded(), "score": round(f.score, 4), "crop": list(faces.crop_box(f.box, img.width,
                 img.height, m)), **{k: v for k, v in r.items() if k != "file"}}
                for (img, f), r in zip(shots, results, strict=True)]

    def faces_in(self, img: Image.Image, name: str) -> dict[str, Any]:
        """Every face of one image, each detected securely; the image is fake if any face is."""
        t0 = time.perf_counter()
        found = self.find(img, name)
        detect_s = time.perf_counter() - t0
        results = self._faces([(img, f) for f in found], name)
        p = max((r["p_fake"] for r in results), default=None)
        return {"file": name, "kind": "image", "verdict": NO_FACE if p is None else roster.verdict(p), "p_fake": p,
                "faces": results, "width": img.width, "height": img.height, "detect_seconds": detect_s,
                **_sums(results)}

    def video(self, path: Path) -> dict[str, Any]:
        """The main face in `frames` evenly spaced frames of a video (or whole frames without crop)."""
        name = str(path)
        frames: list[dict[str, Any]] = []
        detect_s = 0.0
        tracker = faces.Tracker()
        shots: list[tuple[dict[str, Any], Image.Image, faces.Face | None]] = []  # found first, then detected
        with video.Video(path) as v:
            info = v.info
            for fr in v.sample(self.settings.frames):
                entry: dict[str, Any] = {"index": fr.index, "time": round(fr.time, 3)}
                frames.append(entry)
                if self.detector is None:
                    shots.append((entry, fr.image, None))
                    continue
                t0 = time.perf_counter()
                face = tracker.update(self.find(fr.image, name))
                detect_s += time.perf_counter() - t0
                if face is None:
                    entry.update(box=None, verdict=NO_FACE, p_fake=None)
                else:
                    shots.append((entry, fr.image, face))
        if self.detector is None:
            whole = self.secure_crops([image_input(img, self.size) for _, img, _ in shots], name)
            for (entry, _, _), r in zip(shots, whole, strict=True):
                entry.update(box=None, **{k: v for k, v in r.items() if k != "file"})
        else:
            found = [(img, f) for _, img, f in shots if f is not None]
            for (entry, _, _), r in zip(shots, self._faces(found, name), strict=True):
                entry.update(r)
        scored = [f for f in frames if f["p_fake"] is not None]
        mean = sum(f["p_fake"] for f in scored) / len(scored) if scored else None
        share = sum(f["verdict"] == "fake" for f in scored) / len(scored) if scored else None
        return {"file": name, "kind": "video", "verdict": NO_FACE if mean is None else roster.verdict(mean),
                "p_fake": mean, "fake_share": share, "frames_scored": len(scored), "frames": frames,
                "frames_total": info.frames, "fps": info.fps, "duration": info.duration, "width": info.width,
                "height": info.height, "detect_seconds": detect_s, **_sums(scored)}
