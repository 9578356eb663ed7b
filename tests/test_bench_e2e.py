"""`secdfd bench e2e`: three processes on loopback, figures per inference that add up."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from secdfd.common.bench.e2e import FIGURES, run_e2e
from secdfd.common.cli.main import main
from secdfd.common.service.local import Endpoints, Launch, Launcher

pytestmark = pytest.mark.processes


def test_e2e_figures_and_wrapped_launch(tmp_path):
    seen: list[Launch] = []

    def spawn(launch, log):  # what a LAN benchmark wraps (e.g. with `ip netns exec`)
        from secdfd.common.service.local import spawn_local

        seen.append(launch)
        return spawn_local(launch, log)

    eps = Endpoints.free()
    res = run_e2e("dfdnet-s", 32, 2, work=tmp_path, launcher=Launcher(spawn, eps), batches=(1, 3))
    assert [s.name for s in seen] == ["dealer", "server_a", "server_b"]
    assert seen[1].endpoint == eps.server_a and "--peer" in seen[2].argv and eps.peer in seen[2].argv
    assert all(s.env["SECDFD_THREADS"] == "1" for s in seen)
    assert len(res["inferences"]) == 2 and all(k in res for k in FIGURES)
    for r in res["inferences"]:
        assert r["abs_error"] <= 1e-3
        assert r["bytes_per_server"][0] == r["bytes_per_server"][1] > 1_000_000
        assert 100 < r["rounds"] < 1500
        assert 0 < r["online_seconds"] <= r["client_seconds"]
        assert r["offline_seconds"] >= r["dealer_seconds"] > 0 and r["dealer_bytes"] > 0
        assert r["plaintext_seconds"] > 0
    steps = res["steps"]
    assert sum(s["bytes_per_party"][0] for s in steps) == res["inferences"][-1]["bytes_per_server"][0]
    assert max(s["rounds"] for s in steps) <= res["rounds"]
    assert {"linear", "relu", "sigmoid"} <= {s["op"] for s in steps}
    assert not list(tmp_path.iterdir())  # the scratch deployment is removed
    assert "--max-batch" in seen[0].argv and seen[0].argv[seen[0].argv.index("--max-batch") + 1] == "3"
    one, three = res["batches"]
    assert (one["batch"], three["batch"], three["sessions"]) == (1, 3, 2)
    for b in (one, three):
        assert b["abs_error"] <= 1e-3 and b["verdicts_equal"]
        assert b["online_seconds_per_crop"] == pytest.approx(b["online_seconds"] / b["batch"])
        assert b["bytes_per_crop"][0] == pytest.approx(b["bytes_per_server"][0] / b["batch"])
    # the rounds of one crop, shared by three; no more bytes per crop than alone
    assert three["rounds"] == one["rounds"] == res["rounds"]
    assert three["bytes_per_crop"][0] <= one["bytes_per_crop"][0] == res["bytes_per_server"][0]


def test_e2e_command_refuses_nonsense():
    r = CliRunner().invoke(main, ["bench", "e2e", "--images", "0"])
    assert r.exit_code == 2 and "--images" in r.output
    r = CliRunner().invoke(main, ["bench", "e2e", "--model", "resnet"])
    assert r.exit_code == 2 and "dfdnet-s" in r.output
    for bad, why in (("0", "batch sizes are 1 to 64, not 0"), ("1,x", "comma-separated")):
        r = CliRunner().invoke(main, ["bench", "e2e", "--batch", bad])
        assert r.exit_code == 2 and why in r.output


def _parties_under(root: Path, bench: int) -> list[int]:
    """Pids of processes other than `bench` whose command line names a path under `root`."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != bench:
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
                state = (d / "stat").read_text().split(") ", 1)[1][0]
            except (OSError, IndexError):
                continue
            if state != "Z" and any(str(root).encode() in a for a in argv):
                pids.append(int(d.name))
    return pids


@pytest.mark.parametrize("bench, processes", [(["e2e", "--images", "50"], 3),
                                               (["load", "--clients", "1", "--requests", "50"], 4)])
def test_a_benchmark_ended_by_sigterm_stops_its_parties(tmp_path, bench, processes):
    # `timeout` and service managers end a process with SIGTERM, whose default action skips every
    # `finally`; the parties run in sessions of their own and would outlive the benchmark.
    # `processes`: the three parties, and for `bench load` its client, all named by the scratch folder
    argv = [sys.executable, "-c", "from secdfd.common.cli.main import main; main()", "bench", *bench,
            "--model", "dfdnet-s", "--size", "32", "--work", str(tmp_path)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while len(_parties_under(tmp_path, p.pid)) < processes and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_parties_under(tmp_path, p.pid)) >= processes, "the parties (and client) did not start"
        time.sleep(2)  # into the run
        p.send_signal(signal.SIGTERM)
        assert p.wait(60) == 128 + signal.SIGTERM
    finally:
        if p.poll() is None:
            p.kill()
        left = _parties_under(tmp_path, p.pid)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == [], "parties outlived the benchmark"
    assert list(tmp_path.iterdir()) == []  # the scratch folder is gone too
