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
    res = CliRunner().invoke(main, ["detect", "--plain", str(image), "--model", str(workdir / "model.pt"),
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
    res = run(main, ["detect", "--plain", str(tmp_path / "note.txt"), "--model", str(workdir / "model.pt")])
    assert res.exit_code == 1 and "not a readable image" in res.output and "Traceback" not in res.output
    res = run(main, ["detect", str(tmp_path / "note.txt")])
    assert res.exit_code == 2 and "secdfd-client detect" in res.output
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
