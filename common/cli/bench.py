"""`secdfd bench`: protocol, model, end-to-end and fidelity benchmarks (JSON with --json).

The measuring code lives in `secdfd.common.bench`; this module parses options and prints.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import click
import torch

from secdfd.common.bench import lan_e2e
from secdfd.common.bench.e2e import FIGURES, at_size, run_e2e
from secdfd.common.bench.fidelity import check_fidelity, proxy_images
from secdfd.common.bench.lan import LanError, parse_rate
from secdfd.common.bench.protocols import bench_model, bench_protocols
from secdfd.common.bench.report import write_report
from secdfd.common.engine.randomness import MAX_BATCH
from secdfd.common.errors import SecDFDError
from secdfd.common.ml.export import load_deployable, read_deployable_meta
from secdfd.common.ml.factory import load_factory
from secdfd.common.service import local

_OWN = ("lan", "lan_rtt_ms", "report", "as_json")


def check_model_name(model: str) -> None:
    """A registered architecture or an existing file: anything else is a usage error naming both."""
    from secdfd.common.ml.dfdnet import MODELS

    if model not in MODELS and not Path(model).is_file():
        known = ", ".join(sorted(MODELS))
        raise click.BadParameter(f"{model!r} is neither a known model ({known}) nor a model file", param_hint="--model")


def lan_options(f: Any, e2e: bool = True) -> Any:
    """The options this module adds to `secdfd bench e2e`: --lan, --lan-rtt-ms, --report. `bench load`
    (e2e=False) takes --lan; it refuses the other two with a usage error, and its --help omits them."""
    f = click.option("--report", type=click.Path(path_type=Path, file_okay=False), default=None, hidden=not e2e,
                     help="Write DIR/e2e.json, DIR/e2e.md (tables) and DIR/e2e.png (plot; needs matplotlib).")(f)
    f = click.option("--lan-rtt-ms", type=float, default=None, hidden=not e2e,
                     help="With --lan: also report an ESTIMATE of the online time at this round-trip time.")(f)
    return click.option("--lan", default=None, metavar="RATE",
                        help="Run each party in its own network namespace, links shaped to RATE "
                             "(e.g. 1gbit, 10gbit); needs root.")(f)


def inner_command(ctx: click.Context) -> list[str]:
    """The command line of `ctx`'s command with its own options but not the LAN ones, plus --json."""
    argv: list[str] = []
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in _OWN or param.name is None:
            continue
        value = ctx.params.get(param.name)
        if param.is_flag:
            if value:
                argv.append(param.opts[0])
        elif value is not None:
            argv += [param.opts[0], str(value)]
    path: list[str] = []
    c: click.Context | None = ctx
    while c is not None and c.parent is not None:  # the subcommand path below `secdfd`
        path.insert(0, c.info_name or c.command.name or "")
        c = c.parent
    return [*path, *argv, "--json"]


def check_lan_options(lan: str | None, lan_rtt_ms: float | None) -> None:
    """Usage errors for the LAN options, before anything starts."""
    if lan_rtt_ms is not None and not lan:
        raise click.UsageError("--lan-rtt-ms estimates from the RTT measured on the emulated LAN; add --lan RATE")
    if lan_rtt_ms is not None and lan_rtt_ms < 0:
        raise click.BadParameter("a round-trip time is not negative", param_hint="--lan-rtt-ms")
    if lan and os.environ.get(lan_e2e.ENV):
        raise click.UsageError(f"already running on an emulated LAN ({lan_e2e.ENV} is set); drop --lan")
    if lan:
        try:
            parse_rate(lan)
        except LanError as e:
            raise click.BadParameter(str(e), param_hint="--lan") from None



def _print(obj: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(obj, indent=2))
        return
    for k, v in obj.items():
        if k == "steps":
            continue
        click.echo(f"{k}: {v}")


@click.group("bench", short_help="Benchmarks: protocols, a model, the three-party service.")
def bench() -> None:
    """Benchmarks: protocols, a model in one process, the three-party service."""


@bench.command("protocols", short_help="Each protocol: seconds, bytes, rounds, error.")
@click.option("--elements", "-n", default=1_000_000, show_default=True, help="Elements per protocol.")
@click.option("--threads", default=1, show_default=True, help="torch threads per party thread.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def protocols_cmd(elements: int, threads: int, as_json: bool) -> None:
    """Per protocol (mul, trunc, relu, maxpool, sigmoid): seconds, bytes per party per element,
    rounds, dealer bytes per element and max abs error against the float reference."""
    if elements < 64:
        raise click.BadParameter("use at least 64 elements", param_hint="--elements")
    torch.set_num_threads(threads)
    res = bench_protocols(elements)
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        for name, r in res.items():
            click.echo(f"{name:8s} " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in r.items()))


@bench.command("model", short_help="A model FILE.py:FACTORY securely in one process.")
@click.argument("factory")
@click.option("--input-shape", default="1,3,128,128", show_default=True, help="Input shape, comma-separated.")
@click.option("--seed", default=0, show_default=True, help="Seed of the (public) test input.")
@click.option("--runs", default=1, show_default=True, help="Inferences; the fastest is reported.")
@click.option("--threads", default=1, show_default=True, help="torch threads per party thread.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the per-step breakdown).")
def model_cmd(factory: str, input_shape: str, seed: int, runs: int, threads: int, as_json: bool) -> None:
    """Evaluate FILE.py:FACTORY securely (both parties in this process) and compare with plaintext.

    JSON keys: seconds, bytes_per_party, rounds, dealer_bytes, max_abs_error, plaintext_seconds,
    offline_seconds, steps."""
    try:
        shape = tuple(int(s) for s in input_shape.split(","))
    except ValueError:
        raise click.BadParameter("expected integers like 1,3,128,128", param_hint="--input-shape") from None
    torch.set_num_threads(threads)
    try:
        res = bench_model(load_factory(factory), shape, seed, runs=runs)
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    _print(res, as_json)


@bench.command("e2e", short_help="Dealer and servers as processes: time, bytes, rounds.")
@click.option("--model", default="dfdnet-s", show_default=True, metavar="NAME|FILE",
              help="dfdnet-s: the embedded trained model; dfdnet: full width (random weights unless trained); or a "
                   "deployable FILE from `secdfd export` (a user's model too).")
@click.option("--size", type=int, default=None, help="Input size [default: 128, or the file's].")
@click.option("--images", type=int, default=3, show_default=True, help="Detections to run.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per process.")
@click.option("--depth", type=int, default=1, show_default=True, help="Bundles each server keeps ready.")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the scratch deployment [default: the system's temporary folder].")
@click.option("--batch", "batches", default=None, metavar="N[,N...]",
              help="Also run --images requests of N face crops each (one secure session per request, e.g. 1,4,16) "
                   "and report per-crop online seconds, bytes and rounds for each N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with the per-layer breakdown).")
@lan_options
@click.pass_context
def e2e(ctx: click.Context, model: str, size: int | None, images: int, threads: int, depth: int, work: Path | None,
        batches: str | None, as_json: bool, lan: str | None, lan_rtt_ms: float | None, report: Path | None) -> None:
    """Dealer, server_a and server_b as separate processes on loopback; figures per inference.

    JSON keys: online_seconds, bytes_per_server, rounds, dealer_bytes, offline_seconds,
    plaintext_seconds, abs_error (medians), inferences (each one), steps (per-layer breakdown).
    With --lan RATE each party runs in its own network namespace (see secdfd.common.bench.lan_e2e)
    and `lan` adds the rate, the measured RTT and, with --lan-rtt-ms, an estimate.
    """
    if images < 1:
        raise click.BadParameter("run at least one image", param_hint="--images")
    sizes = batch_sizes(batches)
    check_lan_options(lan, lan_rtt_ms)
    check_model_name(model)
    torch.set_num_threads(max(1, threads))
    try:
        if lan:  # this command again, as the client inside the LAN
            res = lan_e2e.run_in_lan(lan, lan_e2e.driver_argv(inner_command(ctx)), lan_rtt_ms)
        else:
            res = run_e2e(model, size, images, work, options=local.Options(threads=threads, depth=depth),
                          echo=lambda s: click.echo(s, err=True), launcher=lan_e2e.launcher(), batches=sizes)
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    if report is not None:
        size = res["size"]
        title = f"{model}, both streams, {size}x{size}, " + (f"LAN {lan}" if lan else "loopback")
        for path in write_report(res, report, "e2e", title=title).values():
            click.echo(f"report: {path}", err=True)
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    click.echo(f"{model} at {res['size']}x{res['size']}, {weights_line(res)}")
    for k in FIGURES:
        v = res[k]
        click.echo(f"  {k:18s} {v if not isinstance(v, float) else f'{v:.4g}'}")
    for line in lan_e2e.lan_lines(res):
        click.echo(line)
    for b in res.get("batches", []):
        click.echo(f"  batch {b['batch']:3d}: {b['online_seconds_per_crop']:.3g} s online per crop, "
                   f"{b['bytes_per_crop'][0] / 1e6:.1f} MB per crop per server, {b['rounds']} rounds per session")


def batch_sizes(text: str | None) -> tuple[int, ...]:
    """`--batch 1,4,16` as (1, 4, 16); a usage error names what is wrong."""
    if text is None:
        return ()
    try:
        sizes = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of batch sizes (e.g. 1,4,16)",
                                 param_hint="--batch") from None
    bad = [n for n in sizes if not 1 <= n <= MAX_BATCH]
    if bad:
        raise click.BadParameter(f"batch sizes are 1 to {MAX_BATCH}, not {bad[0]}", param_hint="--batch")
    return sizes


@bench.command("fidelity", short_help="Secure vs plaintext fake probability per image.")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder with real/ and fake/ (e.g. the proxy set from `secdfd data synth`).")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="val", show_default=True,
              help="Which files of --data: the held-out split of the training folder, or all.")
@click.option("--images", type=int, default=50, show_default=True, help="Images to compare (classes alternate).")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Deployable model [default: the embedded model].")
@click.option("--size", type=int, default=None, help="Input size [default: the model's].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with every image's figures).")
def fidelity_cmd(data: Path, split: str, images: int, model_path: Path | None, size: int | None,
                 as_json: bool) -> None:
    """Secure vs plaintext fused fake probability per image, through dealer and servers as processes.

    Exit status 1 unless every |p_secure - p_plain| <= 1e-3 and every verdict agrees.
    """

    if images < 1:
        raise click.BadParameter("compare at least one image", param_hint="--images")
    torch.set_num_threads(1)
    try:
        meta = read_deployable_meta(model_path)
        model = at_size(load_deployable(model_path), meta.arch, size or meta.size)
        res = check_fidelity(model, meta.arch, proxy_images(data, split, images, size or meta.size))
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"{res['images']} images ({split} split of {data}), {res['model']} at {res['size']}: "
                   f"max |p_secure - p_plain| {res['max_abs_error']:.2e}, mean {res['mean_abs_error']:.2e}, "
                   f"verdicts agree {res['verdicts_agree']}/{res['images']}, median online "
                   f"{res['online_seconds']:.2f} s: {'PASS' if res['passed'] else 'FAIL'}")
    if not res["passed"]:
        raise SystemExit(1)


def weights_line(res: dict[str, Any]) -> str:
    n = res["images"]
    return (f"{res['weights']}; medians over {n} inference{'s' if n != 1 else ''}, "
            f"{res['threads']} thread(s) per process")


@bench.command("load", short_help="Many clients at once against dealer and servers.")
@click.option("--clients", type=click.IntRange(min=1), default=4, show_default=True,
              help="Client processes, each with its own key, sending at once.")
@click.option("--requests", type=click.IntRange(min=1), default=None,
              help="Requests in total, shared among the clients.")
@click.option("--duration", default=None, metavar="TIME",
              help="Instead of --requests: keep sending for TIME (90s, 10m, 1h): a soak run.")
@click.option("--model", type=click.Choice(["dfdnet", "dfdnet-s"]), default="dfdnet-s", show_default=True,
              help="Model served: dfdnet-s (the embedded weights) or dfdnet (freshly initialised weights).")
@click.option("--size", type=int, default=128, show_default=True, help="Input size.")
@click.option("--threads", type=int, default=1, show_default=True, help="torch threads per process.")
@click.option("--depth", type=int, default=2, show_default=True, help="Bundles each server keeps ready.")
@click.option("--max-pending", type=click.IntRange(min=1), default=None,
              help="The servers' bound on held requests (their default if not given).")
@click.option("--work", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder for the scratch deployment [default: the system's temporary folder].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@functools.partial(lan_options, e2e=False)
@click.pass_context
def load_cmd(ctx: click.Context, clients: int, requests: int | None, duration: str | None, model: str, size: int,
             threads: int, depth: int, max_pending: int | None, work: Path | None, as_json: bool, lan: str | None,
             lan_rtt_ms: float | None, report: Path | None) -> None:
    """Many clients at once against dealer and servers as processes: throughput, latency
    percentiles, errors by kind, every verdict checked against plaintext, peak memory; with
    --duration, memory and descriptor slopes of every party after warm-up (a soak run).

    JSON keys: throughput_per_minute, latency_seconds (p50, p95, max), answered, verdicts_wrong,
    errors, busy_retries, peak_rss_mb, slopes, ledgers. With --lan RATE the parties run in their own
    network namespaces and the clients on the LAN (see `bench e2e`).
    """
    from secdfd.common.bench.load import LoadError, LoadPlan, parse_duration, run_load

    if lan_rtt_ms is not None:
        raise click.UsageError("--lan-rtt-ms is for `bench e2e` (an estimate of one inference's online time)")
    check_lan_options(lan, lan_rtt_ms)
    if report is not None:
        raise click.UsageError("--report is for `bench e2e`")
    torch.set_num_threads(max(1, threads))
    extra = () if max_pending is None else ("--max-pending", str(max_pending),
                                            "--max-pending-per-client", str(min(2, max_pending)))
    try:
        plan = LoadPlan(clients, requests, None if duration is None else parse_duration(duration), model, size)
        if lan:
            res = lan_e2e.run_in_lan(lan, lan_e2e.driver_argv(inner_command(ctx)))
        else:
            res = run_load(plan, work, lan_e2e.launcher(),
                           local.Options(threads=threads, depth=depth, extra=extra),
                           echo=lambda s: click.echo(s, err=True))
    except (SecDFDError, LoadError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    lat = res["latency_seconds"]
    click.echo(f"{res['answered']} of {res['requests']} requests answered in {res['duration_seconds']:.1f} s by "
               f"{res['clients']} clients: {res['throughput_per_minute']:.1f} inferences per minute; latency p50 "
               f"{lat['p50']:.2f} s, p95 {lat['p95']:.2f} s, max {lat['max']:.2f} s; {res['verdicts_wrong']} wrong "
               f"verdicts; errors {res['errors'] or 'none'}; busy retries {res['busy_retries']}")
    click.echo("peak RSS MB: " + ", ".join(f"{k} {v}" for k, v in res["peak_rss_mb"].items()))
    for name, s in res["slopes"].items():
        click.echo(f"  {name:9s} RSS {s['rss_mb_per_hour']:+.1f} MB/h (last half "
                   f"{s['rss_mb_per_hour_last_half']:+.1f}; mean by quarter {s['rss_mb_mean_by_quarter']} MB), "
                   f"descriptors {s['fds_per_hour']:+.1f}/h")
    click.echo(f"ledgers {'consistent' if res['ledgers']['consistent'] else 'NOT consistent'}: {res['ledgers']}")
