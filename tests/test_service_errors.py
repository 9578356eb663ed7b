"""Errors users meet, against dealer and servers running as separate processes.

Each error must reach the user as one clear line with a non-zero exit, and the servers must go on
serving: every test ends with a good detection. A small model (dfdnet-s at 32x32) keeps this light.
"""

from __future__ import annotations

import signal
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
import zmq
from click.testing import CliRunner
from conftest import start_tiny_deployment, write_tiny_model
from PIL import Image

from secdfd.client.main import main as client_main
from secdfd.common.errors import PeerLost, PeerTimeout, ProtocolError
from secdfd.common.net.keys import load_party, make_keys
from secdfd.common.net.transport import Node, Requester, Responder
from secdfd.common.net.wire import unpack
from secdfd.common.service import deployment, local
from secdfd.common.service.client import Client, ClientConfig
from secdfd.common.service.supply import IdLedger

pytestmark = pytest.mark.processes

SIZE = 32


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    """Dealer, server_a, server_b as processes on free loopback ports; yields (layout, endpoints, started)."""
    layout, eps, started = start_tiny_deployment(tmp_path_factory.mktemp("svc"), local.Options(timeout=10.0), SIZE)
    try:
        yield layout, eps, started
    finally:
        local.stop(started)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.new("RGB", (48, 40), (180, 120, 90)).save(path)
    return path


def _cli(deploy, *args: str, keys: Path | None = None, timeout: float = 20.0):
    layout, eps, _ = deploy
    return CliRunner().invoke(client_main, ["detect", "--no-crop", *args, "--keys", str(keys or layout.keys),
                                            "--server-a", eps.server_a, "--server-b", eps.server_b,
                                            "--timeout", f"{timeout:g}"])


def _one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _serves(deploy, image) -> None:
    r = _cli(deploy, str(image), "--json")
    assert r.exit_code == 0 and '"verdict"' in r.output, r.output


def test_not_an_image_and_bomb(deploy, image, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_text("not an image")
    line = _one_line_error(_cli(deploy, str(junk)))
    assert "notes.png: not a readable image" in line
    bomb = tmp_path / "bomb.png"
    _png_claiming(bomb, 9000, 9000)
    line = _one_line_error(_cli(deploy, str(bomb)))
    assert "bomb.png: 9000x9000 pixels exceeds the limit" in line
    _png_claiming(bomb, 100_000, 100_000)  # beyond Pillow's own bomb limit
    assert "bomb.png: image exceeds the limit of 67,108,864 pixels" in _one_line_error(_cli(deploy, str(bomb)))
    missing = _one_line_error(_cli(deploy, str(tmp_path / "nope.jpg")))
    assert "no such file" in missing
    # one bad file among good ones: the good ones are still detected
    r = _cli(deploy, str(image), str(junk), str(image), "--json")
    assert r.exit_code == 1 and r.output.count('"verdict"') == 2
    _serves(deploy, image)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A small valid PNG whose header claims width x height (what a decompression bomb looks like)."""
    Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def test_server_not_reachable_names_it(deploy, image):
    layout, eps, _ = deploy
    dead = f"tcp://127.0.0.1:{local.free_ports(1)[0]}"
    t0 = time.monotonic()
    r = CliRunner().invoke(client_main, ["detect", str(image), "--keys", str(layout.keys), "--server-a", eps.server_a,
                                         "--server-b", dead, "--timeout", "2", "--no-crop"])
    line = _one_line_error(r)
    assert f"could not reach server_b at {dead} within 2 s" in line and time.monotonic() - t0 < 10


def test_server_not_answering_hits_the_deadline(deploy, image):
    """A server_b that accepts connections and never answers: the deadline names it."""
    layout, eps, _ = deploy
    with Node(load_party(layout.keys, "server_b")) as node:
        mute = Responder(node, "tcp://127.0.0.1:*", "clients")
        t0 = time.monotonic()
        r = CliRunner().invoke(client_main, ["detect", str(image), "--keys", str(layout.keys), "--server-a",
                                             eps.server_a, "--server-b", mute.endpoint, "--timeout", "3", "--no-crop"])
        line = _one_line_error(r)
        assert f"no answer from server_b at {mute.endpoint} within 3 s" in line
        assert time.monotonic() - t0 < 15
    _serves(deploy, image)


def test_unknown_and_mismatched_keys_are_refused(deploy, image, tmp_path):
    other = tmp_path / "other"
    make_keys(other)  # a client nobody admitted, and servers' keys that are not the real ones
    line = _one_line_error(_cli(deploy, str(image), keys=other, timeout=5))
    assert "server_a" in line and ("refused this party's key" in line or "CURVE handshake" in line)
    # the real client key, but a wrong public key for server_a: the handshake fails
    layout, _, _ = deploy
    mixed = tmp_path / "mixed"
    make_keys(mixed)
    for f in (layout.keys / "client").rglob("*"):
        if f.is_file():
            dest = mixed / "client" / f.relative_to(layout.keys / "client")
            dest.write_bytes(f.read_bytes())
    (mixed / "client" / "public" / "server_a.key").write_bytes((mixed / "public" / "server_a.key").read_bytes())
    line = _one_line_error(_cli(deploy, str(image), keys=mixed, timeout=5))
    assert "server_a" in line and ("CURVE handshake" in line or "could not reach" in line)
    _serves(deploy, image)


def test_malformed_and_unexpected_requests(deploy, image):
    layout, eps, _ = deploy
    with Node(load_party(layout.keys, "client")) as node:
        req = Requester(node, eps.server_a, "server_a", timeout=10)
        with pytest.raises(ProtocolError, match="server_a does not serve 'bundle_request' requests"):
            req.request("bundle_request")
        with pytest.raises(ProtocolError, match="resize the image to 32"):
            req.request("detect", tensors=[torch.zeros(1, 3, 8, 8, dtype=torch.int64)])
        # raw garbage on an authenticated connection: answered with an error, never a crash
        sock, _ = node.connect(eps.server_b, "server_b", zmq.DEALER)
        sock.send_multipart([b"\xc1 not msgpack", b"x"])
        assert sock.poll(10_000)
        reply = unpack(sock.recv_multipart(), "server_b")
        assert reply.kind == "error" and "malformed message from client" in reply.meta["message"]
        envelope = {"v": 1, "sid": "s", "seq": 0, "step": "x", "kind": "nope", "dtypes": [], "shapes": [], "meta": {}}
        sock.send_multipart([msgpack.packb(envelope)])
        assert sock.poll(10_000)
        assert "unknown message kind" in unpack(sock.recv_multipart(), "server_b").meta["message"]
    _serves(deploy, image)


def test_malformed_reply_from_a_server(deploy, image):
    """A 'server_b' that answers with garbage: the client reports a malformed message from server_b."""
    layout, eps, _ = deploy
    with Node(load_party(layout.keys, "server_b")) as node:
        liar, endpoint = node.listen("tcp://127.0.0.1:*", "clients", zmq.ROUTER)
        stop = threading.Event()

        def reply_garbage() -> None:
            while not stop.is_set():
                if liar.poll(100):
                    frames = liar.recv_multipart()
                    liar.send_multipart([frames[0], b"\x92\x01", b"junk"])

        t = threading.Thread(target=reply_garbage, daemon=True)
        t.start()
        try:
            r = CliRunner().invoke(client_main, ["detect", str(image), "--keys", str(layout.keys), "--server-a",
                                                 eps.server_a, "--server-b", endpoint, "--timeout", "5", "--no-crop"])
            line = _one_line_error(r)
            assert "malformed message from server_b" in line
        finally:
            stop.set()
            t.join(2)


def _kill_during_a_request(deploy, image, name: str, client: Client) -> dict[str, object]:
    """SIGKILL server `name` in the online phase of a detection by `client`; returns the client's outcome."""
    layout, eps, started = deploy
    # both servers idle with a prepared bundle: the session goes online at once and runs ~1000 rounds
    local.wait_ready(started, layout.keys, 60, prepared=True)
    outcome: dict[str, object] = {}

    def detect() -> None:
        t0 = time.monotonic()
        try:
            outcome["result"] = client.detect(image)
        except (PeerLost, PeerTimeout) as e:
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - t0

    ledger_b = layout.state("server_b") / "server_b.used"
    before = IdLedger(ledger_b).last
    t = threading.Thread(target=detect)
    t.start()
    # inside the online phase (about a thousand rounds): server_b records the bundle as used just
    # before it answers `ready` and goes online. A fixed delay is not enough on a busy machine,
    # where the request may still be on its way when it ends.
    deadline = time.monotonic() + 60
    while IdLedger(ledger_b).last == before:
        assert time.monotonic() < deadline, "the session did not start within 60 s"
        time.sleep(0.005)
    victim = next(s for s in started if s.launch.name == name)
    victim.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    victim.process.wait(10)  # type: ignore[union-attr]
    t.join(30)
    return outcome


def _restart(deploy, name: str) -> None:
    """Start server `name` again (same command line, same state) and wait until both servers serve."""
    layout, _, started = deploy
    old = next(s for s in started if s.launch.name == name)
    new = local.start(layout, [old.launch])[0]
    started[started.index(old)] = new
    local.write_processes(layout, started)
    try:
        local.wait_ready(started, layout.keys, 120)
    except local.DeploymentError:
        logs = "\n".join(f"{s.launch.name} log:\n{Path(s.log).read_text()[-3000:]}" for s in started)
        pytest.fail(f"not set up again after {name} restarted;\n{logs}")


def _wait_for_log(deploy, name: str, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in _log(deploy, name):
        assert time.monotonic() < deadline, f"{name} did not log {text!r} within {timeout:g} s:\n{_log(deploy, name)}"
        time.sleep(0.1)


def _log(deploy, name: str) -> str:
    return Path(next(s for s in deploy[2] if s.launch.name == name).log).read_text()


def _serves_twice_with_fresh_ids(deploy, image, used_before: int) -> None:
    layout = deploy[0]
    ids = []
    for _ in range(2):
        r = _cli(deploy, str(image), "--json", timeout=60)
        assert r.exit_code == 0, r.output
        ids.append(IdLedger(layout.state("server_a") / "server_a.used").last)
        assert IdLedger(layout.state("server_b") / "server_b.used").last == ids[-1]  # the same bundle on both
    assert used_before < ids[0] < ids[1]


def test_server_killed_during_a_request_then_restarted(deploy, image):
    """SIGKILL server_b mid-inference: a clear error at once (server_a sees the link go); restarted
    at once, server_b asks for set-up, the pair serves again and no bundle id is ever used twice."""
    layout = deploy[0]
    _serves(deploy, image)
    used_before = IdLedger(layout.state("server_a") / "server_a.used").last
    client = Client(ClientConfig(layout.keys, deploy[1].server_a, deploy[1].server_b, timeout=30.0))
    try:
        outcome = _kill_during_a_request(deploy, image, "server_b", client)
        assert "error" in outcome and "server_b" in str(outcome["error"]), outcome
        # well before server_a's 10 s round deadline and the client's 30 s one (slack for a loaded machine)
        assert float(outcome["seconds"]) < 8, outcome  # type: ignore[arg-type]
        # the client may hear first (its own link to server_b dropped); server_a logs the loss on its own
        _wait_for_log(deploy, "server_a", "lost the connection to server_b", 15)
        # while server_b is down: server_a refuses after a short grace, without using a bundle, and
        # the client hears it although it cannot reach server_b
        used = IdLedger(layout.state("server_a") / "server_a.used").last
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="server_a reported PeerLost.*server_b is not connected to server_a"):
            client.detect(image)
        assert time.monotonic() - t0 < 15  # the grace is 5 s, the client's deadline 30 s
        assert IdLedger(layout.state("server_a") / "server_a.used").last == used
    finally:
        client.close()
    _restart(deploy, "server_b")
    assert "server_b asks for set-up" in _log(deploy, "server_a")
    _serves_twice_with_fresh_ids(deploy, image, used_before)


def test_server_a_killed_during_a_request_then_restarted(deploy, image):
    """The same for server_a: server_b gives the session up at once, joins the set-up that the
    restarted server_a starts, and the pair serves again with fresh bundle ids."""
    layout = deploy[0]
    _serves(deploy, image)
    used_before = IdLedger(layout.state("server_b") / "server_b.used").last
    client = Client(ClientConfig(layout.keys, deploy[1].server_a, deploy[1].server_b, timeout=20.0))
    try:
        outcome = _kill_during_a_request(deploy, image, "server_a", client)
    finally:
        client.close()
    assert "error" in outcome and "server_a" in str(outcome["error"]), outcome
    assert float(outcome["seconds"]) < 8, outcome  # type: ignore[arg-type]
    _restart(deploy, "server_a")
    log_b = _log(deploy, "server_b")
    assert "lost the connection to server_a" in log_b and "server_a runs set-up (it started again)" in log_b
    _serves_twice_with_fresh_ids(deploy, image, used_before)


def test_a_server_with_a_share_of_another_split_is_refused(deploy, image, tmp_path):
    """server_b started again with a share of another `secdfd share` run: it stops at start-up with an
    error naming both splits (before it reaches server_a), and the deployment serves on."""
    layout, eps, started = deploy
    write_tiny_model(tmp_path / "model.pt", SIZE)
    deployment.share_model(tmp_path / "model.pt", tmp_path / "other")
    theirs = deployment.read_info(tmp_path / "other" / "model.json").split
    ours = deployment.read_info(layout.model_info).split
    server_b = next(s for s in started if s.launch.name == "server_b")
    argv = list(server_b.launch.argv)
    argv[argv.index("--weights") + 1] = str(tmp_path / "other" / "server_b.weights")
    argv[argv.index("--listen") + 1] = f"tcp://127.0.0.1:{local.free_ports(1)[0]}"
    argv[argv.index("--state") + 1] = str(tmp_path / "state")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("Error:") and ours in last and theirs in last and "secdfd share" in last
    _serves(deploy, image)
