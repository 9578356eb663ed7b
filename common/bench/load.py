"""`secdfd bench load`: many clients at once against dealer and servers as processes, and long runs.

1. A scratch deployment (keys, the model's weight shares, free ports or the LAN's addresses), with
   one client keypair per client process, each admitted by both servers.
2. C client processes (`load_client`) send R requests in total at once (or, with `duration`, keep
   sending until it is over); each writes one line per request.
3. Every answer is checked against the plaintext verdict of its image; busy answers are retried by
   the client and counted.
4. While it runs, the dealer's and both servers' memory (RSS) and open file descriptors are sampled;
   after a warm-up (the first quarter of the run) their slopes are fitted (least squares), so a long
   run shows whether anything grows; the slope of the last half and the mean RSS of each quarter
   tell memory that settles (last half flat, quarters level off) from memory that leaks (the same
   slope throughout).

Figures: throughput (answered inferences per minute), latency percentiles p50/p95/max of answered
requests (what a client waited, busy retries included), errors by kind, verdicts checked, peak
memory of each party (VmHWM), the slopes, and whether the ledgers agree (both servers used the same
ids; the dealer handed out at least as many).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secdfd.common import roster
from secdfd.common.bench.e2e import bench_images, bench_model, is_model_file, plaintext, write_model_file
from secdfd.common.errors import SecDFDError
from secdfd.common.ml.data import load_image
from secdfd.common.net.keys import admit, make_keys, make_party_keys
from secdfd.common.service import deployment, local
from secdfd.common.service.supply import IdLedger

WARMUP_SHARE = 0.25  # the first quarter of a run is not fitted
SAMPLE_EVERY = 2.0  # seconds between memory and descriptor samples


_Running = tuple[local.Layout, local.Endpoints, list[local.Started], list[Path]]


class LoadError(SecDFDError):
    """The load run could not be set up or completed."""


@dataclass(frozen=True)
class LoadPlan:
    """What to run: `clients` processes, `requests` in total, or each sending until `duration` s."""

    clients: int
    requests: int | None = None
    duration: float | None = None
    model: str = "dfdnet-s"
    size: int = 128
    images: int = 8

    def __post_init__(self) -> None:
        if self.clients < 1 or (self.requests is None) == (self.duration is None):
            raise LoadError("give at least one client and either a number of requests or a duration")
        if self.requests is not None and self.requests < self.clients:
            raise LoadError("give at least one request per client")


def _party_pids(started: list[local.Started]) -> dict[str, int]:
    return {s.launch.name: s.pid for s in started}


def _proc_figures(pid: int) -> tuple[float, float, int]:
    """(RSS MB, peak RSS MB, open file descriptors) of a process."""
    rss = hwm = 0.0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0.0, 0.0, 0
    return rss, hwm, fds


class Sampler:
    """Samples every party's RSS and descriptors in a background thread."""

    def __init__(self, pids: dict[str, int], every: float = SAMPLE_EVERY) -> None:
        self.pids = pids
        self.every = every
        self.samples: dict[str, list[tuple[float, float, int]]] = {n: [] for n in pids}
        self.peak: dict[str, float] = {n: 0.0 for n in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sample()

    def _sample(self) -> None:
        now = time.monotonic()
        for name, pid in self.pids.items():
            rss, hwm, fds = _proc_figures(pid)
            if rss:
                self.samples[name].append((now, rss, fds))
                self.peak[name] = max(self.peak[name], hwm)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def slopes(self) -> dict[str, dict[str, Any]]:
        """Per party, after the warm-up: RSS MB per hour and descriptors per hour (least squares); the RSS
        slope of the last half and the mean RSS of each quarter of the run."""
        out = {}
        for name, rows in self.samples.items():
            if len(rows) < 4:
                out[name] = {"rss_mb_per_hour": 0.0, "rss_mb_per_hour_last_half": 0.0, "rss_mb_mean_by_quarter": [],
                             "fds_per_hour": 0.0, "rss_mb_end": rows[-1][1] if rows else 0.0,
                             "fds_end": rows[-1][2] if rows else 0, "samples": len(rows)}
                continue
            start, t_end = rows[0][0], rows[-1][0]
            kept = [r for r in rows if r[0] >= start + WARMUP_SHARE * (t_end - start)] or rows
            late = [r for r in rows if r[0] >= start + 0.5 * (t_end - start)] or rows
            quarters: list[list[float]] = [[], [], [], []]
            for r in rows:
                quarters[min(3, int(4 * (r[0] - start) / max(t_end - start, 1e-9)))].append(r[1])
            out[name] = {"rss_mb_per_hour": 3600 * _slope([r[0] for r in kept], [r[1] for r in kept]),
                         "rss_mb_per_hour_last_half": 3600 * _slope([r[0] for r in late], [r[1] for r in late]),
                         "rss_mb_mean_by_quarter": [round(statistics.fmean(q), 1) if q else 0.0 for q in quarters],
                         "fds_per_hour": 3600 * _slope([r[0] for r in kept], [float(r[2]) for r in kept]),
                         "rss_mb_end": kept[-1][1], "fds_end": kept[-1][2], "samples": len(kept)}
        return out


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


@contextlib.contextmanager
def _deployment(plan: LoadPlan, work: Path | None, launcher: local.Launcher,
                options: local.Options) -> Iterator[_Running]:
    """Scratch deployment with one admitted client key folder per client process."""
    model, _ = bench_model(plan.model, plan.size)
    with local.exit_on_signals(), tempfile.TemporaryDirectory(prefix="secdfd-load-", dir=work) as tmp:
        layout = local.Layout(Path(tmp))
        endpoints = launcher.endpoints or local.Endpoints.free()
        write_model_file(Path(plan.model) if is_model_file(plan.model) else model, plan.model, layout.root / "model.pt")
        make_keys(layout.keys)
        deployment.share_model(layout.root / "model.pt", layout.shares)
        (layout.root / "model.pt").unlink()
        clients = []
        for i in range(plan.clients):
            home = layout.root / "clients" / f"c{i}"
            public = make_party_keys(home, roster.CLIENT)
            for server in roster.SERVERS:
                admit(layout.keys / server, server, public, name=f"load-{i}")
                admit(home, roster.CLIENT, layout.keys / "public" / f"{server}.key")
            clients.append(home)
        with local.running(layout, local.launches(layout, endpoints, options), launcher.spawn) as started:
            local.wait_ready(started, layout.keys, 900, prepared=True)
            yield layout, endpoints, started, clients


def run_load(plan: LoadPlan, work: Path | None = None, launcher: local.Launcher = local.ON_LOOPBACK,
             options: local.Options | None = None, echo: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Run the load (see the module docstring) and return its figures."""
    options = options or local.Options()
    model, weights = bench_model(plan.model, plan.size)
    images = bench_images(plan.images, plan.size, seed=11)
    echo(f"{plan.clients} clients, {plan.model} at {plan.size}x{plan.size} ({weights})")
    with _deployment(plan, work, launcher, options) as (layout, eps, started, clients):
        image_dir = layout.root / "images"
        image_dir.mkdir()
        expected = []
        for i, x in enumerate(images):  # the reference is the image as the clients read it (8-bit PNG)
            path = image_dir / f"{i:03d}.png"
            _save_png(x, path)
            expected.append(plaintext(model, load_image(path, plan.size))[0])
        used0 = IdLedger(layout.state(roster.SERVER_A) / f"{roster.SERVER_A}.used").last
        with Sampler(_party_pids(started)) as sampler:
            t0 = time.time()
            lines = _run_clients(plan, clients, eps, image_dir, options)
            wall = time.time() - t0
        used = [IdLedger(layout.state(n) / f"{n}.used").last for n in roster.SERVERS]
        dealer_ids = IdLedger(layout.state(roster.DEALER) / "dealer.ids").last
    return _figures(plan, lines, expected, wall, sampler, used, used0, dealer_ids)


def _save_png(x: torch.Tensor, path: Path) -> None:
    from PIL import Image

    arr = (x[0].permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def _run_clients(plan: LoadPlan, clients: list[Path], eps: local.Endpoints, image_dir: Path,
                 options: local.Options) -> list[dict[str, Any]]:
    until = None if plan.duration is None else time.time() + plan.duration
    procs = []
    for i, home in enumerate(clients):
        argv = [sys.executable, "-m", "secdfd.common.bench.load_client", str(home), eps.server_a, eps.server_b,
                str(image_dir), "--first", str(i), "--timeout", f"{max(300.0, options.timeout * 4):g}"]
        if plan.requests is not None:
            argv += ["--count", str(plan.requests // plan.clients + (1 if i < plan.requests % plan.clients else 0))]
        else:
            argv += ["--until", str(until)]
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "SECDFD_THREADS": str(options.threads)}))
    lines = []
    try:
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise LoadError(f"a load client failed (exit {p.returncode}): {err.strip()[-500:]}")
            lines += [json.loads(ln) for ln in out.splitlines() if ln.strip()]
    finally:  # a failed client or a signal: the others stop too
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return lines


def _figures(plan: LoadPlan, lines: list[dict[str, Any]], expected: list[float], wall: float, sampler: Sampler,
             used: list[int], used0: int, dealer_ids: int) -> dict[str, Any]:
    ok = [r for r in lines if r["ok"]]
    wrong = [r for r in ok if roster.verdict(r["p_fake"]) != roster.verdict(expected[r["image"]])
             or abs(r["p_fake"] - expected[r["image"]]) > 1e-3]
    latencies = [r["end"] - r["start"] for r in ok]
    errors = Counter(r["error"] for r in lines if not r["ok"])
    return {
        "clients": plan.clients, "requests": len(lines), "duration_seconds": wall, "model": plan.model,
        "size": plan.size,
        "answered": len(ok), "verdicts_checked": len(ok), "verdicts_wrong": len(wrong),
        "throughput_per_minute": 60 * len(ok) / wall if wall > 0 else 0.0,
        "latency_seconds": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95),
                            "max": max(latencies, default=0.0)},
        "online_seconds_median": statistics.median([r["online_seconds"] for r in ok]) if ok else 0.0,
        "busy_retries": sum(r["attempts"] - 1 for r in lines),
        "errors": dict(errors),
        "error_examples": {k: next(r["message"] for r in lines if not r["ok"] and r["error"] == k) for k in errors},
        "peak_rss_mb": {k: round(v, 1) for k, v in sampler.peak.items()},
        "slopes": sampler.slopes(),
        "ledgers": {"server_a": used[0], "server_b": used[1], "dealer": dealer_ids, "used_in_run": used[0] - used0,
                    "consistent": used[0] == used[1] <= dealer_ids},
    }


def parse_duration(text: str) -> float:
    """'90', '90s', '10m' or '1h' -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise LoadError(f"a duration is like 90s, 10m or 1h, not {text!r}") from None

