"""Video frames in, Pillow images out (PyAV, which bundles FFmpeg: no system codecs needed).

`sample(path, count)` decodes `count` evenly spaced frames of a file's first video stream: frame
indices round(linspace(0, N - 1, count)), found by seeking to the key frame before each one and
decoding forward, so a long video is not decoded whole. The frame count comes from the container;
where it does not say, from duration x frame rate, and failing both from one pass of counting.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.error
import av.video
import numpy as np
from PIL import Image

from secdfd.common.errors import DataError
from secdfd.common.ml.data import MAX_PIXELS

# File suffixes taken for videos (anything else given on the command line is read as an image).
SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
                      ".ts", ".mts", ".ogv"})


def is_video(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # frames in the stream (estimated where the container does not say)
    fps: float
    duration: float  # seconds
    width: int
    height: int


@dataclass(frozen=True)
class Frame:
    index: int  # position in the stream, from 0
    time: float  # seconds from the start
    image: Image.Image  # RGB


def _stream(container: av.container.InputContainer, path: Path) -> av.video.VideoStream:
    if not container.streams.video:
        raise DataError(f"{path}: no video stream")
    stream = container.streams.video[0]
    w, h = stream.codec_context.width, stream.codec_context.height
    if w * h > MAX_PIXELS:
        raise DataError(f"{path}: {w}x{h} pixels per frame exceeds the limit of {MAX_PIXELS}")
    return stream


def _count(container: av.container.InputContainer, stream: av.video.VideoStream) -> int:
    """Frames in the stream: the container's count, else duration x rate, else decode and count."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if stream.duration and stream.time_base and rate:
        return max(1, round(float(stream.duration * stream.time_base * rate)))
    if container.duration and rate:
        return max(1, round(container.duration / av.time_base * float(rate)))
    n = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return n


def indices(total: int, count: int) -> list[int]:
    """`count` evenly spaced frame indices of `total` (fewer when the video has fewer frames)."""
    if total <= 0 or count <= 0:
        return []
    return sorted({round(float(v)) for v in np.linspace(0, total - 1, min(count, total))})


class Video:
    """An open video file; use as a context manager. Raises DataError for files PyAV cannot read."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.container = av.open(str(self.path), "r")
        except FileNotFoundError:
            raise DataError(f"{self.path}: no such file") from None
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise DataError(f"{self.path}: not a readable video ({e.__class__.__name__})") from None
        try:
            self.stream = _stream(self.container, self.path)
            rate = self.stream.average_rate or self.stream.guessed_rate or Fraction(25)
            total = _count(self.container, self.stream)
        except (av.error.FFmpegError, OSError, ValueError) as e:
            self.container.close()
            raise DataError(f"{self.path}: cannot decode video ({e})") from None
        except DataError:
            self.container.close()
            raise
        self.rate = Fraction(rate)
        self.info = VideoInfo(total, float(rate), total / float(rate), self.stream.codec_context.width,
                              self.stream.codec_context.height)

    def __enter__(self) -> Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def sample(self, count: int) -> Iterator[Frame]:
        """`count` evenly spaced frames, in order, one at a time (DataError if decoding fails)."""
        try:
            yield from self._frames(indices(self.info.frames, count))
        except (av.error.FFmpegError, OSError, ValueError) as e:
            raise DataError(f"{self.path}: cannot decode video ({e})") from None

    def _frames(self, wanted: Sequence[int]) -> Iterator[Frame]:
        stream, tb = self.stream, self.stream.time_base
        start = stream.start_time or 0
        if tb is None:  # no timestamps to seek by: decode in order and keep the wanted ones
            todo = set(wanted)
            for i, frame in enumerate(self.container.decode(stream)):
                if i in todo:
                    yield Frame(i, i / float(self.rate), _rgb(frame))
            return
        last = None
        for k in wanted:
            target = start + round(k / self.rate / tb)
            self.container.seek(target, stream=stream, backward=True, any_frame=False)
            got = None
            for frame in self.container.decode(stream):
                last = frame
                if frame.pts is None or frame.pts >= target:
                    got = frame
                    break
            got = got or last  # past the end (an estimated count): the last frame there is
            if got is None:
                return
            t = float((got.pts - start) * tb) if got.pts is not None else k / float(self.rate)
            yield Frame(k, t, _rgb(got))


def _rgb(frame: av.VideoFrame) -> Image.Image:
    return Image.fromarray(frame.to_ndarray(format="rgb24"))


def write(path: str | Path, frames: Sequence[np.ndarray], fps: int = 25) -> Path:
    """Encode H x W x 3 uint8 frames (even sides) as H.264 in `path` (for tests and examples)."""
    path = Path(path)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        out.mux(stream.encode(None))
    return path
