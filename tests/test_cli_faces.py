"""`secdfd-client detect` on photos, folders and videos, against dealer and servers running as
separate processes (a small model, dfdnet-s at 32x32, keeps this light). Each face is one secure
inference whose result must match the plaintext model on the same crop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import start_tiny_deployment
from PIL import Image
from test_client_faces import clip
from test_faces import FACE, FACE_BOX, face_image, scene, two_faces

from secdfd.client.main import main as client_main
from secdfd.common import roster
from secdfd.common.ml import faces
from secdfd.common.ml.data import image_input, open_rgb
from secdfd.common.ml.export import load_deployable
from secdfd.common.service import local

pytestmark = pytest.mark.processes

SIZE = 32


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """Dealer, server_a, server_b as processes on free loopback ports; yields (layout, endpoints, model)."""
    root = tmp_path_factory.mktemp("svc")
    layout, eps, started = start_tiny_deployment(root, local.Options(timeout=10.0, depth=4), SIZE)
    try:
        yield layout, eps, load_deployable(root / "model.pt")
    finally:
        local.stop(started)


def _cli(deploy, *args: str):
    layout, eps, _ = deploy
    return CliRunner().invoke(client_main, ["detect", *args, "--keys", str(layout.keys), "--server-a",
                                            eps.server_a, "--server-b", eps.server_b, "--timeout", "60"])


def _plain(model, img: Image.Image, crop: list[int]) -> float:
    with torch.no_grad():
        return float(model(image_input(img.crop(tuple(crop)), SIZE))[0, 0])


def test_the_face_photo_matches_the_plaintext_model_on_its_crop(deploy, tmp_path):
    _, _, model = deploy
    r = _cli(deploy, str(FACE), "--json", "--annotate", str(tmp_path / "seen.png"))
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["kind"] == "image" and len(out["faces"]) == 1
    face = out["faces"][0]
    assert faces.iou(tuple(face["box"]), FACE_BOX) >= 0.6
    p = _plain(model, face_image(), face["crop"])
    assert abs(face["p_fake"] - p) <= 1e-3 and face["verdict"] == roster.verdict(p) == out["verdict"]
    assert face["rounds"] > 100 and face["bytes_per_server"][0] == face["bytes_per_server"][1] > 0
    assert out["rounds"] == face["rounds"] and 0 < face["online_seconds"] <= face["seconds"]
    assert Image.open(tmp_path / "seen.png").size == (256, 256)


def test_two_faces_two_boxes_and_a_photo_without_one(deploy, tmp_path):
    _, _, model = deploy
    img, truth = two_faces()
    img.save(tmp_path / "two.png")
    scene(0).save(tmp_path / "house.jpg")
    r = _cli(deploy, str(tmp_path / "two.png"), str(tmp_path / "house.jpg"), "--json")
    assert r.exit_code == 0, r.output
    two, house = (json.loads(line) for line in r.output.splitlines())
    assert len(two["faces"]) == 2
    for box in truth:
        assert max(faces.iou(tuple(f["box"]), box) for f in two["faces"]) >= 0.6
    for f in two["faces"]:
        assert abs(f["p_fake"] - _plain(model, img, f["crop"])) <= 1e-3
    assert two["verdict"] == roster.verdict(max(f["p_fake"] for f in two["faces"]))
    assert house["verdict"] == "no face" and house["faces"] == [] and house["p_fake"] is None
    text = _cli(deploy, str(tmp_path / "house.jpg"))
    assert text.exit_code == 0 and text.output.startswith(f"{tmp_path / 'house.jpg'}: no face found")


def test_a_folder_of_twenty_images_with_a_csv(deploy, tmp_path):
    """19 pictures without a face and one with one, in nested folders, and a file that is not an image."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    for i in range(19):
        scene(i, (160, 120)).save(folder / ("trip" if i % 2 else ".") / f"scene{i:02}.png")
    face_image().save(folder / "trip" / "face.jpg", quality=95)
    (folder / "notes.txt").write_text("not taken: not an image suffix")
    r = _cli(deploy, str(folder), "--output", str(tmp_path / "out.csv"))
    assert r.exit_code == 0, r.output
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 20 and not any(row["error"] for row in rows)
    by_name = {Path(row["file"]).name: row for row in rows}
    assert by_name["face.jpg"]["faces"] == "1" and by_name["face.jpg"]["verdict"] in ("real", "fake")
    assert sum(row["verdict"] == "no face" for row in rows) == 19
    assert r.output.count("no face found") == 19 and "[" not in r.output  # no bar without a terminal


def test_a_broken_file_is_reported_and_the_others_go_on(deploy, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(2):
        scene(i, (160, 120)).save(folder / f"scene{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = _cli(deploy, str(tmp_path / "gone"), str(folder), "--json", "--output", str(tmp_path / "out.jsonl"))
    assert r.exit_code == 1
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert errors[0] == f"Error: {tmp_path / 'gone'}: no such file" and len(errors) == 2
    assert "broken.png: not a readable image" in errors[1] and "Traceback" not in r.output
    objects = [json.loads(line) for line in r.output.splitlines() if line.startswith("{")]
    assert [Path(o["file"]).name for o in objects] == ["gone", "broken.png", "scene0.png", "scene1.png"]
    assert "error" in objects[1] and objects[2]["verdict"] == objects[3]["verdict"] == "no face"
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_a_video_gets_a_verdict_with_per_frame_figures(deploy, tmp_path):
    _, _, model = deploy
    path = clip(tmp_path / "clip.mp4")
    r = _cli(deploy, str(path), "--frames", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["kind"] == "video" and [f["index"] for f in out["frames"]] == [0, 6, 11]
    scored = [f for f in out["frames"] if f["p_fake"] is not None]
    assert [f["index"] for f in scored] == [0, 6] and out["frames"][-1]["verdict"] == "no face"
    with av.open(str(path)) as c:
        decoded = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for f in scored:
        frame = Image.fromarray(decoded[f["index"]])
        assert abs(f["p_fake"] - _plain(model, frame, f["crop"])) <= 1e-3 and f["rounds"] > 100
    assert out["p_fake"] == pytest.approx(float(np.mean([f["p_fake"] for f in scored])))
    assert out["fake_share"] == sum(f["verdict"] == "fake" for f in scored) / 2
    assert out["verdict"] == roster.verdict(out["p_fake"]) and out["frames_scored"] == 2


def test_usage_errors(deploy, tmp_path):
    Image.new("RGB", (30, 12), (1, 2, 3)).save(tmp_path / "strip.png")
    r = _cli(deploy, str(tmp_path / "strip.png"))
    assert r.exit_code == 1 and r.output.strip() == (f"Error: {tmp_path / 'strip.png'}: 30x12 pixels is too small to "
                                                     "hold a face (at least 20 px on the shorter side); add --no-crop "
                                                     "if the image is a face crop already")
    r = _cli(deploy, str(FACE), str(FACE), "--annotate", str(tmp_path / "a.png"))
    assert r.exit_code == 2 and "--annotate takes exactly one image" in r.output
    r = _cli(deploy, str(FACE), "--output", str(tmp_path / "out.xlsx"))
    assert r.exit_code == 1 and "use a .csv or .jsonl file" in r.output
    assert open_rgb(FACE).size == (256, 256)
