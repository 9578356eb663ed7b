"""LAN emulation: each party in its own network namespace, joined by rate-shaped links.

Topology (a star, the way machines hang off one switch):

    sdfd-<pid>-<tag>-dealer    eth0 10.213.0.1 ──┐
    sdfd-<pid>-<tag>-server_a  eth0 10.213.0.2 ──┤  bridge br0 in
    sdfd-<pid>-<tag>-server_b  eth0 10.213.0.3 ──┤  sdfd-<pid>-<tag>-switch
    sdfd-<pid>-<tag>-client    eth0 10.213.0.4 ──┘

1. one namespace per party plus one for the switch; loopback up in each;
2. per party a veth pair created inside the switch namespace with its far end moved straight into
   the party's namespace, so no link ever exists in the host's namespace and deleting the
   namespaces removes every link;
3. `tc tbf` at RATE on both ends of every link: what a party sends and what it receives are each
   limited to RATE, as on a full-duplex switch port. (`tc` here has no netem: the links add no
   delay; measure the round-trip time with `rtt` and estimate other latencies from it.)

The subnet 10.213.0.0/24 exists only inside these namespaces, so runs side by side never clash.
`Lan` is a context manager that always cleans up: on leaving the block, on SIGINT/SIGTERM/SIGHUP
(turned into exceptions that unwind the block), and at interpreter exit. A run killed outright
(SIGKILL) leaves namespaces named after its dead pid, which `cleanup_stale` removes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any

from secdfd.common.errors import SecDFDError
from secdfd.common.roster import PARTIES
from secdfd.common.service import local

PREFIX = "sdfd-"
SUBNET = "10.213.0"
SWITCH = "switch"
_CMD_TIMEOUT = 20.0  # one `ip` or `tc` call
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_NAME = re.compile(r"^(?P<prefix>.+?)(?P<pid>\d+)-(?P<tag>[0-9a-f]+)-(?P<role>[a-z_]+)$")


class LanError(SecDFDError):
    """The LAN cannot be set up here (no root, no namespaces, no tc) or a command in it failed."""


def parse_rate(rate: str) -> int:
    """'1gbit', '10gbit', '100mbit', '500kbit' -> bits per second (tc's units, decimal)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?bit)\s*", rate.lower())
    if m is None or float(m.group(1)) <= 0:
        raise LanError(f"cannot read the link rate {rate!r}; write it like 1gbit, 10gbit or 100mbit")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _tbf_burst(bits_per_s: int) -> int:
    """Bucket size in bytes: one millisecond at the rate, at least 32 KiB (several MTU-size packets
    and what one timer tick needs at this rate)."""
    return max(32 * 1024, bits_per_s // 8 // 1000)


def _run(argv: Sequence[str], timeout: float = _CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise LanError(f"`{argv[0]}` is not installed; the LAN emulation needs iproute2 (ip, tc)") from None
    except subprocess.TimeoutExpired:
        raise LanError(f"`{' '.join(argv)}` did not finish within {timeout:g} s") from None
    if check and res.returncode != 0:
        raise LanError(f"`{' '.join(argv)}` failed: {res.stderr.strip() or res.stdout.strip()}")
    return res


def check_supported() -> None:
    """Raise LanError with what to do when this machine cannot host the emulated LAN."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        raise LanError("--lan needs Linux network namespaces; run without --lan on this system")
    if os.geteuid() != 0:
        raise LanError("--lan needs root (it creates network namespaces and tc qdiscs); "
                       "run it as root or without --lan")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LanError(f"`{tool}` is not installed; install iproute2 or run without --lan")


def list_namespaces() -> list[str]:
    """Names of the network namespaces that `ip netns` knows."""
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_pids(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (a namespace is only gone once its last process is)."""
    res = _run(["ip", "netns", "pids", ns], check=False)
    for tok in res.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(tok), signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_pids(ns)
    _run(["ip", "netns", "delete", ns], check=False)


def cleanup_stale(prefix: str = PREFIX, include_live: bool = False) -> list[str]:
    """Delete namespaces left by runs that died without cleaning up; returns their names.

    A namespace is stale when its name is `<prefix><pid>-<tag>-<role>` and process `pid` is gone.
    `include_live` also deletes those of running processes (for an operator clearing everything).
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return []
    removed = []
    for ns in list_namespaces():
        m = _NAME.match(ns)
        if m is None or m.group("prefix") != prefix:
            continue
        if include_live or not _pid_alive(int(m.group("pid"))):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


@dataclass(frozen=True)
class Rtt:
    """Round trips of a small TCP message (TCP_NODELAY) between two namespaces, in milliseconds."""

    src: str
    dst: str
    count: int
    min_ms: float
    median_ms: float
    mean_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lan:
    """An emulated LAN of `roles`, each in its own namespace, links shaped to `rate`.

    Use as `with Lan("1gbit") as lan:`; `lan.address(role)` is the party's IPv4 address,
    `lan.run(role, argv)` runs a command there to completion and `lan.spawn(role, argv)` starts a
    background process there (stopped at exit). Everything is removed on leaving the block.
    """

    def __init__(self, rate: str, roles: Sequence[str] = PARTIES, prefix: str = PREFIX) -> None:
        self.rate = rate
        self.bits_per_s = parse_rate(rate)
        if len(set(roles)) != len(roles) or SWITCH in roles or not roles or len(roles) > 250:
            raise LanError(f"party names must be distinct, not {SWITCH!r}, and at most 250: {list(roles)}")
        for r in roles:
            if not re.fullmatch(r"[a-z_]{1,12}", r):
                raise LanError(f"party name {r!r}: use 1 to 12 lower-case letters or '_'")
        self.roles = tuple(roles)
        self.prefix = prefix
        self.tag = secrets.token_hex(3)
        base = f"{prefix}{os.getpid()}-{self.tag}-"
        self.namespaces = {r: base + r for r in (*self.roles, SWITCH)}
        self._addresses = {r: f"{SUBNET}.{i + 1}" for i, r in enumerate(self.roles)}
        self._created: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._old_handlers: dict[int, Any] = {}
        self._lock = threading.RLock()
        self._closed = False

    # --- set-up and clean-up ----------------------------------------------------------------

    def __enter__(self) -> Lan:
        self._install_handlers()
        atexit.register(self.close)
        try:
            check_supported()
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _create(self) -> None:
        for ns in self.namespaces.values():
            res = _run(["ip", "netns", "add", ns], check=False)
            if res.returncode != 0:
                raise LanError(f"cannot create network namespace {ns}: {res.stderr.strip()}; "
                               "this system may not support network namespaces (run without --lan)")
            self._created.append(ns)
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        sw = self.namespaces[SWITCH]
        _run(["ip", "-n", sw, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", sw, "link", "set", "br0", "up"])
        burst = _tbf_burst(self.bits_per_s)
        tbf = ["tbf", "rate", f"{self.bits_per_s}bit", "burst", str(burst), "latency", "50ms"]
        for role in self.roles:
            ns, port = self.namespaces[role], f"p-{role}"
            _run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "-n", sw, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self._addresses[role]}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            # what the party sends, then what it receives: each direction of the port at RATE
            _run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", *tbf])
            _run(["tc", "-n", sw, "qdisc", "add", "dev", port, "root", *tbf])
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for role in self.roles:
            while "state UP" not in _run(["ip", "-n", self.namespaces[role], "link", "show", "eth0"]).stdout:
                if time.monotonic() > deadline:
                    raise LanError(f"the link of {role} did not come up within {timeout:g} s")
                time.sleep(0.05)

    def close(self) -> None:
        """Stop every process started here and delete every namespace (and with it every link).

        Idempotent; SIGINT, SIGTERM and SIGHUP are ignored while it runs (`local.held_signals`), so a
        second Ctrl-C cannot leave half.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                with local.held_signals():
                    for p in self._procs:
                        _stop(p)
                    for ns in reversed(self._created):
                        _delete_namespace(ns)
                    self._created.clear()
            finally:
                self._restore_handlers()
                with contextlib.suppress(Exception):
                    atexit.unregister(self.close)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers; the with-block and atexit still clean up
        for s in local.EXIT_SIGNALS:
            self._old_handlers[s] = signal.signal(s, local.raise_on_signal)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s, h in self._old_handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._old_handlers.clear()

    # --- using it ---------------------------------------------------------------------------

    def address(self, role: str) -> str:
        """The IPv4 address of `role` on the emulated LAN."""
        if role not in self._addresses:
            raise LanError(f"no party {role!r} on this LAN; it has {', '.join(self.roles)}")
        return self._addresses[role]

    def endpoint(self, role: str, port: int) -> str:
        """A ZeroMQ TCP endpoint of `role` (bind on it inside `role`, connect to it from anywhere)."""
        return f"tcp://{self.address(role)}:{port}"

    def exec_argv(self, role: str, argv: Sequence[str]) -> list[str]:
        """The command line that runs `argv` inside `role`'s namespace."""
        if role not in self._addresses:
            raise LanError(f"no party {role!r} on this LAN; it has {', '.join(self.roles)}")
        return ["ip", "netns", "exec", self.namespaces[role], *argv]

    def run(self, role: str, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `role`'s namespace to completion (text output captured)."""
        self._check_open()
        try:
            res = subprocess.run(self.exec_argv(role, argv), capture_output=True, text=True, timeout=timeout,
                                 env=dict(env) if env is not None else None)
        except subprocess.TimeoutExpired:
            raise LanError(f"{argv[0]} in {role}'s namespace did not finish within {timeout:g} s") from None
        if check and res.returncode != 0:
            raise LanError(f"{' '.join(argv)} in {role}'s namespace failed (exit {res.returncode}): "
                           f"{res.stderr.strip()[-2000:]}")
        return res

    def spawn(self, role: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              stdout: IO[Any] | int | None = subprocess.DEVNULL,
              stderr: IO[Any] | int | None = subprocess.DEVNULL) -> subprocess.Popen[Any]:
        """Start `argv` in the background inside `role`'s namespace, in its own process group.

        `ip netns exec` execs the command, so the Popen's pid is the command's own; `close` stops
        it (SIGTERM, then SIGKILL) before the namespace goes.
        """
        self._check_open()
        p = subprocess.Popen(self.exec_argv(role, argv), env=dict(env) if env is not None else None,
                             stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True)
        self._procs.append(p)
        return p

    def rtt(self, src: str, dst: str, count: int = 20, port: int = 7399) -> Rtt:
        """Round-trip time of a 64-byte TCP message from `src` to `dst` and back (median of `count`,
        after 5 warm-up trips). Python on both ends: a little above the bare link's RTT."""
        echo = self.spawn(dst, [sys.executable, "-m", "secdfd.common.bench.lan", "echo", self.address(dst), str(port)])
        try:
            res = self.run(src, [sys.executable, "-m", "secdfd.common.bench.lan", "ping", self.address(dst), str(port),
                                 str(count)], timeout=30.0)
        finally:
            _stop(echo)
        times = json.loads(res.stdout)
        return Rtt(src, dst, len(times), min(times), statistics.median(times), statistics.fmean(times), max(times))

    def _check_open(self) -> None:
        if self._closed or not self._created:
            raise LanError("this LAN is not set up; use it inside `with Lan(rate) as lan:`")


def _stop(p: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace` seconds."""
    if p.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, sig)
        try:
            p.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def lan(rate: str, roles: Sequence[str] = PARTIES) -> Iterator[Lan]:
    """`with lan("1gbit") as net:` — stale namespaces of dead runs are removed first."""
    cleanup_stale()
    with Lan(rate, roles) as net:
        yield net


# --- the RTT probe, run as `python -m secdfd.common.bench.lan` inside the namespaces ------------------


def _echo(host: str, port: int, timeout: float = 30.0) -> None:
    with socket.create_server((host, port), reuse_port=False) as srv:
        srv.settimeout(timeout)
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(65536):
                conn.sendall(data)


def _ping(host: str, port: int, count: int, warmup: int = 5, msg: bytes = b"x" * 64) -> list[float]:
    deadline = time.monotonic() + 10.0
    while True:  # the echo server may still be starting
        try:
            conn = socket.create_connection((host, port), timeout=5.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    times = []
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + count):
            t = time.perf_counter()
            conn.sendall(msg)
            got = 0
            while got < len(msg):
                chunk = conn.recv(len(msg) - got)
                if not chunk:
                    raise ConnectionError("the echo server closed the connection")
                got += len(chunk)
            if i >= warmup:
                times.append((time.perf_counter() - t) * 1e3)
    return times


def _main(argv: Sequence[str]) -> int:
    if len(argv) == 3 and argv[0] == "echo":
        _echo(argv[1], int(argv[2]))
        return 0
    if len(argv) == 4 and argv[0] == "ping":
        print(json.dumps(_ping(argv[1], int(argv[2]), int(argv[3]))))
        return 0
    print("usage: python -m secdfd.common.bench.lan echo HOST PORT | ping HOST PORT COUNT", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
