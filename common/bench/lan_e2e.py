"""`secdfd bench e2e --lan RATE`: the end-to-end benchmark with every party on its own host.

1. In the host's namespace: clear what dead runs left (`cleanup_stale`), create the emulated LAN
   (`lan.Lan`: one namespace per party, links shaped to RATE) and measure the round-trip times
   server_a <-> server_b (the link every round crosses) and client <-> server_a.
2. Run the benchmark driver itself inside the client's namespace, told where the parties go by
   the environment variable SECDFD_LAN (JSON: each party's namespace and address). The driver
   starts dealer, server_a and server_b in their own namespaces (`Placement.spawn`: the command line
   behind `ip netns exec NS`) and every party binds and connects to LAN addresses only
   (`Placement.endpoints`), exactly as across machines; the client is the driver's own process.
3. Read the driver's JSON, add the LAN figures (rate, RTTs, and for a target RTT an estimate
   clearly labelled as such), then remove every namespace, and with them every link.

`tc` has no netem here, so no latency is added on the links; the estimate for a target RTT X ms is
online + rounds x (X - measured RTT) / 1000: each round waits for one more round trip.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secdfd.common import roster
from secdfd.common.bench.lan import Lan, LanError, cleanup_stale
from secdfd.common.service.local import Endpoints, Launcher

ENV = "SECDFD_LAN"


@dataclass(frozen=True)
class Placement:
    """Where each party runs on the emulated LAN: its namespace and its address."""

    namespaces: Mapping[str, str]
    addresses: Mapping[str, str]
    rate: str

    @classmethod
    def from_lan(cls, net: Lan) -> Placement:
        return cls({r: net.namespaces[r] for r in net.roles}, {r: net.address(r) for r in net.roles}, net.rate)

    def to_env(self) -> str:
        return json.dumps({"namespaces": dict(self.namespaces), "addresses": dict(self.addresses),
                           "rate": self.rate})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Placement | None:
        """The placement a driver was started with, or None on one machine (no SECDFD_LAN)."""
        raw = (os.environ if environ is None else environ).get(ENV)
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(dict(d["namespaces"]), dict(d["addresses"]), str(d["rate"]))
        except (ValueError, KeyError, TypeError):
            raise LanError(f"{ENV} is not a LAN placement; it is set by `secdfd bench e2e --lan`, "
                           "unset it to run on one machine") from None

    def endpoint(self, role: str, port: int) -> str:
        return f"tcp://{self.addresses[role]}:{port}"

    def endpoints(self) -> Any:
        """The local deployment's Endpoints on LAN addresses (the peer link on server_a's)."""
        return Endpoints(dealer=self.endpoint(roster.DEALER, roster.PORTS[roster.DEALER]),
                         server_a=self.endpoint(roster.SERVER_A, roster.PORTS[roster.SERVER_A]),
                         server_b=self.endpoint(roster.SERVER_B, roster.PORTS[roster.SERVER_B]),
                         peer=self.endpoint(roster.SERVER_A, roster.PORTS["peer"]))

    def spawn(self, launch: Any, log: Path) -> subprocess.Popen[bytes]:
        """Start a local deployment's `Launch` inside its party's namespace (a `local.Spawn`)."""
        if launch.name not in self.namespaces:
            raise LanError(f"no namespace for {launch.name}; the LAN has {', '.join(self.namespaces)}")
        log.parent.mkdir(parents=True, exist_ok=True)
        argv = ["ip", "netns", "exec", self.namespaces[launch.name], *launch.argv]
        with open(log, "ab") as f:
            return subprocess.Popen(argv, env={**os.environ, **launch.env}, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)


def rtt_estimate(online_seconds: float, rounds: int, target_rtt_ms: float, measured_rtt_ms: float) -> float:
    """ESTIMATE of the online seconds at another RTT: one more (or less) round trip per round."""
    return online_seconds + rounds * (target_rtt_ms - measured_rtt_ms) / 1000.0


def driver_argv(command: Sequence[str]) -> list[str]:
    """`secdfd COMMAND...` run with this interpreter (the console script may not be on PATH)."""
    return [sys.executable, "-c", "from secdfd.common.cli.main import main; main()", *command]


def run_in_lan(rate: str, argv: Sequence[str], target_rtt_ms: float | None = None,
               timeout: float = 3600.0) -> dict[str, Any]:
    """Run `argv` (a benchmark driver that prints one JSON object, e.g. `driver_argv(["bench",
    "e2e", ..., "--json"])`) as the client on an emulated LAN at `rate`; return its result with a
    `lan` entry added."""
    cleanup_stale()
    with Lan(rate) as net:
        rtt = net.rtt("server_a", "server_b", count=50)
        rtt_client = net.rtt("client", "server_a", count=20)
        place = Placement.from_lan(net)
        # the driver gets every option on its command line; a SECDFD_BENCH_E2E_LAN left in the
        # environment must not make it start a LAN of its own
        env = {k: v for k, v in os.environ.items() if not k.startswith("SECDFD_BENCH_E2E_")}
        env[ENV] = place.to_env()
        # the driver's progress and errors go straight to our stderr; its JSON comes back on stdout
        proc = net.spawn("client", argv, env=env, stdout=subprocess.PIPE, stderr=None)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException as e:
            # SIGINT first: the driver's own clean-up (its parties, its scratch folder) runs
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(15)
            if isinstance(e, subprocess.TimeoutExpired):
                raise LanError(f"the benchmark on the LAN did not finish within {timeout:g} s") from None
            raise
        if proc.returncode != 0:
            raise LanError(f"the benchmark on the LAN failed (exit {proc.returncode}); its message is above")
        result = _last_json(out.decode(errors="replace"))
    online = result.get("online_seconds")
    rounds = result.get("rounds")
    lan: dict[str, Any] = {
        "rate": rate,
        "topology": "one network namespace per party, veth links to a bridge, tc tbf at the rate on both ends",
        "addresses": dict(place.addresses),
        "rtt_ms": rtt.median_ms,
        "rtt": {"server_a-server_b": rtt.as_dict(), "client-server_a": rtt_client.as_dict()},
    }
    if target_rtt_ms is not None and isinstance(online, int | float) and isinstance(rounds, int):
        lan["estimate"] = {
            "label": "ESTIMATE, not measured: online + rounds x (rtt_ms - measured rtt_ms) / 1000",
            "rtt_ms": target_rtt_ms,
            "online_seconds": rtt_estimate(float(online), rounds, target_rtt_ms, rtt.median_ms),
        }
    result["lan"] = lan
    return result


def launcher() -> Launcher:
    """Where `e2e.run_e2e` starts the parties: in the namespaces of the LAN when this process is the
    driver that `run_in_lan` started, else on loopback."""
    place = Placement.from_env()
    return Launcher() if place is None else Launcher(place.spawn, place.endpoints())


def lan_lines(result: Mapping[str, Any]) -> list[str]:
    """The LAN figures of a result as text lines (empty on loopback)."""
    lan = result.get("lan")
    if not isinstance(lan, Mapping):
        return []
    out = [f"  {'lan':18s} {lan['rate']} per link (tc tbf), one network namespace per party",
           f"  {'rtt_ms':18s} {lan['rtt_ms']:.4f} (measured, server_a <-> server_b)"]
    est = lan.get("estimate")
    if isinstance(est, Mapping):
        out.append(f"  ESTIMATE (not measured) at {est['rtt_ms']:g} ms RTT: online {est['online_seconds']:.3f} s "
                   "= online + rounds x (RTT - measured RTT)")
    return out


def _last_json(out: str) -> dict[str, Any]:
    """The driver's JSON object: all of stdout, or else its last line that parses as an object."""
    try:
        data = json.loads(out)
        if isinstance(data, dict):
            return data
    except ValueError:
        pass
    for line in reversed(out.strip().splitlines()):
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    raise LanError(f"the benchmark on the LAN printed no JSON result: {out.strip()[-300:]!r}")
