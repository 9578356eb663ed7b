"""The benchmark report: grouping per layer and block, totals that add up, the files written."""

from __future__ import annotations

import json
import sys

import pytest

from secdfd.common.bench.report import (
    compare_table,
    group,
    layer_keys,
    markdown,
    residuals,
    summarize,
    write_report,
)
from secdfd.common.engine.figures import StepFigures

_INDEX = iter(range(10**6))


def _step(name, op, b, rounds, seconds):
    return StepFigures(next(_INDEX), name, op, (b, b + 1), rounds, seconds).to_dict()


# Two streams in lockstep (rgb first, then ycbcr in plan order), unnamed nodes, a fusion head.
STEPS = [
    _step("rgb.stem1.conv", "linear", 1000, 1, 0.10),
    _step("rgb.relu", "relu", 2000, 4, 0.20),
    _step("rgb.blocks.0.rep.0.pointwise.conv.trunc", "trunc", 300, 1, 0.01),
    _step("rgb.blocks.0.rep.0.pointwise.conv", "linear", 400, 1, 0.02),
    _step("mul", "mul", 50, 1, 0.03),
    _step("rgb.fc2", "linear", 10, 1, 0.001),
    _step("diff", "linear", 0, 0, 0.0),
    _step("gate", "sigmoid", 5, 8, 0.004),
    _step("ycbcr.stem1.conv", "linear", 1000, 1, 0.10),
    _step("ycbcr.relu", "relu", 2000, 4, 0.20),
    _step("ycbcr.blocks.0.rep.0.pointwise.conv.trunc", "trunc", 300, 1, 0.01),
    _step("ycbcr.blocks.0.rep.0.pointwise.conv", "linear", 400, 1, 0.02),
    _step("mul_7", "mul", 50, 1, 0.03),
    _step("ycbcr.fc2", "linear", 10, 1, 0.001),
    _step("diff_1", "linear", 0, 0, 0.0),
    _step("gate_1", "sigmoid", 5, 8, 0.004),
    _step("cat", "cat", 0, 0, 0.0),
    _step("mean", "linear", 0, 0, 0.001),
]
RESULT = {
    "online_seconds": 1.5, "bytes_per_server": [7600, 7700], "rounds": 20, "dealer_bytes": 123_000_000,
    "offline_seconds": 2.5, "plaintext_seconds": 0.01, "abs_error": 3e-6, "layers": STEPS,
    "lan": {"rate": "1gbit", "rtt_ms": 0.05, "estimate": {"rtt_ms": 0.5, "online_seconds": 1.509}},
}


def test_layer_and_block_keys():
    names = [s["name"] for s in STEPS]
    layers = layer_keys(names, "layer")
    assert layers[:6] == ["stem1.conv", "stem1.conv", "blocks.0.rep.0.pointwise.conv",
                          "blocks.0.rep.0.pointwise.conv", "blocks.0.rep.0.pointwise.conv", "fc2"]
    assert layers[6:8] == ["head", "head"]  # each stream's diff and gate
    assert layers[-3:] == ["head", "head", "head"]  # after the last stream step
    assert layer_keys(names, "block")[:6] == ["stem1", "stem1", "blocks.0", "blocks.0", "blocks.0", "fc2"]
    assert layer_keys(names, "step") == names
    with pytest.raises(ValueError, match="level"):
        layer_keys(names, "stage")


def test_rows_sum_bytes_and_seconds_and_count_twin_rounds_once():
    s = summarize(RESULT)
    rows = {r.name: r for r in group(s.steps, "block")}
    assert list(rows) == ["stem1", "blocks.0", "fc2", "head"]
    assert rows["stem1"].bytes_per_server == (6000, 6004)
    assert rows["stem1"].seconds == pytest.approx(0.6)
    assert rows["stem1"].rounds == 5  # conv 1 + relu 4; the ycbcr twins share them
    assert rows["blocks.0"].rounds == 3  # trunc, linear, mul
    assert rows["blocks.0"].ops == ("trunc", "linear", "mul")
    assert rows["head"].rounds == 8  # the two gates run side by side
    assert rows["head"].steps == 6
    assert sum(r.bytes_per_server[0] for r in rows.values()) == sum(x["bytes_per_party"][0] for x in STEPS)
    wait_s, framing = residuals(s)
    assert wait_s + sum(r.seconds for r in rows.values()) == pytest.approx(1.5)
    assert framing == (7600 - 7530, 7700 - 7548)


def test_markdown_has_every_row_and_totals():
    md = markdown(summarize(RESULT, "dfdnet-s, 128 px, 1gbit"))
    assert md.startswith("# dfdnet-s, 128 px, 1gbit")
    lines = md.splitlines()
    assert "| online seconds | 1.500 |" in lines
    assert "| MB sent by server_a / server_b | 0.01 / 0.01 |" in lines
    assert "| rounds | 20 |" in lines
    assert "| offline: dealer MB | 123.00 |" in lines
    assert "| offline: seconds | 2.500 |" in lines
    assert "| plaintext seconds (same fused model) | 0.0100 |" in lines
    assert any(line.startswith("| ESTIMATE: online seconds at 0.5 ms RTT | 1.509") for line in lines)
    assert "| stem1 | linear relu | 0.600 | 0.01 | 0.01 | 5 |" in lines
    assert "| waiting for network and peer | | 0.769 | | | |" in lines
    assert "| **total** | | **1.500** | **0.01** | **0.01** | **20** |" in lines
    assert "| relu | 2 | 0.400 | 0.00 | 0.00 |" in lines  # per operation


def test_reads_bench_model_output():
    s = summarize({"seconds": 2.0, "bytes_per_party": [10, 10], "rounds": 3, "max_abs_error": 1e-5,
                   "steps": [StepFigures(0, "conv1", "linear", (6, 6), 1, 0.5).to_dict(),
                             StepFigures(1, "relu", "relu", (4, 4), 2, 0.5).to_dict()]})
    assert s.online_seconds == 2.0 and s.bytes_per_server == (10, 10) and s.abs_error == 1e-5
    assert [(r.name, r.rounds) for r in group(s.steps, "block")] == [("conv1", 3)]  # relu follows conv1
    with pytest.raises(ValueError, match="not a benchmark result"):
        summarize({"rounds": 1})
    with pytest.raises(ValueError, match="malformed step figures"):
        summarize({"seconds": 2.0, "bytes_per_party": [1, 1], "rounds": 3, "steps": [["conv1", "linear", 6, 1, 0.5]]})


def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(RESULT, tmp_path / "r", "e2e", title="test")
    assert json.loads(paths["json"].read_text()) == RESULT
    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "![where time and bytes go](e2e.png)" in paths["md"].read_text()


def test_write_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    paths = write_report(RESULT, tmp_path, "e2e")
    assert "png" not in paths and not (tmp_path / "e2e.png").exists()
    assert "Plot skipped: matplotlib is not installed" in paths["md"].read_text()


def test_compare_table_one_row_per_result():
    loop = {k: v for k, v in RESULT.items() if k != "lan"} | {"model": "dfdnet", "size": 128}
    lines = compare_table([loop, RESULT | {"model": "dfdnet", "size": 128}]).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| dfdnet | 128 | loopback | 1.50 | 0.01 | 20 | 123.00 | 2.50 | 0.010 | - |"
    assert lines[3] == "| dfdnet | 128 | 1gbit (tbf) | 1.50 | 0.01 | 20 | 123.00 | 2.50 | 0.010 | 0.050 |"


def test_breakdown_of_the_last_inference():
    # e2e: medians on top, `steps` from the last inference; the layer table adds up to that one
    data = RESULT | {"images": 2, "inferences": [{"online_seconds": 1.0}, {"online_seconds": 2.0}]}
    s = summarize(data)
    assert s.online_seconds == 1.5 and s.broken_down_seconds == 2.0
    assert residuals(s)[0] == pytest.approx(2.0 - 0.731)
    lines = markdown(s).splitlines()
    assert "| online seconds | 1.500 |" in lines
    assert "| **total** | | **2.000** | **0.01** | **0.01** | **20** |" in lines
    assert any(line.startswith("The breakdown is of the last inference (online 2.000 s)") for line in lines)
