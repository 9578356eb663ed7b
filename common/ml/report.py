"""How `secdfd-client detect` (and `secdfd detect`) show their results: lines for people, a CSV or
JSON Lines file, and an annotated copy of an image (each face's box with its verdict and probability)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import IO, Any

from PIL import Image, ImageDraw, ImageFont

from secdfd.common.errors import DataError

CSV_FIELDS = ("file", "kind", "verdict", "p_fake", "faces", "frames", "fake_share", "boxes", "face_p_fake",
              "seconds", "error")
FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _figures(r: dict[str, Any]) -> str:
    mb = [b / 1e6 for b in r["bytes_per_server"]]
    return (f"{r['online_seconds']:.2f} s online ({r['seconds']:.2f} s waited), {mb[0]:.1f} / {mb[1]:.1f} MB sent "
            f"by server_a / server_b, {r['rounds']} rounds")


def _box(b: list[int]) -> str:
    return f"{b[0]},{b[1]}-{b[2]},{b[3]}"


def human(r: dict[str, Any], figures: bool = True) -> list[str]:
    """Lines for a terminal: the file's verdict, then one line per face or frame; `figures=False`
    leaves out the secure figures (time online, bytes, rounds: the plaintext reference has none)."""
    name = r["file"]

    def fig(text: str) -> str:
        return text if figures else ""

    if "kind" not in r:  # one inference on the whole image (no face search)
        return [f"{name}: {r['verdict']} (p_fake {r['p_fake']:.4f})" + fig(f", {_figures(r)}")]
    if r["kind"] == "image":
        n = len(r["faces"])
        if not n:
            return [f"{name}: no face found ({r['detect_seconds']:.2f} s to search)"]
        head = (f"{name}: {r['verdict']} (p_fake {r['p_fake']:.4f}, the highest of {n} face{'s' * (n > 1)})"
                + fig(f", {_figures(r)}"))
        return [head] + [f"  face {i} at {_box(f['box'])}: {f['verdict']} (p_fake {f['p_fake']:.4f})"
                         + fig(f", {f['online_seconds']:.2f} s online") for i, f in enumerate(r["faces"], 1)]
    total = len(r["frames"])
    if r["p_fake"] is None:
        head = f"{name}: no face found in {total} frames"
    else:
        head = (f"{name}: {r['verdict']} (mean p_fake {r['p_fake']:.4f} over {r['frames_scored']} of {total} frames, "
                f"{r['fake_share']:.0%} of them fake)" + fig(f", {_figures(r)}"))
    lines = [head]
    for f in r["frames"]:
        where = f"face at {_box(f['box'])}: " if f.get("box") else ""
        what = "no face" if f["p_fake"] is None else f"{f['verdict']} (p_fake {f['p_fake']:.4f})"
        lines.append(f"  frame {f['index']} ({f['time']:.2f} s): {where}{what}")
    return lines


def row(r: dict[str, Any]) -> dict[str, Any]:
    """One CSV row per file."""
    out: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
    out["file"] = r["file"]
    if "error" in r:
        out["error"] = r["error"]
        return out
    out.update(kind=r.get("kind", "image"), verdict=r["verdict"], seconds=f"{r['seconds']:.3f}")
    if r["p_fake"] is not None:
        out["p_fake"] = f"{r['p_fake']:.6f}"
    if r.get("kind") == "image":
        out["faces"] = len(r["faces"])
        out["boxes"] = ";".join(" ".join(map(str, f["box"])) for f in r["faces"])
        out["face_p_fake"] = ";".join(f"{f['p_fake']:.6f}" for f in r["faces"])
    elif r.get("kind") == "video":
        out["faces"] = r["frames_scored"]
        out["frames"] = len(r["frames"])
        out["fake_share"] = "" if r["fake_share"] is None else f"{r['fake_share']:.4f}"
        out["face_p_fake"] = ";".join("" if f["p_fake"] is None else f"{f['p_fake']:.6f}" for f in r["frames"])
    return out


class Sink:
    """Results written to a file as they come: CSV (one row per file) or JSON Lines (one object per
    file, as printed by --json), chosen by the suffix."""

    def __init__(self, path: Path) -> None:
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unknown output format; use a .csv or .jsonl file")
        self.format = fmt
        try:
            self.file: IO[str] = open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise DataError(f"{path}: cannot write ({e.strerror})") from None
        self.csv = csv.DictWriter(self.file, CSV_FIELDS) if fmt == "csv" else None
        if self.csv is not None:
            self.csv.writeheader()

    def write(self, r: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow(row(r))
        else:
            self.file.write(json.dumps(r) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


# --- annotation -------------------------------------------------------------------------------

COLOURS = {"fake": (220, 40, 40), "real": (30, 160, 70)}


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size)
    except (OSError, ImportError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def annotate(img: Image.Image, r: dict[str, Any], out: Path) -> None:
    """Save a copy of `img` with each face's box and a label "fake 0.93" (red) or "real 0.12"
    (green) above it; without faces (or without a face search) one label in the corner."""
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    short = min(img.size)
    font = _font(max(12, short // 28))
    width = max(2, short // 200)
    pad = max(2, short // 160)

    def label(x: float, y: float, text: str, colour: tuple[int, int, int]) -> None:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        w, h = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(0.0, x), max(0.0, img.width - w))
        y = y - h if y - h >= 0 else y  # above the box, or inside it at the top edge
        draw.rectangle((x, y, x + w, y + h), fill=colour)
        draw.text((x + pad - left, y + pad - top), text, fill=(255, 255, 255), font=font)

    found = r.get("faces")
    if found:
        for f in found:
            colour = COLOURS.get(f["verdict"], (230, 160, 0))
            draw.rectangle(tuple(f["box"]), outline=colour, width=width)
            label(f["box"][0], f["box"][1], f"{f['verdict']} {f['p_fake']:.2f}", colour)
    elif r["p_fake"] is None:
        label(0, 0, "no face found", (90, 90, 90))
    else:
        label(0, 0, f"{r['verdict']} {r['p_fake']:.2f}", COLOURS.get(r["verdict"], (230, 160, 0)))
    try:
        img.save(out)
    except (OSError, ValueError) as e:
        raise DataError(f"{out}: cannot save the annotated image ({e})") from None
