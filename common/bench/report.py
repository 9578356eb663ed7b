"""Benchmark reports: JSON, a Markdown table and a plot of where time and bytes go per layer.

Reads any benchmark JSON with totals and a per-step list:
- `secdfd bench e2e --json`: online_seconds, bytes_per_server, rounds, dealer_bytes,
  offline_seconds, plaintext_seconds, abs_error, and `layers` (or `steps`);
- `secdfd bench model --json`: seconds, bytes_per_party, rounds, dealer_bytes, offline_seconds,
  plaintext_seconds, max_abs_error, and `steps`.
A step is `secdfd.common.engine.figures.StepFigures.to_dict()`: {index, name, op, bytes_per_party,
rounds, seconds}.

Grouping: the two streams of the fused detector run in lockstep and share every round, so a step
of `rgb.X` and its twin `ycbcr.X` are one layer; a step's truncation (`X.trunc`) belongs to X;
unnamed graph nodes (add, mul, cat...) belong to the layer before them; the fusion (each stream's
diff and gate, and the steps after the last stream step) is the `head`. Per block: stem1,
blocks.0, ..., exit1, aggregate, fc1, head.

What adds up: bytes (the steps' payloads; the rest is message framing, its own row) and seconds
(the steps' compute; the rest of the online time is waiting for the network and the peer, its own
row). Rounds do not: steps that run side by side share a round, so a layer's rounds are the rounds
it took part in, and only the total row is the number of messages of the inference.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secdfd.common.engine.figures import StepFigures
from secdfd.common.errors import ProtocolError

STREAMS = ("rgb.", "ycbcr.")
HEAD = "head"
HEAD_MODULES = ("diff", "gate")  # FusedDFDNet's per-stream fusion modules: part of the head too
_UNNAMED = re.compile(r"^[a-z]+(_\d+)?$")  # graph nodes named after their function: add_3, cat, relu


@dataclass(frozen=True)
class Layer:
    """One row of the per-layer table."""

    name: str
    ops: tuple[str, ...]
    bytes_per_server: tuple[int, int]
    rounds: int
    seconds: float
    steps: int = 1


@dataclass(frozen=True)
class Summary:
    """The figures of one inference, whatever benchmark produced them."""

    online_seconds: float
    bytes_per_server: tuple[int, int]
    rounds: int
    dealer_bytes: int | None = None
    offline_seconds: float | None = None
    plaintext_seconds: float | None = None
    abs_error: float | None = None
    steps: tuple[Layer, ...] = ()
    title: str = "SecDFD benchmark"
    extras: dict[str, Any] = field(default_factory=dict)
    # the online seconds of the inference `steps` break down (e2e: the last one; the headline
    # figures are medians over all of them)
    breakdown_seconds: float | None = None

    @property
    def broken_down_seconds(self) -> float:
        return self.online_seconds if self.breakdown_seconds is None else self.breakdown_seconds


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, list | tuple):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _first(d: Mapping[str, Any], *keys: str) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def _step(s: Any) -> Layer:
    try:
        f = StepFigures.from_dict(s)
    except ProtocolError as e:
        raise ValueError(str(e)) from None
    return Layer(f.name, (f.op,), f.bytes_per_party, f.rounds, f.seconds)


def summarize(data: Mapping[str, Any], title: str | None = None) -> Summary:
    """Read a benchmark JSON object into a Summary (see the module docstring for the keys)."""
    online = _first(data, "online_seconds", "seconds")
    sent = _first(data, "bytes_per_server", "bytes_per_party")
    if online is None or sent is None or "rounds" not in data:
        raise ValueError("not a benchmark result: it needs online_seconds (or seconds), bytes_per_server "
                         "(or bytes_per_party) and rounds")
    steps = _first(data, "layers", "steps") or []
    err = _first(data, "abs_error", "max_abs_error")
    extras = {k: data[k] for k in ("model", "size", "images", "lan", "machine", "command") if k in data}
    runs = data.get("inferences")
    last = runs[-1].get("online_seconds") if isinstance(runs, list) and runs and isinstance(runs[-1], Mapping) else None
    return Summary(
        online_seconds=float(online), bytes_per_server=_pair(sent), rounds=int(data["rounds"]),
        dealer_bytes=None if data.get("dealer_bytes") is None else int(data["dealer_bytes"]),
        offline_seconds=None if data.get("offline_seconds") is None else float(data["offline_seconds"]),
        plaintext_seconds=None if data.get("plaintext_seconds") is None else float(data["plaintext_seconds"]),
        abs_error=None if err is None else float(err),
        steps=tuple(_step(s) for s in steps), title=title or str(data.get("title", "SecDFD benchmark")),
        extras=extras, breakdown_seconds=None if last is None else float(last),
    )


# --- grouping ------------------------------------------------------------------------------


def _strip(name: str) -> tuple[str, str]:
    """(stream prefix or "", the name without it and without a trailing .trunc)."""
    stream = next((p for p in STREAMS if name.startswith(p)), "")
    name = name[len(stream):]
    return stream, name[:-len(".trunc")] if name.endswith(".trunc") else name


def _block(layer: str) -> str:
    parts = layer.split(".")
    if len(parts) > 1 and parts[1].isdigit():
        return ".".join(parts[:2])
    return parts[0]


def _classify(names: Sequence[str]) -> list[tuple[str, str]]:
    """(stream, layer) of each step; unnamed nodes inherit both from the step before them."""
    stripped = [_strip(n) for n in names]
    last_stream = max((i for i, (s, _) in enumerate(stripped) if s), default=-1)
    out: list[tuple[str, str]] = []
    for i, (stream, name) in enumerate(stripped):
        if last_stream >= 0 and i > last_stream:
            out.append(("", HEAD))
        elif not stream and name in HEAD_MODULES:  # a stream's own fusion step: keep its stream
            out.append((out[-1][0] if out else "", HEAD))
        elif _UNNAMED.match(name) and out:
            out.append(out[-1])
        else:
            out.append((stream, name))
    return out


def layer_keys(names: Sequence[str], level: str = "layer") -> list[str]:
    """The row each step belongs to at `level`: "step" (as is), "layer" (stream twins and
    truncations merged) or "block" (stem1, blocks.0, ..., exit1, fc1, head)."""
    if level not in ("layer", "block", "step"):
        raise ValueError(f"level must be step, layer or block, not {level!r}")
    if level == "step":
        return list(names)
    return [layer if level == "layer" else _block(layer) for _, layer in _classify(names)]


def group(steps: Sequence[Layer], level: str = "block") -> list[Layer]:
    """Rows at `level`, in order of first appearance: bytes and seconds summed; rounds summed over
    the row's steps with each step's stream twin counted once (the twins share their rounds)."""
    names = [s.name for s in steps]
    keys = layer_keys(names, level)
    seen: dict[tuple[str, str, str], int] = {}
    rows: dict[str, dict[str, Any]] = {}
    for key, (stream, layer), s in zip(keys, _classify(names), steps, strict=True):
        r = rows.setdefault(key, {"ops": [], "b0": 0, "b1": 0, "rounds": {}, "seconds": 0.0, "n": 0})
        if s.ops[0] not in r["ops"]:
            r["ops"].append(s.ops[0])
        r["b0"] += s.bytes_per_server[0]
        r["b1"] += s.bytes_per_server[1]
        r["seconds"] += s.seconds
        r["n"] += 1
        # the k-th step of this op in this layer is the same step in either stream
        k = seen.get((stream, layer, s.ops[0]), 0)
        seen[(stream, layer, s.ops[0])] = k + 1
        twin = (layer, s.ops[0], k) if level != "step" else (s.name, "", 0)
        r["rounds"][twin] = max(r["rounds"].get(twin, 0), s.rounds)
    return [Layer(k, tuple(r["ops"]), (r["b0"], r["b1"]), sum(r["rounds"].values()), r["seconds"], r["n"])
            for k, r in rows.items()]


def residuals(summary: Summary) -> tuple[float, tuple[int, int]]:
    """(online seconds not spent computing a step, bytes not in a step's payload) per server."""
    secs = summary.broken_down_seconds - sum(s.seconds for s in summary.steps)
    b = tuple(summary.bytes_per_server[i] - sum(s.bytes_per_server[i] for s in summary.steps) for i in (0, 1))
    return secs, (b[0], b[1])


# --- Markdown ------------------------------------------------------------------------------


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 1e6:,.2f}"


def _s(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def totals_table(summary: Summary) -> str:
    """The headline figures as a two-column Markdown table."""
    rows = [
        ("online seconds", _s(summary.online_seconds)),
        ("MB sent by server_a / server_b", f"{_mb(summary.bytes_per_server[0])} / {_mb(summary.bytes_per_server[1])}"),
        ("rounds", str(summary.rounds)),
        ("offline: dealer MB", _mb(summary.dealer_bytes)),
        ("offline: seconds", _s(summary.offline_seconds)),
        ("plaintext seconds (same fused model)", _s(summary.plaintext_seconds, 4)),
        ("abs(p_secure - p_plain)", "-" if summary.abs_error is None else f"{summary.abs_error:.2e}"),
    ]
    lan = summary.extras.get("lan")
    if isinstance(lan, Mapping):
        rows.append(("links", f"{lan.get('rate', '?')} (tc tbf), one network namespace per party"))
        rtt = lan.get("rtt_ms")
        if rtt is not None:
            rows.append(("measured RTT server_a <-> server_b (ms)", f"{float(rtt):.3f}"))
        est = lan.get("estimate")
        if isinstance(est, Mapping):
            rows.append((f"ESTIMATE: online seconds at {est['rtt_ms']:g} ms RTT",
                         f"{est['online_seconds']:.3f} (= online + rounds x (RTT - measured RTT); not measured)"))
    out = ["| figure | value |", "|---|---:|"]
    out += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(out)


def layer_table(summary: Summary, level: str = "block") -> str:
    """Per row at `level`: online compute seconds, MB sent by each server, rounds; then the
    residual rows and the totals (bytes and seconds add up to the totals)."""
    rows = group(summary.steps, level)
    wait_s, framing = residuals(summary)
    out = ["| layer | ops | online s | MB server_a | MB server_b | rounds |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r.name} | {' '.join(r.ops)} | {r.seconds:.3f} | {_mb(r.bytes_per_server[0])} | "
                   f"{_mb(r.bytes_per_server[1])} | {r.rounds} |")
    out.append(f"| waiting for network and peer | | {wait_s:.3f} | | | |")
    out.append(f"| message framing | | | {_mb(framing[0])} | {_mb(framing[1])} | |")
    out.append(f"| **total** | | **{summary.broken_down_seconds:.3f}** | **{_mb(summary.bytes_per_server[0])}** | "
               f"**{_mb(summary.bytes_per_server[1])}** | **{summary.rounds}** |")
    return "\n".join(out)


def op_table(summary: Summary) -> str:
    """Per secure operation (relu, linear, maxpool, ...): steps, compute seconds, MB per server."""
    ops: dict[str, list[float]] = {}
    for s in summary.steps:
        o = ops.setdefault(s.ops[0], [0, 0.0, 0, 0])
        o[0] += 1
        o[1] += s.seconds
        o[2] += s.bytes_per_server[0]
        o[3] += s.bytes_per_server[1]
    out = ["| op | steps | online s | MB server_a | MB server_b |", "|---|---:|---:|---:|---:|"]
    for name, (n, sec, b0, b1) in sorted(ops.items(), key=lambda kv: -kv[1][2]):
        out.append(f"| {name} | {int(n)} | {sec:.3f} | {_mb(int(b0))} | {_mb(int(b1))} |")
    return "\n".join(out)


def _which_inference(summary: Summary) -> list[str]:
    if summary.breakdown_seconds is None:
        return []
    n = summary.extras.get("images")
    return ["", f"The breakdown is of the last inference (online {summary.breakdown_seconds:.3f} s); the "
                f"figures above are medians over {n if n is not None else 'all'} inferences."]


def markdown(summary: Summary, level: str = "block", plot_note: str | None = None) -> str:
    """The whole report as Markdown."""
    parts = [f"# {summary.title}", "", totals_table(summary), ""]
    if summary.steps:
        parts += [f"## Per {level}", "",
                  "Online seconds are each row's compute; the time spent waiting for the network and the "
                  "peer is its own row. Rounds are those a row took part in: steps that run side by side "
                  "(the two streams, independent branches) share rounds, so only the total counts messages.",
                  *_which_inference(summary), "", layer_table(summary, level), "", "## Per operation", "",
                  op_table(summary), ""]
    if plot_note:
        parts += [plot_note, ""]
    return "\n".join(parts)


# --- plot ----------------------------------------------------------------------------------


def plot(summary: Summary, path: Path, level: str = "block") -> bool:
    """Bar charts of online seconds (compute + one bar for waiting), MB per server and rounds per
    row. Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = group(summary.steps, level)
    wait_s, _ = residuals(summary)
    names = [r.name for r in rows] + ["(waiting)"]
    secs = [r.seconds for r in rows] + [max(wait_s, 0.0)]
    mb_a = [r.bytes_per_server[0] / 1e6 for r in rows] + [0.0]
    mb_b = [r.bytes_per_server[1] / 1e6 for r in rows] + [0.0]
    rounds = [r.rounds for r in rows] + [0]
    y = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.32 * len(names) + 2.0), sharey=True)
    axes[0].barh(y, secs, color="tab:blue")
    axes[0].set_xlabel("online seconds")
    h = 0.4
    axes[1].barh([v - h / 2 for v in y], mb_a, height=h, label="server_a", color="tab:orange")
    axes[1].barh([v + h / 2 for v in y], mb_b, height=h, label="server_b", color="tab:green")
    axes[1].set_xlabel("MB sent")
    axes[1].legend(loc="lower right")
    axes[2].barh(y, rounds, color="tab:purple")
    axes[2].set_xlabel("rounds taken part in")
    axes[0].set_yticks(y, names)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{summary.title}: online {summary.online_seconds:.2f} s, "
                 f"{summary.bytes_per_server[0] / 1e6:.1f} MB per server, {summary.rounds} rounds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(data: Mapping[str, Any], out_dir: Path, name: str = "e2e", level: str = "block",
                 title: str | None = None) -> dict[str, Path]:
    """Write OUT/NAME.json, OUT/NAME.md and OUT/NAME.png (the plot only with matplotlib)."""
    summary = summarize(data, title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    png = out_dir / f"{name}.png"
    note = None
    if summary.steps and plot(summary, png, level):
        paths["png"] = png
        note = f"![where time and bytes go]({png.name})"
    elif summary.steps:
        note = "Plot skipped: matplotlib is not installed (`pip install 'secdfd[bench]'`)."
    paths["md"].write_text(markdown(summary, level, note))
    return paths


def compare_table(results: Sequence[Mapping[str, Any]]) -> str:
    """One row per benchmark result (model, size, links): the headline figures side by side."""
    out = ["| model | size | links | online s | MB per server | rounds | dealer MB | offline s | plaintext s "
           "| RTT ms |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for data in results:
        s = summarize(data)
        lan = data.get("lan")
        links = f"{lan['rate']} (tbf)" if isinstance(lan, Mapping) else "loopback"
        rtt = f"{float(lan['rtt_ms']):.3f}" if isinstance(lan, Mapping) else "-"
        out.append(f"| {data.get('model', '?')} | {data.get('size', '?')} | {links} | {s.online_seconds:.2f} | "
                   f"{_mb(s.bytes_per_server[0])} | {s.rounds} | {_mb(s.dealer_bytes)} | {_s(s.offline_seconds, 2)} "
                   f"| {_s(s.plaintext_seconds, 3)} | {rtt} |")
    return "\n".join(out)


USAGE = """usage: python -m secdfd.common.bench.report RESULT.json OUT_DIR
       python -m secdfd.common.bench.report --compare RESULT.json...

Write OUT_DIR/NAME.json, NAME.md (totals, per block and per operation) and NAME.png (where the time
and the bytes go per block; needs matplotlib) for a result of `secdfd bench e2e|model --json`, or
print one table row per result with --compare."""


def _main(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if len(argv) >= 2 and argv[0] == "--compare":
        print(compare_table([json.loads(Path(a).read_text()) for a in argv[1:]]))
        return 0
    if len(argv) != 2:
        print(USAGE, file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text())
    for kind, p in write_report(data, Path(argv[1]), Path(argv[0]).stem).items():
        print(f"{kind}: {p}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
