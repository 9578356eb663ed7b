"""Faults of parties and links, against real processes: each gives the client a clear error within a
deadline, the surviving parties serve on, service comes back once the fault ends, and no bundle id
is ever used twice.

(server_a or server_b killed mid-request: tests/test_service_errors.py; a slow link:
tests/test_lan.py.)
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import start_tiny_deployment
from PIL import Image

from secdfd.common.errors import RandomnessError
from secdfd.common.service import health, local
from secdfd.common.service.client import Client, ClientConfig
from secdfd.common.service.supply import IdLedger

pytestmark = pytest.mark.processes

SIZE = 32


class Deployment:
    """Dealer and both servers as processes on loopback, one state folder."""

    def __init__(self, root: Path, options: local.Options) -> None:
        self.layout, self.eps, self.started = start_tiny_deployment(root, options, SIZE)

    def client(self, timeout: float = 60) -> Client:
        return Client(ClientConfig(self.layout.keys, self.eps.server_a, self.eps.server_b, timeout))

    def proc(self, name: str) -> local.Started:
        return next(s for s in self.started if s.launch.name == name)

    def kill(self, name: str) -> None:
        s = self.proc(name)
        s.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        s.process.wait(10)  # type: ignore[union-attr]

    def restart(self, name: str) -> None:
        old = self.proc(name)
        self.started[self.started.index(old)] = local.start(self.layout, [old.launch])[0]
        local.write_processes(self.layout, self.started)

    def used(self) -> tuple[int, int]:
        return tuple(IdLedger(self.layout.state(n) / f"{n}.used").last for n in ("server_a", "server_b"))  # type: ignore[return-value]

    def stop(self) -> None:
        local.stop(self.started)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.new("RGB", (40, 40), (150, 110, 95)).save(path)
    return path


def test_dealer_killed_then_restarted(tmp_path, image):
    """Ready bundles are used; then requests fail at once (not after a minute); the servers
    reconnect to the restarted dealer by themselves and serve with fresh ids."""
    dep = Deployment(tmp_path, local.Options(depth=1, timeout=20.0))
    try:
        local.wait_ready(dep.started, dep.layout.keys, 120, prepared=True)
        dep.kill("dealer")
        client = dep.client()
        try:
            served = 0
            t0 = time.monotonic()
            while True:
                try:
                    client.detect(image)
                    served += 1
                except RandomnessError as e:
                    assert "dealer cannot be reached" in str(e)
                    break
                assert served <= 3, "served more requests than bundles were ready"
            assert 1 <= served <= 2
            assert time.monotonic() - t0 < 30  # each failing request is refused within seconds
            t1 = time.monotonic()
            with pytest.raises(RandomnessError, match="dealer cannot be reached"):
                client.detect(image)
            assert time.monotonic() - t1 < 10  # the old behaviour waited 60 s
            before = dep.used()
            dep.restart("dealer")
            deadline = time.monotonic() + 90
            while True:
                try:
                    r = client.detect(image)
                    break
                except RandomnessError:
                    assert time.monotonic() < deadline, "no service 90 s after the dealer came back"
                    time.sleep(1)
            assert r["verdict"] in ("real", "fake")
            after = dep.used()
            assert after[0] == after[1] > before[0]
        finally:
            client.close()
    finally:
        dep.stop()


def test_a_client_that_disconnects_mid_request(tmp_path, image):
    """A client process killed while its inference runs: the servers finish it (the reply is
    dropped) and serve the next client."""
    dep = Deployment(tmp_path, local.Options(depth=1, timeout=20.0))
    try:
        local.wait_ready(dep.started, dep.layout.keys, 120, prepared=True)
        before = dep.used()
        argv = [sys.executable, "-m", "secdfd.client", "detect", str(image), "--no-crop", "--keys",
                str(dep.layout.keys), "--server-a", dep.eps.server_a, "--server-b", dep.eps.server_b]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while dep.used()[0] == before[0]:  # server_a has claimed the bundle: the session is on
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.kill()
        proc.wait(10)
        client = dep.client()
        try:
            assert client.detect(image)["verdict"] in ("real", "fake")
        finally:
            client.close()
        assert dep.used()[0] == dep.used()[1] > before[0]
    finally:
        dep.stop()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a small tmpfs")
def test_full_disk_for_the_ledgers(tmp_path, image):
    """server_a's ledger cannot be written: the request fails with a clear error and its bundle is
    not used; once there is space again, service resumes with a fresh id."""
    state = tmp_path / "state" / "server_a"
    state.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(state)], check=True, timeout=30)
    try:
        dep = Deployment(tmp_path, local.Options(depth=1, timeout=20.0))
        try:
            client = dep.client()
            try:
                client.detect(image)
                used = dep.used()
                filler = state / "filler"
                fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
                try:  # fill the disk to the last block
                    while True:
                        os.write(fd, bytes(4096))
                except OSError:
                    pass
                finally:
                    os.close(fd)
                t0 = time.monotonic()
                with pytest.raises(RandomnessError, match="No space left on device.*the bundle is not used"):
                    client.detect(image)
                assert time.monotonic() - t0 < 10  # refused before the session runs, not after a wait
                assert dep.used() == used  # nothing recorded, so nothing could be used twice
                filler.unlink()
                r = client.detect(image)
                assert r["verdict"] in ("real", "fake")
                after = dep.used()
                assert after[0] == after[1] > used[0]
                h = health.read(state)
                assert h is not None and h["requests_failed"] >= 1 and "No space left" in h["last_error"]
            finally:
                client.close()
        finally:
            dep.stop()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False, timeout=30)
