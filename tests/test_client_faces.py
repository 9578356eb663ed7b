"""What the client does around the secure detections: faces, crops, folders, videos, the progress
bar, CSV/JSON Lines output and annotation. The secure step is stood in for by the plaintext model
(the servers' side is tested in test_cli_faces.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import write_tiny_model
from PIL import Image
from test_faces import FACE, FACE_BOX, face_image, scene, two_faces

from secdfd.client.progress import Progress
from secdfd.common import roster
from secdfd.common.errors import DataError
from secdfd.common.ml import faces, video
from secdfd.common.ml.analyse import Analyser, Settings, collect
from secdfd.common.ml.data import image_input, load_image
from secdfd.common.ml.export import load_deployable
from secdfd.common.ml.report import CSV_FIELDS, Sink, annotate, human, row

SIZE = 32


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_deployable(write_tiny_model(tmp_path_factory.mktemp("m") / "model.pt", SIZE))


def plain(model) -> Any:
    """The plaintext model behind the client's secure-step interface (with made-up figures)."""
    calls: list[torch.Tensor] = []

    def secure(x: torch.Tensor, name: str) -> dict[str, Any]:
        calls.append(x)
        with torch.no_grad():
            p = float(model(x)[0, 0])
        return {"file": name, "verdict": roster.verdict(p), "p_fake": p, "seconds": 0.5, "online_seconds": 0.25,
                "bytes_per_server": [1000, 1000], "rounds": 100}

    secure.calls = calls  # type: ignore[attr-defined]
    return secure


@pytest.fixture(scope="module")
def analyser(model) -> Analyser:
    return Analyser(plain(model), SIZE)


def p_plain(model, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(x)[0, 0])


def test_one_face_is_cropped_and_detected(analyser, model):
    r = analyser.image(FACE)
    assert r["kind"] == "image" and r["width"] == r["height"] == 256 and len(r["faces"]) == 1
    f = r["faces"][0]
    assert faces.iou(tuple(f["box"]), FACE_BOX) >= 0.6 and "file" not in f
    x1, y1, x2, y2 = f["crop"]
    assert x2 - x1 == y2 - y1 == round(1.3 * max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]))
    crop = image_input(face_image().crop((x1, y1, x2, y2)), SIZE)
    assert f["p_fake"] == r["p_fake"] == pytest.approx(p_plain(model, crop), abs=1e-6)
    assert r["verdict"] == roster.verdict(r["p_fake"]) and r["rounds"] == 100 and r["bytes_per_server"] == [1000, 1000]
    assert human(r)[0].startswith(f"{FACE}: {r['verdict']} (p_fake ")


def test_the_margin_is_a_setting(model):
    r = Analyser(plain(model), SIZE, Settings(margin=1.0)).image(FACE)
    f = r["faces"][0]
    assert f["crop"][2] - f["crop"][0] == round(max(f["box"][2] - f["box"][0], f["box"][3] - f["box"][1]))
    with pytest.raises(ValueError, match="margin"):
        Settings(margin=0.9)


def test_two_faces_each_detected_and_any_fake_makes_the_image_fake(analyser, tmp_path):
    img, _ = two_faces()
    img.save(tmp_path / "two.png")
    r = analyser.image(tmp_path / "two.png")
    assert len(r["faces"]) == 2 and r["p_fake"] == max(f["p_fake"] for f in r["faces"])
    assert r["verdict"] == ("fake" if any(f["verdict"] == "fake" for f in r["faces"]) else "real")
    assert r["rounds"] == 200 and r["seconds"] == 1.0 and len(human(r)) == 3


def test_no_face_is_a_result(analyser, tmp_path):
    scene(0).save(tmp_path / "house.jpg")
    secure = analyser.secure
    before = len(secure.calls)
    r = analyser.image(tmp_path / "house.jpg")
    assert r["verdict"] == "no face" and r["faces"] == [] and r["p_fake"] is None and r["rounds"] == 0
    assert len(secure.calls) == before  # nothing was shared
    assert human(r) == [f"{tmp_path / 'house.jpg'}: no face found ({r['detect_seconds']:.2f} s to search)"]
    json.dumps(r)


def test_too_small_for_a_face_is_refused_unless_it_is_a_crop(analyser, model, tmp_path):
    Image.new("RGB", (40, 19), (200, 150, 120)).save(tmp_path / "tiny.png")
    with pytest.raises(DataError, match=r"tiny.png: 40x19 pixels is too small to hold a face .*--no-crop"):
        analyser.image(tmp_path / "tiny.png")
    r = Analyser(plain(model), SIZE, Settings(crop=False)).image(tmp_path / "tiny.png")
    assert set(r) == {"file", "verdict", "p_fake", "seconds", "online_seconds", "bytes_per_server", "rounds"}
    assert r["p_fake"] == pytest.approx(p_plain(model, load_image(tmp_path / "tiny.png", SIZE)), abs=1e-6)


def test_no_crop_is_the_whole_image_as_before(model):
    secure = plain(model)
    r = Analyser(secure, SIZE, Settings(crop=False)).image(FACE)
    assert torch.equal(secure.calls[0], load_image(FACE, SIZE)) and "faces" not in r and "kind" not in r
    assert human(r)[0].startswith(f"{FACE}: {r['verdict']} (p_fake {r['p_fake']:.4f}), 0.25 s online")


def test_folders_are_searched_for_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / ".hidden").mkdir()
    for name in ("a/1.png", "a/b/2.JPG", "a/b/3.webp", "a/.hidden/4.png", "a/.5.png", "a/notes.txt", "a/clip.mp4"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "photo", format="PNG")  # an image without a suffix
    (tmp_path / "README.md").write_text("# not an image")
    named = [tmp_path / "clip.MOV", tmp_path / "photo", tmp_path / "README.md", tmp_path / "gone.png"]
    for f in named[:1]:
        f.write_bytes(b"x")
    files, refused = collect([tmp_path / "a", tmp_path / "empty", *named])
    assert files == [tmp_path / "a/1.png", tmp_path / "a/b/2.JPG", tmp_path / "a/b/3.webp", tmp_path / "clip.MOV",
                     tmp_path / "photo"]
    assert [(p, why.split(" (")[0]) for p, why in refused] == [
        (tmp_path / "empty", "no image files in this folder"), (tmp_path / "README.md", "not an image or a video"),
        (tmp_path / "gone.png", "no such file")]


def test_a_named_non_image_is_refused_before_any_connection(tmp_path, monkeypatch):
    """`secdfd-client detect README.md`: an error line at once; with nothing left to detect, no
    connection is made at all; with --json the refusal is a record on stdout."""
    import secdfd.client.main as client_main

    def no_network(*args: Any) -> None:
        raise AssertionError("the client connected")

    monkeypatch.setattr(client_main, "Client", no_network)
    (tmp_path / "README.md").write_text("# not an image")
    runner = CliRunner()
    r = runner.invoke(client_main.main, ["detect", str(tmp_path / "README.md"), str(tmp_path / "nope.jpg"), "--json",
                                         "--output", str(tmp_path / "out.csv")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {tmp_path / 'README.md'}: not an image or a video (images: .bmp" in r.stderr
    assert f"Error: {tmp_path / 'nope.jpg'}: no such file" in r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [set(x) for x in records] == [{"file", "error"}] * 2
    assert [row["file"] for row in csv.DictReader((tmp_path / "out.csv").open())] == [str(tmp_path / "README.md"),
                                                                                    str(tmp_path / "nope.jpg")]


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_only():
    tty, out = FakeTTY(), io.StringIO()
    bar = Progress(20, stream=tty, out=out)
    assert bar.enabled
    bar.show("img/00.png")
    for i in range(20):
        if i == 3:
            bar.echo("img/03.png: real (p_fake 0.1000)")
        bar.advance(f"img/{i + 1:02}.png" if i < 19 else "")
    bar.close()
    text = tty.getvalue()
    assert "[" + "." * 24 + "]  0/20   0%  img/00.png" in text
    assert " 3/20  15%" in text and "[" + "#" * 24 + "] 20/20 100%" in text and "s/file" in text
    assert text.endswith("\r\x1b[2K")  # the bar is gone at the end
    assert out.getvalue() == "img/03.png: real (p_fake 0.1000)\n"
    pipe = io.StringIO()
    quiet = Progress(20, stream=pipe)
    assert not quiet.enabled
    quiet.show("x")
    quiet.advance()
    quiet.close()
    assert pipe.getvalue() == ""


def test_csv_and_jsonl_output(analyser, tmp_path):
    img, _ = two_faces()
    img.save(tmp_path / "two.png")
    scene(1).save(tmp_path / "none.png")
    results = [analyser.image(tmp_path / "two.png"), analyser.image(tmp_path / "none.png"),
               {"file": "bad.png", "error": "bad.png: not a readable image"}]
    for suffix in (".csv", ".jsonl"):
        sink = Sink(tmp_path / f"out{suffix}")
        for r in results:
            sink.write(r)
        sink.close()
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(CSV_FIELDS) and len(rows) == 3
    assert rows[0]["faces"] == "2" and len(rows[0]["boxes"].split(";")) == 2 and rows[0]["verdict"] in ("real", "fake")
    assert float(rows[0]["p_fake"]) == pytest.approx(results[0]["p_fake"], abs=1e-6)
    assert rows[1]["verdict"] == "no face" and rows[1]["p_fake"] == "" and rows[1]["faces"] == "0"
    assert rows[2]["error"].endswith("not a readable image") and rows[2]["verdict"] == ""
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert [json.loads(x)["file"] for x in lines] == [r["file"] for r in results]
    with pytest.raises(DataError, match=r"use a \.csv or \.jsonl file"):
        Sink(tmp_path / "out.xlsx")


def test_annotation_draws_each_face(analyser, tmp_path):
    img, _ = two_faces()
    img.save(tmp_path / "two.png")
    r = analyser.image(tmp_path / "two.png")
    annotate(img, r, tmp_path / "out.png")
    out = np.asarray(Image.open(tmp_path / "out.png").convert("RGB")).astype(int)
    assert out.shape == (360, 640, 3)
    for f in r["faces"]:
        x1, y1, x2, y2 = f["box"]
        colour = (220, 40, 40) if f["verdict"] == "fake" else (30, 160, 70)
        assert tuple(out[(y1 + y2) // 2, x1]) == colour and tuple(out[(y1 + y2) // 2, x2]) == colour
        label = out[max(0, y1 - 12):y1, x1:x1 + 40]
        assert (label == colour).all(axis=-1).mean() > 0.3 and (label == 255).all(axis=-1).any()  # white text
    none = {"file": "x", "kind": "image", "verdict": "no face", "p_fake": None, "faces": []}
    annotate(img, none, tmp_path / "none.png")
    assert Image.open(tmp_path / "none.png").size == (640, 360)


def clip(path: Path, n: int = 12) -> Path:
    """A 12-frame video: the face moving right in frames 0-7, then four frames without a face."""
    face = np.asarray(face_image().resize((160, 160)))
    frames = []
    for i in range(n):
        f = np.full((240, 320, 3), 110, np.uint8)
        if i < 8:
            f[40:200, 10 + 10 * i:170 + 10 * i] = face
        else:
            f[:] = np.asarray(scene(i, (320, 240)))
        frames.append(f)
    return video.write(path, frames, fps=12)


def test_video_main_face_per_frame(analyser, tmp_path):
    path = clip(tmp_path / "clip.mp4")
    r = Analyser(analyser.secure, SIZE, Settings(frames=6)).file(path)
    assert r["kind"] == "video" and r["frames_total"] == 12 and r["fps"] == 12
    assert (r["width"], r["height"]) == (320, 240)
    idx = [f["index"] for f in r["frames"]]
    assert idx == [0, 2, 4, 7, 9, 11]
    with_face = [f for f in r["frames"] if f["p_fake"] is not None]
    assert [f["index"] for f in with_face] == [0, 2, 4, 7] and r["frames_scored"] == 4
    for f in with_face:  # the face moves 10 px a frame; its box follows
        x = 10 + 10 * f["index"]
        assert faces.iou(tuple(f["box"]), (x + 36, 25 + 40, x + 104, 106 + 40)) >= 0.5
        assert f["time"] == pytest.approx(f["index"] / 12, abs=1e-3) and f["rounds"] == 100
    assert r["p_fake"] == pytest.approx(sum(f["p_fake"] for f in with_face) / 4)
    assert r["fake_share"] == sum(f["verdict"] == "fake" for f in with_face) / 4
    assert r["verdict"] == roster.verdict(r["p_fake"]) and r["rounds"] == 400
    lines = human(r)
    assert "over 4 of 6 frames" in lines[0] and len(lines) == 7 and lines[-1].endswith("no face")
    out = row(r)
    assert out["faces"] == 4 and out["frames"] == 6 and out["face_p_fake"].count(";") == 5
    json.dumps(r)


def test_video_without_crop_and_broken_videos(model, tmp_path):
    path = clip(tmp_path / "clip.mp4", 8)
    secure = plain(model)
    r = Analyser(secure, SIZE, Settings(crop=False, frames=3)).video(path)
    assert [f["index"] for f in r["frames"]] == [0, 4, 7] and r["frames_scored"] == 3 and len(secure.calls) == 3
    assert all(f["box"] is None and "file" not in f for f in r["frames"])
    (tmp_path / "junk.mp4").write_text("not a video")
    with pytest.raises(DataError, match="junk.mp4: not a readable video"):
        Analyser(secure, SIZE, Settings(crop=False)).file(tmp_path / "junk.mp4")
    with pytest.raises(DataError, match="no such file"):
        Analyser(secure, SIZE, Settings(crop=False)).file(tmp_path / "gone.mp4")
