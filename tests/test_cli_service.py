"""`secdfd keys`, `share`, `up`, `status`, `down` through click's CliRunner."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_tiny_model
from PIL import Image

from secdfd.client.main import main as client_main
from secdfd.common import roster
from secdfd.common.cli.main import main
from secdfd.common.net.keys import PARTIES, load_party
from secdfd.common.service import deployment
from secdfd.common.service.local import free_ports

pytestmark = pytest.mark.processes


def test_keys_command(tmp_path):
    out = tmp_path / "keys"
    r = CliRunner().invoke(main, ["keys", "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert sorted(info["folders"]) == sorted(PARTIES)
    for p in PARTIES:
        assert stat.S_IMODE((out / p / f"{p}.key_secret").stat().st_mode) == 0o600
        assert load_party(out, p).name == p
    again = CliRunner().invoke(main, ["keys", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output and "Traceback" not in again.output
    env = CliRunner().invoke(main, ["keys", "--force"], env={"SECDFD_KEYS_OUT": str(tmp_path / "env")})
    assert env.exit_code == 0 and (tmp_path / "env" / "client" / "client.key_secret").is_file()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A deployable dfdnet-s at 32x32 with freshly initialised weights (tests only)."""
    return write_tiny_model(tmp_path_factory.mktemp("model") / "dfdnet-s-32.pt")


def test_share_command(tmp_path, model_file):
    out = tmp_path / "shares"
    r = CliRunner().invoke(main, ["share", str(model_file), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    files = json.loads(r.output)
    assert sorted(files) == ["info", "server_a", "server_b"]
    info = deployment.read_info(out / "model.json")
    assert info == deployment.ModelInfo("dfdnet-s", 32, 16, 32, info.split) and len(info.split) == 32
    for server in roster.SERVERS:
        assert stat.S_IMODE((out / f"{server}.weights").stat().st_mode) == 0o600
        got = deployment.load_weight_share(out / f"{server}.weights", server)
        assert got.info == info and len(got.weights) > 10
    again = CliRunner().invoke(main, ["share", str(model_file), "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and deployment.read_info(tmp_path / "again" / "model.json").split != info.split
    missing = CliRunner().invoke(main, ["share", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert missing.exit_code == 1 and "no such model file" in missing.output and "Traceback" not in missing.output


def test_up_detect_status_down(tmp_path, model_file):
    """`secdfd up` on free ports, a detection through the three processes, `status`, `down`."""
    state = tmp_path / "state"
    ports = free_ports(4)
    eps = [f"tcp://127.0.0.1:{p}" for p in ports]
    args = ["--state", str(state)]
    up = CliRunner().invoke(main, ["up", *args, "--model", str(model_file), "--dealer", eps[0], "--server-a", eps[1],
                                   "--server-b", eps[2], "--peer", eps[3], "--wait", "120"])
    try:
        assert up.exit_code == 0, up.output
        assert f"secdfd-client detect --keys {state / 'keys'} --server-a {eps[1]} --server-b {eps[2]}" in up.output
        again = CliRunner().invoke(main, ["up", *args])
        assert again.exit_code == 0 and "already up" in again.output
        status = CliRunner().invoke(main, ["status", *args, "--json"])
        assert status.exit_code == 0, status.output
        st = json.loads(status.output)
        rows = st["processes"]
        assert [r["name"] for r in rows] == ["dealer", "server_a", "server_b"] and all(r["running"] for r in rows)
        assert st["model"]["arch"] == "dfdnet-s" and st["model"]["size"] == 32 and len(st["model"]["split"]) == 32
        assert rows[1]["state"] == rows[2]["state"] == "serving" and rows[1]["requests_served"] == 0
        image = tmp_path / "face.png"
        Image.new("RGB", (40, 30), (120, 80, 60)).save(image)
        det = CliRunner().invoke(client_main, ["detect", str(image), "--json", "--keys", str(state / "keys"),
                                               "--server-a", eps[1], "--server-b", eps[2], "--no-crop"])
        assert det.exit_code == 0, det.output
        res = json.loads(det.output)
        assert res["verdict"] in ("real", "fake") and res["rounds"] > 100
        assert res["bytes_per_server"][0] == res["bytes_per_server"][1] > 0
        assert 0 < res["online_seconds"] <= res["seconds"] and res["offline_seconds"] > 0 and res["dealer_bytes"] > 0
        time.sleep(1.2)  # health files are published at most once a second
        rows = json.loads(CliRunner().invoke(main, ["status", *args, "--json"]).output)["processes"]
        assert rows[1]["requests_served"] == rows[2]["requests_served"] == 1
    finally:
        down = CliRunner().invoke(main, ["down", *args])
    assert down.exit_code == 0 and "stopped dealer, server_a, server_b" in down.output
    after = CliRunner().invoke(main, ["status", *args])
    assert after.exit_code == 1 and "nothing started" in after.output


def test_up_again_starts_what_stopped_and_a_new_model_is_shared_anew(tmp_path, model_file):
    """Like compose: `up` again starts only the stopped party (status said which and why); `up --model`
    with another model makes a new split and restarts all; `up --embedded` goes back."""
    state = tmp_path / "state"
    eps = [f"tcp://127.0.0.1:{p}" for p in free_ports(4)]
    args = ["--state", str(state), "--dealer", eps[0], "--server-a", eps[1], "--server-b", eps[2], "--peer", eps[3]]
    up = CliRunner().invoke(main, ["up", *args, "--model", str(model_file), "--wait", "120"])
    try:
        assert up.exit_code == 0, up.output
        assert f"model    {model_file.resolve()}" in up.output and "secdfd up --embedded" in up.output
        split = deployment.read_info(state / "shares" / "model.json").split
        procs = json.loads((state / "processes.json").read_text())
        os.kill(procs["server_b"]["pid"], signal.SIGKILL)
        time.sleep(1)
        st = CliRunner().invoke(main, ["status", "--state", str(state)])
        assert st.exit_code == 1 and "server_b  stopped" in st.output
        again = CliRunner().invoke(main, ["up", *args, "--wait", "120"])
        assert again.exit_code == 0, again.output
        assert "starting server_b again" in again.output and "stopping" not in again.output
        assert json.loads((state / "processes.json").read_text())["dealer"]["pid"] == procs["dealer"]["pid"]
        assert deployment.read_info(state / "shares" / "model.json").split == split  # nothing re-shared
        st = json.loads(CliRunner().invoke(main, ["status", "--state", str(state), "--json"]).output)
        assert st["up"] and st["model"]["file"] == str(model_file.resolve())
        same = CliRunner().invoke(main, ["up", *args, "--model", str(model_file)])
        assert same.exit_code == 0 and "already up" in same.output  # the model served: nothing to do
        back = CliRunner().invoke(main, ["up", *args, "--embedded", "--wait", "300"])
        assert back.exit_code == 0, back.output
        assert "stopping dealer, server_a, server_b: a new model is to be served" in back.output
        info = deployment.read_info(state / "shares" / "model.json")
        assert info.split != split and info.size == 128
        st = json.loads(CliRunner().invoke(main, ["status", "--state", str(state), "--json"]).output)
        assert st["model"]["file"] == "embedded" and st["up"]
    finally:
        CliRunner().invoke(main, ["down", "--state", str(state)])


def test_up_refuses_before_making_anything(tmp_path):
    """A port already taken, or CUDA asked for where there is none: a clear error, nothing made."""
    state = tmp_path / "state"
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        r = CliRunner().invoke(main, ["up", "--state", str(state), "--dealer", f"tcp://127.0.0.1:{port}"])
        assert r.exit_code == 1 and f"port in use: dealer (tcp://127.0.0.1:{port})" in r.output
        assert not (state / "processes.json").exists()
        assert not (state / "keys").exists() and not (state / "shares").exists()  # refused before making them
    finally:
        holder.close()
    if not torch.cuda.is_available():
        fresh = tmp_path / "fresh"
        r = CliRunner().invoke(main, ["up", "--state", str(fresh), "--device", "cuda"])
        assert r.exit_code == 1 and "CUDA is not available" in r.output
        assert not fresh.exists()  # no keys, no shares were made first
