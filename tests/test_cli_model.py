"""The model area's commands end to end on a tiny proxy set: synth, train, export, eval, detect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from secdfd.common.cli.main import main

SIZE = "64"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40-image proxy set and a deployable model trained on it for one epoch."""
    root = tmp_path_factory.mktemp("cli")
    run = CliRunner().invoke
    res = run(main, ["data", "synth", "--out", str(root / "data"), "--count", "40", "--seed", "3", "--size", SIZE])
    assert res.exit_code == 0, res.output
    for stream in ("rgb", "ycbcr"):
        res = run(main, ["train", "--data", str(root / "data"), "--stream", stream, "--size", SIZE,
                         "--epochs", "1", "--batch-size", "16", "--out", str(root / f"{stream}.pt")])
        assert res.exit_code == 0, res.output
        assert "epoch 1/1" in res.output and (root / f"{stream}.pt.ckpt").exists()
    res = run(main, ["export", "--rgb", str(root / "rgb.pt"), "--ycbcr", str(root / "ycbcr.pt"),
                     "--out", str(root / "model.pt")])
    assert res.exit_code == 0, res.output
    return root


def test_synth_is_reproducible(workdir: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "again"), "--count", "40",
                                    "--seed", "3", "--size", SIZE])
    assert res.exit_code == 0, res.output
    for name in ("real/000000.jpg", "fake/000007.jpg"):
        assert (tmp_path / "again" / name).read_bytes() == (workdir / "data" / name).read_bytes()
    assert len(list((tmp_path / "again" / "fake").iterdir())) == 20


def test_eval_json(workdir: Path) -> None:
    res = CliRunner().invoke(main, ["eval", "--data", str(workdir / "data"), "--model", str(workdir / "model.pt"),
                                    "--split", "all", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert 0.0 <= report["accuracy"] <= 1.0 and 0.0 <= report["auc"] <= 1.0
    assert report["n"] == 40 and sum(map(sum, report["confusion"])) == 40
    assert set(report["streams"]) == {"rgb", "ycbcr"}


def test_detect_plain_json(workdir: Path) -> None:
    image = workdir / "data" / "fake" / "000000.jpg"
    res = CliRunner().invoke(main, ["detect", str(image), "--no-crop", "--model", str(workdir / "model.pt"),
                                    "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert 0.0 <= out["p_fake"] <= 1.0
    assert out["verdict"] == ("fake" if out["p_fake"] >= 0.5 else "real")


def test_resume_finished_run_is_a_noop(workdir: Path) -> None:
    res = CliRunner().invoke(main, ["train", "--data", str(workdir / "data"), "--stream", "rgb", "--size", SIZE,
                                    "--epochs", "1", "--batch-size", "16", "--out", str(workdir / "rgb.pt"),
                                    "--resume"])
    assert res.exit_code == 0, res.output
    assert "resuming after epoch 1" in res.output


def test_user_errors_are_messages_not_tracebacks(workdir: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke
    (tmp_path / "note.txt").write_text("hello")
    (tmp_path / "note.png").write_text("hello")  # an image's suffix, not an image's contents
    res = run(main, ["detect", str(tmp_path / "note.png"), "--model", str(workdir / "model.pt")])
    assert res.exit_code == 1 and "not a readable image" in res.output and "Traceback" not in res.output
    res = run(main, ["detect", str(tmp_path / "note.txt"), "--model", str(workdir / "model.pt")])
    assert res.exit_code == 1 and "not an image or a video" in res.output and "Traceback" not in res.output
    res = run(main, ["eval", "--data", str(tmp_path / "nowhere"), "--model", str(workdir / "model.pt")])
    assert res.exit_code == 1 and "not a folder" in res.output
    res = run(main, ["eval", "--data", str(workdir / "data"), "--model", str(tmp_path / "note.txt")])
    assert res.exit_code == 1 and "not a deployable model" in res.output
    res = run(main, ["train", "--data", str(workdir / "data"), "--stream", "rgb", "--model", "resnet",
                     "--out", str(tmp_path / "x.pt")])
    assert res.exit_code == 1 and "known models: dfdnet, dfdnet-s" in res.output
    res = run(main, ["export", "--rgb", str(workdir / "ycbcr.pt"), "--ycbcr", str(workdir / "rgb.pt"),
                     "--out", str(tmp_path / "m.pt")])
    assert res.exit_code == 2 and "pass each where it belongs" in res.output


def test_detect_is_plaintext_takes_many_files_and_folders_and_speaks_the_clients_json(workdir: Path,
                                                                                     tmp_path: Path) -> None:
    """`secdfd detect` needs no --plain (still accepted), takes files and folders like the client, and
    prints the client's JSON: `file`, and the same fields as `secdfd-client detect --json`."""
    folder = workdir / "data" / "fake"
    one = workdir / "data" / "real" / "000000.jpg"
    model = ["--model", str(workdir / "model.pt")]
    res = CliRunner().invoke(main, ["detect", str(one), str(folder), "--no-crop", "--json", *model])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["file"] for r in rows] == [str(one)] + [str(f) for f in sorted(folder.iterdir())]
    client_fields = {"file", "verdict", "p_fake", "seconds", "online_seconds", "bytes_per_server", "rounds",
                     "offline_seconds", "dealer_seconds", "prepare_seconds", "dealer_bytes", "request"}
    assert all(set(r) == client_fields for r in rows)
    assert all(r["verdict"] == ("fake" if r["p_fake"] >= 0.5 else "real") for r in rows)
    assert rows[0]["rounds"] == 0 and rows[0]["bytes_per_server"] == [0, 0]
    plain = CliRunner().invoke(main, ["detect", "--plain", str(one), "--no-crop", "--json", *model])
    assert plain.exit_code == 0 and json.loads(plain.output)["p_fake"] == rows[0]["p_fake"]
    text = CliRunner().invoke(main, ["detect", str(one), "--no-crop", *model])
    assert text.exit_code == 0 and text.output == f"{one}: {rows[0]['verdict']} (p_fake {rows[0]['p_fake']:.4f})\n"


def test_detect_searches_faces_like_the_client(workdir: Path) -> None:
    face = Path(__file__).resolve().parents[1] / "examples" / "face.png"
    res = CliRunner().invoke(main, ["detect", str(face), "--json", "--model", str(workdir / "model.pt")])
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["file"] == str(face) and r["kind"] == "image" and len(r["faces"]) == 1
    assert set(r["faces"][0]) >= {"box", "score", "crop", "verdict", "p_fake"}
    assert r["p_fake"] == r["faces"][0]["p_fake"]


def test_export_refuses_the_packaged_models_folder_without_force(workdir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from secdfd.common.ml import export

    packaged = tmp_path / "package-models"  # stands in for the installed common/ml/models/
    packaged.mkdir()
    (packaged / "dfdnet-s.pt").write_bytes(b"the shipped model")
    monkeypatch.setattr(export, "MODELS_DIR", packaged)
    args = ["export", "--rgb", str(workdir / "rgb.pt"), "--ycbcr", str(workdir / "ycbcr.pt"),
            "--out", str(packaged / "dfdnet-s.pt")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "replace the embedded model" in res.output and "--force" in res.output
    assert "secdfd up --model runs/model.pt" in res.output
    assert (packaged / "dfdnet-s.pt").read_bytes() == b"the shipped model"
    res = CliRunner().invoke(main, [*args, "--force"])
    assert res.exit_code == 0, res.output
    assert (packaged / "dfdnet-s.pt").read_bytes() != b"the shipped model"


def test_synth_refuses_a_used_folder_before_it_starts_and_names_its_fallback_first(tmp_path: Path) -> None:
    import importlib.util

    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    res = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "used"), "--count", "4"])
    assert res.exit_code == 1 and "not an empty folder" in res.output and "synthesizing" not in res.output
    res = CliRunner().invoke(main, ["data", "synth", "--out", str(tmp_path / "new"), "--count", "4", "--size", "32"])
    assert res.exit_code == 0, res.output
    if importlib.util.find_spec("skimage") is None:
        note = res.output.index("scikit-image is not installed")
        assert note < res.output.index("synthesizing") and "pip install -e '.[data]'" in res.output
    else:
        assert "not installed" not in res.output


def test_train_with_a_lone_last_image_at_a_small_size(workdir: Path) -> None:
    """A last batch of one image at 32 px (1x1 maps in the exit flow) used to end in a BatchNorm traceback."""
    from secdfd.common.ml.data import load_folder

    n_train = len(load_folder(workdir / "data", 32, "train", 0.2))
    res = CliRunner().invoke(main, ["train", "--data", str(workdir / "data"), "--stream", "rgb", "--size", "32",
                                    "--epochs", "1", "--batch-size", str(n_train - 1), "--out",
                                    str(workdir / "lone.pt")])
    assert res.exit_code == 0, res.output
    assert "epoch 1/1" in res.output
