"""A user's own model: `secdfd export --factory`, its plan in the share files and model.json, the
dealer and both parties running it without the user's file, the output conventions and refusals."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from secdfd.common.cli.main import main
from secdfd.common.engine.channel import pair, run_pair
from secdfd.common.errors import DataError, ModelError
from secdfd.common.ml.data import load_image
from secdfd.common.service import custom, deployment

SIZE = 24
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "face.png"

USER_MODEL = textwrap.dedent('''
    import torch
    import torch.nn.functional as F
    from torch import nn


    class Gate(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc = nn.Linear(c, c)

        def forward(self, x):
            b, c, _, _ = x.size()
            return x * torch.sigmoid(self.fc(x.mean((2, 3)))).view(b, c, 1, 1)


    class Net(nn.Module):
        def __init__(self, outputs=2, scale=1.0):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.gate = Gate(8)
            self.head = nn.Linear(8, outputs)
            self.scale = scale

        def forward(self, x):
            x = F.silu(self.bn(self.conv(x)) * self.scale)
            x = self.gate(x)
            return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


    def two_logits():
        return Net(2)


    def one_logit():
        return Net(1)


    def probability():
        return nn.Sequential(Net(1), nn.Sigmoid())


    def huge():
        return Net(2, scale=1e6)
''')


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    """The user's model file and weights, outside the repository."""
    d = tmp_path_factory.mktemp("user")
    (d / "detector.py").write_text(USER_MODEL)
    sys.path.insert(0, str(d))
    try:
        import detector  # the test plays the model owner here
    finally:
        sys.path.remove(str(d))
    torch.manual_seed(0)  # test weights only
    for name in ("two_logits", "one_logit", "probability"):
        m = getattr(detector, name)()
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 2.0)
        torch.save({"epoch": 7, "state_dict": m.state_dict()}, d / f"{name}.ckpt")
    sys.modules.pop("detector", None)
    return d


def plain_p(user: Path, name: str, x: torch.Tensor, outputs: str, fake: int = 1) -> float:
    m = custom.load_user_model(f"{user / 'detector.py'}:{name}", user / f"{name}.ckpt")
    with torch.no_grad():
        y = m(x).reshape(-1)
    if outputs == "logits":
        return float(torch.sigmoid(y[fake] - y[1 - fake]))
    return float(torch.sigmoid(y[0])) if outputs == "logit" else float(y[0])


def secure_p(shares: Path, state: Path, x: torch.Tensor) -> tuple[float, int]:
    """One inference as dealer and servers run it, from the files of `secdfd share` alone."""
    info = deployment.read_info(shares / "model.json")
    dealer = deployment.make_dealer(info, state)
    p0, p1 = deployment.provision_bytes(dealer)
    a = deployment.load_weight_share(shares / "server_a.weights", "server_a")
    b = deployment.load_weight_share(shares / "server_b.weights", "server_b")
    assert a.info.plan == b.info.plan == info.plan and a.digest == deployment.architecture_digest(info, info.plan)
    c0, c1 = pair()
    party0 = deployment.make_party(0, a.info, a.weights, p0, c0)
    party1 = deployment.make_party(1, b.info, b.weights, p1, c1)
    run_pair(party0.setup, party1.setup)
    b0, b1 = dealer.bundle("1")
    r0, r1 = run_pair(lambda: party0.prepare(b0), lambda: party1.prepare(b1))
    x0, x1 = deployment.share_image(x, info)
    (y0, rep), (y1, _) = run_pair(lambda: party0.run(x0, r0), lambda: party1.run(x1, r1))
    return deployment.fake_probability(y0, y1, info), rep.rounds


@pytest.mark.parametrize(("name", "outputs", "fake"), [("two_logits", "logits", 1), ("two_logits", "logits", 0),
                                                      ("one_logit", "logit", 1), ("probability", "probability", 1)])
def test_export_share_and_run_without_the_users_file(tmp_path, user, name, outputs, fake):
    out = tmp_path / "model.pt"
    r = CliRunner().invoke(main, ["export", "--factory", f"{user / 'detector.py'}:{name}", "--weights",
                                  str(user / f"{name}.ckpt"), "--size", str(SIZE), "--outputs", outputs,
                                  "--fake-index", str(fake), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    done = json.loads(r.output)
    assert done["arch"] == "detector" and done["size"] == SIZE and done["calibration"]["images"] >= 19
    assert done["calibration"]["max_compared"] < done["calibration"]["limit"] == 65536
    x = load_image(EXAMPLE, SIZE)
    want = plain_p(user, name, x, outputs, fake)
    ref, arch, size = custom.load_reference(out)  # the plan in float64, no user code
    assert (arch, size) == ("detector", SIZE) and abs(float(ref(x).reshape(-1)[0]) - want) < 1e-5
    shares = tmp_path / "shares"
    deployment.share_model(out, shares)
    info = json.loads((shares / "model.json").read_text())
    assert info["arch"] == "detector" and info["plan"]["format"] == "secdfd-plan"
    p, rounds = secure_p(shares, tmp_path / "dealer", x)
    assert abs(p - want) < 1e-3 and rounds > 10


def test_the_digest_covers_the_plan(tmp_path, user):
    out = tmp_path / "model.pt"
    custom.export_model(custom.UserModel(f"{user / 'detector.py'}:two_logits", user / "two_logits.ckpt", SIZE,
                                         "logits"), out)
    shares = tmp_path / "shares"
    deployment.share_model(out, shares)
    info = deployment.read_info(shares / "model.json")
    data = json.loads((shares / "model.json").read_text())
    data["plan"]["steps"][-2]["name"] = "renamed"  # a plan the servers were not given
    (shares / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="does not match the digest"):
        deployment.read_info(shares / "model.json")
    data["plan"]["steps"][-2]["op"] = "exec"
    (shares / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match="unknown op"):
        deployment.read_info(shares / "model.json")
    assert info.plan is not None and deployment.plan_for(info) is info.plan


def test_a_model_out_of_the_comparison_range_is_refused(tmp_path, user):
    r = CliRunner().invoke(main, ["export", "--factory", f"{user / 'detector.py'}:huge", "--size", str(SIZE),
                                  "--outputs", "logits", "--out", str(tmp_path / "m.pt")])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "compares values up to" in r.output and "exact below 65536" in r.output and "Export refused" in r.output
    assert not (tmp_path / "m.pt").exists()


def test_export_mistakes_are_messages(tmp_path, user):
    run = CliRunner().invoke
    f = f"{user / 'detector.py'}:two_logits"
    r = run(main, ["export", "--factory", f, "--size", str(SIZE), "--outputs", "logit", "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "expects 1 number(s) per image, the model gives [1, 2]" in r.output
    r = run(main, ["export", "--factory", f, "--weights", str(user / "one_logit.ckpt"), "--size", str(SIZE),
                   "--outputs", "logits", "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "does not fit" in r.output
    r = run(main, ["export", "--factory", f, "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and "--size and --outputs" in r.output
    r = run(main, ["export", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "--factory" in r.output
    with pytest.raises(DataError, match="not a folder of calibration images"):
        custom.calibration_images(SIZE, tmp_path / "nowhere")
