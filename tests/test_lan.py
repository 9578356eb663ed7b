"""The emulated LAN: namespaces, shaped links, RTT, and clean-up however a run ends.

Everything here needs root and network namespaces; without them the tests are skipped with the
reason. Each test is bounded in time and leaves no namespace behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import assert_failed_record

from secdfd.common.bench import lan as lanmod
from secdfd.common.bench.lan import Lan, LanError, check_supported, cleanup_stale, list_namespaces, parse_rate

pytestmark = pytest.mark.lan


def _lan_unavailable() -> str | None:
    try:
        check_supported()
        name = f"sdfd-probe-{os.getpid()}"
        res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            return f"network namespaces are not available: {res.stderr.strip()}"
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
    except LanError as e:
        return str(e)
    return None


_WHY = _lan_unavailable()
needs_lan = pytest.mark.skipif(_WHY is not None, reason=f"needs root and network namespaces: {_WHY}")


def test_parse_rate():
    assert parse_rate("1gbit") == 10**9
    assert parse_rate("10gbit") == 10**10
    assert parse_rate("100mbit") == 10**8
    assert parse_rate("2.5gbit") == 2_500_000_000
    assert parse_rate("500kbit") == 500_000
    for bad in ("1gb", "fast", "0gbit", "-1mbit", ""):
        with pytest.raises(LanError, match="write it like 1gbit"):
            parse_rate(bad)


def test_without_root_a_clear_error_and_nothing_created(monkeypatch):
    before = list_namespaces() if os.geteuid() == 0 else []
    monkeypatch.setattr(lanmod.os, "geteuid", lambda: 1000)
    with pytest.raises(LanError, match="needs root"), Lan("1gbit"):
        pass
    monkeypatch.undo()
    if os.geteuid() == 0:
        assert list_namespaces() == before


@needs_lan
def test_addresses_rtt_and_clean_exit():
    with Lan("1gbit") as net:
        names = list(net.namespaces.values())
        assert set(names) <= set(list_namespaces())
        assert net.endpoint("server_b", 7310) == "tcp://10.213.0.3:7310"
        out = net.run("server_a", ["ip", "-4", "addr", "show", "eth0"], timeout=10).stdout
        assert "10.213.0.2/24" in out
        assert "tbf" in net.run("client", ["tc", "qdisc", "show", "dev", "eth0"], timeout=10).stdout
        rtt = net.rtt("server_a", "server_b", count=10)
        assert rtt.count == 10
        assert 0 < rtt.min_ms <= rtt.median_ms <= rtt.max_ms < 50  # no added delay: well under 50 ms
    assert not set(names) & set(list_namespaces())
    with pytest.raises(LanError, match="not set up"):
        net.run("client", ["true"], timeout=5)


_BLAST = textwrap.dedent("""
    import socket, sys, time
    if sys.argv[1] == "serve":
        with socket.create_server((sys.argv[2], 7398)) as s:
            s.settimeout(20); c, _ = s.accept()
            with c:
                n = 0
                while d := c.recv(1 << 20):
                    n += len(d)
                c.sendall(str(n).encode())
    else:
        for _ in range(200):
            try:
                c = socket.create_connection((sys.argv[2], 7398), timeout=10); break
            except OSError:
                time.sleep(0.02)
        t = time.perf_counter(); c.sendall(b"x" * int(sys.argv[3])); c.shutdown(socket.SHUT_WR)
        n = int(c.recv(64)); print(n * 8 / (time.perf_counter() - t))
""")


@needs_lan
def test_links_are_shaped_to_the_rate():
    with Lan("100mbit", roles=("server_a", "server_b")) as net:
        sink = net.spawn("server_b", [sys.executable, "-c", _BLAST, "serve", net.address("server_b")])
        res = net.run("server_a", [sys.executable, "-c", _BLAST, "send", net.address("server_b"), str(4_000_000)],
                      timeout=30)
        sink.wait(10)
        bits_per_s = float(res.stdout)
    # TCP payload over a 100 Mbit/s tbf: a little below the rate, never above it (plus the bucket)
    assert 60e6 < bits_per_s < 110e6


_HOLDER = textwrap.dedent("""
    import json, sys, time
    from secdfd.common.bench.lan import Lan
    with Lan("1gbit") as net:
        p = net.spawn("server_a", ["sleep", "300"])
        print(json.dumps({"ns": list(net.namespaces.values()), "child": p.pid}), flush=True)
        time.sleep(300)
""")


def _start_holder() -> tuple[subprocess.Popen[str], list[str], int]:
    p = subprocess.Popen([sys.executable, "-c", _HOLDER], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, "the LAN holder did not start"
    info = json.loads(line)
    assert set(info["ns"]) <= set(list_namespaces())
    return p, info["ns"], info["child"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie waiting for its (gone) parent to reap it counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("Z")


@needs_lan
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_interrupted_run_cleans_up(sig):
    p, names, child = _start_holder()
    try:
        p.send_signal(sig)
        assert p.wait(30) != 0
    finally:
        if p.poll() is None:
            p.kill()
    assert not set(names) & set(list_namespaces())
    deadline = time.monotonic() + 5
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child)


@needs_lan
def test_killed_run_is_removed_by_cleanup_stale():
    p, names, child = _start_holder()
    p.kill()  # SIGKILL: no handler runs, the namespaces stay behind
    p.wait(10)
    assert set(names) <= set(list_namespaces())
    removed = cleanup_stale()
    assert set(names) <= set(removed)
    assert not set(names) & set(list_namespaces())
    assert _gone(child)


def _e2e(args: list[str], timeout: float = 400) -> tuple[dict, int]:
    """`secdfd bench e2e ARGS --json` in a child process; on a timeout it is interrupted (so that it
    cleans up) and whatever it left is removed."""
    argv = [sys.executable, "-c", "from secdfd.common.cli.main import main; main()", "bench", "e2e", *args, "--json"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
        cleanup_stale()
        raise
    assert p.returncode == 0, err[-3000:]
    return json.loads(out), p.pid


SMALL = ["--model", "dfdnet-s", "--size", "32", "--images", "1"]


@pytest.fixture(scope="module")
def loopback():
    if _WHY is not None:
        pytest.skip(f"needs root and network namespaces: {_WHY}")
    return _e2e(SMALL)[0]


def _check_same_inference(loop: dict, lan: dict, pid: int) -> None:
    assert not [n for n in list_namespaces() if n.startswith(f"sdfd-{pid}-")]
    a, b = loop["inferences"][0], lan["inferences"][0]
    assert a["verdict"] == b["verdict"]
    assert abs(a["p_secure"] - b["p_secure"]) < 1e-3 and a["p_plain"] == b["p_plain"]
    assert lan["bytes_per_server"] == loop["bytes_per_server"] and lan["rounds"] == loop["rounds"]


@needs_lan
def test_e2e_over_lan_gives_the_loopback_verdict(loopback, tmp_path):
    lan, pid = _e2e([*SMALL, "--lan", "1gbit", "--lan-rtt-ms", "0.5", "--report", str(tmp_path)])
    _check_same_inference(loopback, lan, pid)
    net = lan["lan"]
    assert net["rate"] == "1gbit" and net["addresses"]["server_a"] == "10.213.0.2"
    assert 0 < net["rtt_ms"] < 50
    est = net["estimate"]
    assert est["rtt_ms"] == 0.5 and "ESTIMATE" in est["label"]
    assert est["online_seconds"] == pytest.approx(lan["online_seconds"] + lan["rounds"] * (0.5 - net["rtt_ms"]) / 1e3)
    assert json.loads((tmp_path / "e2e.json").read_text())["rounds"] == lan["rounds"]
    assert "| **total** |" in (tmp_path / "e2e.md").read_text()


@needs_lan
def test_e2e_over_a_slow_link(loopback):
    # A bundle half here is about 8 MB: in one frame, both halves through the dealer's 16 Mbit/s
    # link took longer than the ZMTP heartbeat timeout and the fetch never completed.
    lan, pid = _e2e([*SMALL, "--lan", "16mbit"], timeout=240)
    _check_same_inference(loopback, lan, pid)
    assert loopback["dealer_bytes"] / (16e6 / 8) > 5  # both halves share the dealer's link: over 5 s


def _tx_bytes(net: Lan, role: str) -> int:
    """Bytes `role` has sent on its LAN link."""
    out = subprocess.run(["ip", "-n", net.namespaces[role], "-s", "link", "show", "eth0"], capture_output=True,
                         text=True, timeout=10, check=True).stdout.splitlines()
    tx = next(i for i, line in enumerate(out) if line.strip().startswith("TX:"))
    return int(out[tx + 1].split()[0])


def _serving(layout, names: tuple[str, ...], timeout: float) -> None:
    from secdfd.common.service import health

    deadline = time.monotonic() + timeout
    while True:
        states = {n: (health.read(layout.state(n)) or {}) for n in names}
        if all(h.get("state") == "serving" and h.get("prepared") for h in states.values()):
            return
        assert time.monotonic() < deadline, f"not serving within {timeout:g} s: {states}"
        time.sleep(0.5)


@contextlib.contextmanager
def _lan_deployment(tmp_path):
    """Dealer and servers, each in its namespace on a 1 Gbit/s LAN, serving; yields (net, layout,
    the client's command line to run in the client's namespace)."""
    from conftest import write_tiny_model
    from PIL import Image

    from secdfd.common.bench.lan_e2e import Placement
    from secdfd.common.net.keys import make_keys
    from secdfd.common.service import deployment, local

    layout = local.Layout(tmp_path / "dep")
    write_tiny_model(tmp_path / "model.pt", 32)
    make_keys(layout.keys)
    deployment.share_model(tmp_path / "model.pt", layout.shares)
    image = tmp_path / "face.png"
    Image.new("RGB", (40, 40), (140, 100, 90)).save(image)
    with lanmod.lan("1gbit") as net:
        place = Placement.from_lan(net)
        eps = place.endpoints()
        started = local.start(layout, local.launches(layout, eps, local.Options(depth=1, timeout=15.0)), place.spawn)
        try:
            _serving(layout, ("server_a", "server_b"), 180)
            yield net, layout, [sys.executable, "-m", "secdfd.client", "detect", str(image), "--no-crop", "--json",
                                "--keys", str(layout.keys), "--server-a", eps.server_a, "--server-b", eps.server_b,
                                "--timeout", "60"]
        finally:
            local.stop(started)


def _used(layout) -> list[int]:
    from secdfd.common.service.supply import IdLedger

    return [IdLedger(layout.state(n) / f"{n}.used").last for n in ("server_a", "server_b")]


def _cut_mid_session(net, client: list[str], seconds: float) -> tuple[int, str, str, float]:
    """Run a detection in the client's namespace and take server_b's link down for `seconds` once
    its online phase is under way; returns (exit status, stdout, stderr, seconds from the cut)."""
    sent = _tx_bytes(net, "server_b")
    p = net.spawn("client", client, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while _tx_bytes(net, "server_b") - sent < 300_000:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.01)
    link = ["ip", "-n", net.namespaces["server_b"], "link", "set", "eth0"]
    subprocess.run([*link, "down"], check=True, timeout=10)
    t0 = time.monotonic()
    time.sleep(seconds)
    subprocess.run([*link, "up"], check=True, timeout=10)
    out, err = (x.decode() for x in p.communicate(timeout=120))
    return p.returncode, out, err, time.monotonic() - t0


@needs_lan
def test_link_between_the_servers_cut_and_restored_mid_session(tmp_path):
    """server_b's link goes down in the middle of a session. For 2 s, TCP rides it out and the
    detection succeeds; for 8 s (longer than the 5 s heartbeat timeout) the servers drop the session
    and the client hears one clear line within the deadlines. Nobody hangs, and once the link is back
    the next detection succeeds with a fresh bundle."""
    with _lan_deployment(tmp_path) as (net, layout, client):
        assert json.loads(net.run("client", client, timeout=120).stdout)["verdict"] in ("real", "fake")
        _serving(layout, ("server_a", "server_b"), 60)
        rc, out, err, _ = _cut_mid_session(net, client, 2.0)
        assert rc == 0 and json.loads(out)["verdict"] in ("real", "fake"), err
        used = _used(layout)[0]
        _serving(layout, ("server_a", "server_b"), 60)
        rc, out, err, waited = _cut_mid_session(net, client, 8.0)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert rc == 1 and len(lines) == 1, (out, err)
        assert lines[0].startswith("Error:") and "server_" in lines[0], err
        assert "server_" in assert_failed_record(out)["error"]
        assert waited < 40  # the round deadline is 15 s, the client's 60 s
        deadline = time.monotonic() + 120
        while (r := net.run("client", client, timeout=120, check=False)).returncode != 0:
            assert time.monotonic() < deadline, f"no service 120 s after the link came back: {r.stderr}"
            time.sleep(2)
        assert json.loads(r.stdout)["verdict"] in ("real", "fake")
        after = _used(layout)
        assert after[0] == after[1] > used
    assert not [n for n in list_namespaces() if n.startswith(f"sdfd-{os.getpid()}-")]
