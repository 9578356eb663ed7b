"""A user's model from a file outside the repository, from `secdfd export` to a verdict through the
dealer, server_a and server_b as separate OS processes, and `secdfd bench e2e --model FILE` on it.
Only the model owner (this process) ever imports the user's file: it records every import."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from secdfd.client.main import main as client_main
from secdfd.common import roster
from secdfd.common.bench.e2e import run_e2e
from secdfd.common.cli.main import main
from secdfd.common.ml.data import load_image
from secdfd.common.net.keys import make_keys
from secdfd.common.service import custom, local

pytestmark = pytest.mark.processes

SIZE = 32
FACE = Path(__file__).resolve().parent.parent / "examples" / "face.png"

USER_FILE = textwrap.dedent('''
    """A small detector in the idioms of a MobileNetV3 codebase, ending in two logits (real, fake)."""
    import os
    import pathlib

    import torch
    import torch.nn.functional as F
    from torch import nn

    with open(pathlib.Path(__file__).with_name("imports.log"), "a") as log:
        log.write(f"{os.getpid()}\\n")  # who ever ran this file


    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

        def forward(self, x):
            s = F.adaptive_avg_pool2d(x, 1)
            return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))), inplace=True)


    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.GELU())
            self.se = SE(8)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 2))

        def forward(self, x):
            y = self.se(self.dw(self.stem(x)))
            y += self.stem(x)
            b, c, _, _ = y.size()
            return self.classifier(y.mean((2, 3)).view(b, c))


    def build():
        return Detector()
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, float]:
    """(the user's folder, the deployable file, the plaintext fake probability of the example face)."""
    user = tmp_path_factory.mktemp("user")
    (user / "detector.py").write_text(USER_FILE)
    torch.manual_seed(0)  # test weights only
    model = custom.load_user_model(f"{user / 'detector.py'}:build", None)
    for bn in model.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), user / "weights.pt")
    with torch.no_grad():
        logits = model(load_image(FACE, SIZE))[0]
    p_plain = float(torch.sigmoid(logits[1] - logits[0]))
    out = user / "detector.secdfd.pt"
    r = CliRunner().invoke(main, ["export", "--factory", f"{user / 'detector.py'}:build", "--weights",
                                  str(user / "weights.pt"), "--size", str(SIZE), "--outputs", "logits", "--out",
                                  str(out)])
    assert r.exit_code == 0, r.output
    assert "calibration on the default set" in r.output and "margin" in r.output
    return user, out, p_plain


def _imports(user: Path) -> set[int]:
    return {int(line) for line in (user / "imports.log").read_text().split()}


def test_user_model_to_a_verdict_through_three_processes(tmp_path, exported):
    user, model_file, p_plain = exported
    layout = local.Layout(tmp_path / "deploy")
    make_keys(layout.keys)
    r = CliRunner().invoke(main, ["share", str(model_file), "--out", str(layout.shares), "--json"])
    assert r.exit_code == 0, r.output
    endpoints = local.Endpoints.free()
    started = local.start(layout, local.launches(layout, endpoints, local.Options(threads=1, depth=1)))
    try:
        local.wait_ready(started, layout.keys, 120.0)
        det = CliRunner().invoke(client_main, ["detect", str(FACE), "--no-crop", "--json", "--keys", str(layout.keys),
                                               "--server-a", endpoints.server_a, "--server-b", endpoints.server_b])
        assert det.exit_code == 0, det.output
        res = json.loads(det.output)
        status = CliRunner().invoke(main, ["status", "--state", str(layout.root), "--json"])
    finally:
        local.stop(started)
    assert abs(res["p_fake"] - p_plain) < 1e-3 and res["verdict"] == roster.verdict(p_plain)
    assert res["bytes_per_server"][0] == res["bytes_per_server"][1] > 0 and res["rounds"] > 10
    assert json.loads(status.output)["model"]["arch"] == "detector"
    for s in started:
        assert "Traceback" not in s.log.read_text(), s.log.read_text()[-2000:]
    assert _imports(user) == {os.getpid()}  # the dealer and both servers never ran the user's file


def test_bench_e2e_takes_the_file(exported):
    user, model_file, _ = exported
    res = run_e2e(str(model_file), None, images=1, options=local.Options(threads=1, depth=1), startup=120.0)
    assert res["model"] == str(model_file) and res["size"] == SIZE and res["abs_error"] < 1e-3
    assert res["rounds"] > 10 and res["bytes_per_server"][0] > 0
    assert _imports(user) == {os.getpid()}
