"""A local deployment: dealer, server_a and server_b as background processes of one machine.

Used by `secdfd up/down/status` and by `secdfd bench e2e`. A state folder holds everything::

    STATE/keys/<party>/        keys from `secdfd keys` (each process is given only its own folder)
    STATE/shares/              weight shares and model.json from `secdfd share`
    STATE/state/<party>/       bundle-id ledgers and the dealer's provisioning seeds
    STATE/logs/<party>.log     each process's output
    STATE/processes.json       pid, command line and endpoint of each process started

How one party is started is data (`Launch`: name, command line, environment, endpoint) made by
`launches`, and starting it is a function (`Spawn`), so that a caller can run a party elsewhere,
e.g. prefix the command line with `ip netns exec NS` and give `Endpoints` on other addresses.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from secdfd.common import roster
from secdfd.common.errors import PeerLost, PeerTimeout, SecDFDError
from secdfd.common.service import health

PROCESSES_FILE = "processes.json"


class DeploymentError(SecDFDError):
    """A local deployment cannot be started, found or stopped."""


@dataclass(frozen=True)
class Endpoints:
    """Where each party listens; the same strings are bound and connected to (one machine)."""

    dealer: str = roster.endpoint(roster.DEALER)
    server_a: str = roster.endpoint(roster.SERVER_A)
    server_b: str = roster.endpoint(roster.SERVER_B)
    peer: str = roster.endpoint("peer")  # server_a <-> server_b

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Endpoints:
        """Four ports the operating system reports free now (for benchmarks and tests)."""
        ports = free_ports(4, host)
        return cls(*(f"tcp://{host}:{p}" for p in ports))


def ports_in_use(endpoints: Endpoints) -> list[str]:
    """The listening endpoints (dealer, server_a, server_b, peer) whose TCP port something else holds."""
    taken = []
    for name in ("dealer", "server_a", "server_b", "peer"):
        ep = getattr(endpoints, name)
        if not ep.startswith("tcp://"):
            continue
        host, _, port = ep[len("tcp://"):].rpartition(":")
        if not port.isdigit():
            continue
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is no obstacle
        try:
            s.bind((host or "0.0.0.0", int(port)))
        except OSError:
            taken.append(f"{name} ({ep})")
        finally:
            s.close()
    return taken


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports that are free at the moment of asking."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass(frozen=True)
class Layout:
    """The files of a local deployment under one state folder."""

    root: Path

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def shares(self) -> Path:
        return self.root / "shares"

    @property
    def model_info(self) -> Path:
        from secdfd.common.service.deployment import INFO_FILE

        return self.shares / INFO_FILE

    def state(self, party: str) -> Path:
        return self.root / "state" / party

    def log(self, party: str) -> Path:
        return self.root / "logs" / f"{party}.log"

    @property
    def processes(self) -> Path:
        return self.root / PROCESSES_FILE

    @property
    def source(self) -> Path:
        """Which model file the shares were made from, and its digest (written by `secdfd up`)."""
        return self.shares / "source.json"


@dataclass(frozen=True)
class Launch:
    """How to start one party: its command line, environment additions and client-facing endpoint."""

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    endpoint: str = ""
    state: str = ""  # the party's state folder, where it publishes its health (status.json)


@dataclass(frozen=True)
class Options:
    """Per-server settings of a local deployment."""

    threads: int = 1  # torch threads per process: the three share this machine's cores
    depth: int = 2  # bundles kept ready per server
    device: str = "cpu"
    limbs: bool = False
    timeout: float = 120.0  # one protocol round
    max_batch: int = 4  # face crops per request (dealer and servers)
    extra: tuple[str, ...] = ()  # further server options, e.g. ("--client-wait", "5")


def launches(layout: Layout, endpoints: Endpoints, options: Options = Options()) -> list[Launch]:
    """The command lines of dealer, server_a and server_b for `layout` (python -m, this interpreter)."""
    env = {"SECDFD_THREADS": str(options.threads), "PYTHONUNBUFFERED": "1"}
    py = sys.executable
    dealer = Launch("dealer", (py, "-m", "secdfd.dealer", "--keys", str(layout.keys / "dealer"),
                               "--state", str(layout.state("dealer")), "--listen", endpoints.dealer,
                               "--model", str(layout.model_info), "--max-batch", str(options.max_batch)),
                    env, endpoints.dealer,
                    str(layout.state("dealer")))
    out = [dealer]
    for srv, listen in ((roster.server(roster.SERVER_A), endpoints.server_a),
                        (roster.server(roster.SERVER_B), endpoints.server_b)):
        name = srv.name
        argv = [py, "-m", srv.module, "--keys", str(layout.keys / name),
                "--weights", str(layout.shares / f"{name}.weights"), "--state", str(layout.state(name)),
                "--listen", listen, "--peer", endpoints.peer, "--dealer", endpoints.dealer,
                "--depth", str(options.depth), "--timeout", f"{options.timeout:g}", "--device", options.device,
                "--max-batch", str(options.max_batch)]
        if options.limbs:
            argv.append("--limbs")
        argv += options.extra
        out.append(Launch(name, tuple(argv), env, listen, str(layout.state(name))))
    return out


Spawn = Callable[[Launch, Path], "subprocess.Popen[bytes]"]


def spawn_local(launch: Launch, log: Path) -> subprocess.Popen[bytes]:
    """Start `launch` in the background in its own session, output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(list(launch.argv), env={**os.environ, **launch.env}, stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


@dataclass
class Started:
    """One running party."""

    launch: Launch
    pid: int
    log: Path
    process: subprocess.Popen[bytes] | None = None  # only in the process that started it

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _pid_runs(self.pid, self.launch.argv)


@dataclass(frozen=True)
class Launcher:
    """How and where parties are started: the `Spawn` and the endpoints (None: free loopback ports)."""

    spawn: Spawn = spawn_local
    endpoints: Endpoints | None = None


ON_LOOPBACK = Launcher()  # local processes on free loopback ports


def start(layout: Layout, plan: Sequence[Launch], spawn: Spawn = spawn_local) -> list[Started]:
    """Start every launch and record the processes in the state folder."""
    started = []
    try:
        for launch in plan:
            log = layout.log(launch.name)
            proc = spawn(launch, log)
            started.append(Started(launch, proc.pid, log, proc))
    except OSError as e:
        stop(started)
        raise DeploymentError(f"cannot start {launch.name}: {e}") from None
    except BaseException:  # a signal turned into an exception (`running`) while some were started
        stop(started)
        raise
    write_processes(layout, started)
    return started


EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def raise_on_signal(signum: int, frame: FrameType | None) -> None:
    """A handler that turns SIGINT into KeyboardInterrupt and SIGTERM or SIGHUP into SystemExit, so
    that `finally` clauses run (a signal's default action ends the process without them)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def exit_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise (`raise_on_signal`) in the block, main thread only, so that the
    block's `finally` clauses and context managers clean up; the handlers before are restored after."""
    old: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        old = {s: signal.signal(s, raise_on_signal) for s in EXIT_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP ignored in the block (main thread only): a clean-up is not cut in
    half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, signal.SIG_IGN) for s in EXIT_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def running(layout: Layout, plan: Sequence[Launch], spawn: Spawn = spawn_local) -> Iterator[list[Started]]:
    """`start` the parties and `stop` them on leaving the block, also when the process is ended by
    SIGTERM, SIGHUP or SIGINT (a benchmark stopped by `timeout`, a closed terminal): its parties run
    in sessions of their own, and without this they would outlive it. A signal while they start
    stops those already started; signals are held while they stop."""
    with exit_on_signals():
        started = start(layout, plan, spawn)
        try:
            yield started
        finally:
            with held_signals():
                stop(started)


def write_processes(layout: Layout, started: Sequence[Started]) -> None:
    layout.root.mkdir(parents=True, exist_ok=True)
    data = {s.launch.name: {"pid": s.pid, "argv": list(s.launch.argv), "endpoint": s.launch.endpoint,
                            "log": str(s.log), "state": s.launch.state} for s in started}
    layout.processes.write_text(json.dumps(data, indent=2) + "\n")


def read_processes(layout: Layout) -> list[Started]:
    """The processes recorded by `start` (empty if none were)."""
    try:
        data = json.loads(layout.processes.read_text())
    except FileNotFoundError:
        return []
    except ValueError:
        raise DeploymentError(f"{layout.processes} is corrupt; stop the processes by hand and delete it") from None
    return [Started(Launch(name, tuple(d["argv"]), {}, d.get("endpoint", ""), d.get("state", "")), int(d["pid"]),
                    Path(d["log"])) for name, d in data.items()]


def wait_ready(started: Sequence[Started], client_keys: Path, timeout: float,
               prepared: bool = False) -> dict[str, dict[str, Any]]:
    """Wait until both servers answer `info` (they listen for clients only once set up).

    With `prepared`, also until each has published (in its health file) a prepared bundle and a
    full queue (nothing left to do in the background: what a benchmark wants before it times a
    request). Fails as soon as a process exits, quoting the end of its log. Returns each server's
    `info` answer.
    """
    servers = [s for s in started if s.launch.name in roster.SERVERS]
    deadline = time.monotonic() + timeout
    infos: dict[str, dict[str, Any]] = {}
    from secdfd.common.net.keys import load_party
    from secdfd.common.net.transport import Node, Requester

    with Node(load_party(client_keys, "client")) as node:
        reqs = {s.launch.name: Requester(node, s.launch.endpoint, s.launch.name, timeout=1.0) for s in servers}
        while True:
            for s in started:
                if not s.alive():
                    raise DeploymentError(f"{s.launch.name} stopped during start-up: {last_line(s.log)} "
                                          f"(log: {s.log})")
            for name, req in reqs.items():
                try:
                    infos[name] = dict(req.request("info", timeout=1.0).meta)
                except (PeerTimeout, PeerLost):
                    infos.pop(name, None)
            if len(infos) == len(reqs) and (not prepared or all(_idle(s) for s in servers)):
                return infos
            if time.monotonic() > deadline:
                waiting = [n for n in reqs if n not in infos] or list(reqs)
                raise DeploymentError(f"{', '.join(waiting)} not ready within {timeout:g} s; see "
                                      f"{', '.join(str(s.log) for s in servers)}")
            time.sleep(0.2)


def _idle(server: Started) -> bool:
    """Whether a server has published a prepared bundle and a fuller queue than that."""
    h = health.read(Path(server.launch.state)) if server.launch.state else None
    return h is not None and bool(h.get("prepared")) and int(h.get("bundles_ready", 0)) > 1


def stop(started: Sequence[Started], grace: float = 10.0) -> list[str]:
    """SIGTERM each running process (its own session), SIGKILL after `grace`; the names stopped."""
    stopped = []
    for s in started:
        if s.alive():
            _signal(s.pid, signal.SIGTERM)
            stopped.append(s.launch.name)
    deadline = time.monotonic() + grace
    for s in started:
        while s.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        if s.alive():
            _signal(s.pid, signal.SIGKILL)
        if s.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.process.wait(5)
    return stopped


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _pid_runs(pid: int, argv: Sequence[str]) -> bool:
    """Whether `pid` is still the process we started (not a reused pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # someone else's process now
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            parts = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if _zombie(pid):
            return False
        return [p.decode(errors="replace") for p in parts if p] == list(argv)
    return True


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def last_line(log: Path) -> str:
    """The last non-empty line of a log file (where a process says why it stopped)."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    return lines[-1].strip() if lines else "(empty log)"
