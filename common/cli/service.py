"""Commands of the service area: `keys`, `share`, `up`, `down`, `status` (and `bench e2e`, `bench fidelity`).

User mistakes end as one-line click errors with a non-zero exit, never as tracebacks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import click

from secdfd.common import roster
from secdfd.common.errors import SecDFDError
from secdfd.common.net.keys import admit, make_keys, make_party_keys, revoke
from secdfd.common.roster import PARTIES, PROCESSES
from secdfd.common.service import health, local
from secdfd.common.service.deployment import check_device, read_info
from secdfd.common.service.local import DeploymentError

_STATE = click.option("--state", "state", type=click.Path(path_type=Path), default=Path(".secdfd"),
                      show_default=True, envvar="SECDFD_STATE",
                      help="State folder of the local deployment (keys, shares, ledgers, logs).")


@click.group("keys", invoke_without_command=True, short_help="Make CURVE keypairs; admit and revoke peers.")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              help="Folder for the keys; each party gets its own subfolder.")
@click.option("--force", is_flag=True, help="Replace existing keys (every party then needs its new folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the folders and public keys as JSON.")
@click.pass_context
def keys_cmd(ctx: click.Context, out: Path, force: bool, as_json: bool) -> None:
    """Make CURVE keypairs: every party's at once (one machine), or one party's on its own machine.

    Without a subcommand: keypairs for the dealer, both servers and the client under OUT, one
    folder per party (OUT/<party>/: its secret key, mode 600, the public keys of the servers it
    connects to, the allow-lists of the sockets it listens on). All secrets are then in one place:
    fine for one machine (`secdfd up`), not for parties run by different operators. There, each
    operator runs `secdfd keys new PARTY` on its own machine and `secdfd keys admit` for each peer.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        folders = make_keys(out, force=force)
    except (SecDFDError, OSError) as e:
        raise click.ClickException(str(e)) from None
    publics = {p: (out / "public" / f"{p}.key") for p in PARTIES}
    if as_json:
        click.echo(json.dumps({"out": str(out), "folders": {p: str(f) for p, f in folders.items()},
                               "public": {p: str(f) for p, f in publics.items()}}))
        return
    for party in PARTIES:
        click.echo(f"{party:9s} {folders[party]}")
    click.echo(f"public keys: {out / 'public'}")


@keys_cmd.command("new", short_help="Make one party's keypair on its own machine.")
@click.argument("party", type=click.Choice(list(PARTIES)))
@click.option("--out", "home", type=click.Path(path_type=Path), required=True,
              help="This party's key folder on its own machine (give the process --keys FOLDER).")
@click.option("--force", is_flag=True, help="Replace an existing keypair (every peer must admit the new key).")
def keys_new_cmd(party: str, home: Path, force: bool) -> None:
    """Make PARTY's own keypair in a folder on its own machine; prints the public key file to hand
    to the other operators. The secret key never leaves the folder."""
    try:
        public = make_party_keys(home, party, force)
    except (SecDFDError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{party} keys in {home}; hand {public} to the operators of the parties it talks to")


@keys_cmd.command("admit", short_help="Admit a peer's public key into this party's folder.")
@click.argument("public_key", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--keys", "home", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="This party's key folder (from `secdfd keys new`).")
@click.option("--party", type=click.Choice(list(PARTIES)), required=True, help="Which party this folder is.")
@click.option("--name", default=None,
              help="The peer's name: dealer, server_a, server_b, or any name for a client [default: the file's name].")
def keys_admit_cmd(public_key: Path, home: Path, party: str, name: str | None) -> None:
    """Admit a peer's PUBLIC_KEY: as a server this party connects to, and into the allow-list of
    each of this party's sockets the peer connects to. Running servers take it within seconds."""
    try:
        written = admit(home, party, public_key, name)
    except (SecDFDError, OSError) as e:
        raise click.ClickException(str(e)) from None
    for f in written:
        click.echo(f"wrote {f}")


@keys_cmd.command("revoke")
@click.argument("name")
@click.option("--keys", "home", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="This party's key folder.")
def keys_revoke_cmd(name: str, home: Path) -> None:
    """Remove peer NAME from every allow-list of this party. Running servers refuse it within
    seconds, also on connections it already has."""
    removed = revoke(home, name)
    if not removed:
        raise click.ClickException(f"no allow-list in {home} holds {name}.key")
    for f in removed:
        click.echo(f"removed {f}")


@click.command("share", short_help="Split a deployable model into two weight shares.")
@click.argument("model", type=click.Path(path_type=Path), required=False, envvar="SECDFD_SHARE_MODEL")
@click.option("--out", "out", type=click.Path(path_type=Path), default=Path(".secdfd/shares"), show_default=True,
              help="Folder for server_a.weights, server_b.weights and model.json.")
@click.option("--seal", "seal", multiple=True, metavar="SERVER=PUBLIC_KEY",
              help="Seal SERVER's share to its public key file (only that server can open it); repeat for both.")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON.")
def share_cmd(model: Path | None, out: Path, seal: tuple[str, ...], as_json: bool) -> None:
    """Split a deployable MODEL (from `secdfd export`; omit it for the embedded model) into weight shares.

    Writes one share file per server (give server_a only server_a.weights, server_b only
    server_b.weights; either alone is uniformly random) and model.json, the public model info
    (architecture, input size, number format, the split id) for the dealer and both servers. Every
    run is a new split: the dealer and both servers must all get the files of the same run.
    """
    recipients: dict[str, Path] = {}
    for item in seal:
        server, _, key_file = item.partition("=")
        if server not in roster.SERVERS or not key_file:
            raise click.BadParameter(f"give SERVER=PUBLIC_KEY with SERVER one of {', '.join(roster.SERVERS)}",
                                     param_hint="--seal")
        recipients[server] = Path(key_file)
    try:
        paths = share_model(model, out, recipients)
    except (SecDFDError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps({k: str(v) for k, v in paths.items()}))
        return
    for name, path in paths.items():
        click.echo(f"{name:9s} {path}")


def share_model(model: Path | None, out: Path, seal: dict[str, Path] | None = None) -> dict[str, Path]:
    """`deployment.share_model`, with a clear message when the embedded default is missing."""
    from secdfd.common.errors import ModelError
    from secdfd.common.ml.export import DEFAULT_MODEL
    from secdfd.common.service import deployment

    if model is None and not DEFAULT_MODEL.is_file():
        raise ModelError(f"no embedded model in this installation ({DEFAULT_MODEL}); give a deployable "
                         "model file from `secdfd export`")
    return deployment.share_model(model, out, seal=seal)


def _endpoint_options(f: Any) -> Any:
    d = local.Endpoints()
    for name, default, what in (("peer", d.peer, "server_a <-> server_b endpoint"),
                                ("server-b", d.server_b, "server_b's client endpoint"),
                                ("server-a", d.server_a, "server_a's client endpoint"),
                                ("dealer", d.dealer, "dealer endpoint")):
        f = click.option(f"--{name}", default=default, show_default=True, help=what)(f)
    return f


@click.command("up", short_help="Start dealer and both servers on this machine.")
@_STATE
@click.option("--model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Deployable model to serve (from `secdfd export`); if another one is served, its shares are "
                   "made anew and the parties restarted [default: what is served, the embedded model at first].")
@click.option("--embedded", is_flag=True, help="Serve the embedded model again (after --model FILE).")
@_endpoint_options
@click.option("--threads", type=int, default=1, show_default=True, envvar="SECDFD_THREADS",
              help="torch threads per process (the three share this machine).")
@click.option("--depth", type=click.IntRange(min=1), default=2, show_default=True,
              help="Bundles each server keeps ready (the prepared one included).")
@click.option("--device", default="cpu", show_default=True, help="Servers' device: cpu or cuda.")
@click.option("--limbs", is_flag=True, help="Float64 limb ring products on CPU too, as CUDA does (slower).")
@click.option("--wait", type=float, default=600.0, show_default=True, help="Seconds to wait for readiness.")
def up_cmd(state: Path, model: Path | None, embedded: bool, dealer: str, server_a: str, server_b: str, peer: str,
           threads: int, depth: int, device: str, limbs: bool, wait: float) -> None:
    """Start dealer, server_a and server_b in the background on this machine, ready for clients.

    Like `docker compose up`: run again, it starts only the parties that are stopped. On first use
    it makes the keys and the weight shares of the embedded model in the state folder (all parties'
    secrets in one folder: a convenience for one machine). With --model FILE (or --embedded) that
    is not what is served, it makes new shares (a new split) and restarts all three.
    """
    layout = local.Layout(state)
    endpoints = local.Endpoints(dealer, server_a, server_b, peer)
    if model is not None and embedded:
        raise click.UsageError("give --model FILE or --embedded, not both")
    try:
        check_device(device)  # before anything is made
        started = _up(layout, endpoints, local.Options(threads, depth, device, limbs), model, embedded, wait)
        info = read_info(layout.model_info)
    except (SecDFDError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"SecDFD is up: {info.describe()}, state in {state}")
    source = _source(layout)
    if source:
        click.echo(f"  model    {source['file']} (sha256 {source['sha256'][:16]}...)"
                   + ("" if source["file"] == "embedded" else "; back to the embedded one: secdfd up --embedded"))
    for s in started:
        click.echo(f"  {s.launch.name:9s} {s.launch.endpoint:24s} pid {s.pid:<7d} log {s.log}")
    click.echo("Detect an image:  " + client_command(layout, endpoints) + " IMAGE... [--json]")
    click.echo("Stop:             secdfd down" + ("" if state == Path(".secdfd") else f" --state {state}"))


def _up(layout: local.Layout, endpoints: local.Endpoints, options: local.Options, model: Path | None,
        embedded: bool, wait: float) -> list[local.Started]:
    recorded = local.read_processes(layout)
    running = [s for s in recorded if s.alive()]
    wanted = _wanted_source(model, embedded)
    served = _source(layout)
    reshare = not layout.model_info.is_file() or (wanted is not None and wanted != served)
    if reshare and running:
        click.echo(f"stopping {', '.join(local.stop(running))}: a new model is to be served")
        running = []
    if not running:  # all three start afresh: refuse taken ports before any key or share is made
        _refuse_taken_ports(endpoints)
    if not (layout.keys / "client" / "client.key_secret").is_file():
        make_keys(layout.keys)
        click.echo(f"keys made in {layout.keys}")
    if reshare:
        source = wanted or {"file": "embedded", "sha256": _file_digest(None)}
        share_model(None if source["file"] == "embedded" else Path(source["file"]), layout.shares)
        layout.source.write_text(json.dumps(source) + "\n")
        click.echo(f"weight shares of {source['file']} made in {layout.shares} (a new split)")
    if running and len(running) == len(recorded) == len(PROCESSES):
        click.echo(f"already up ({', '.join(s.launch.name for s in running)}); `secdfd status` shows them")
        return running
    if running:  # some stopped: start those again as they were
        stopped = [s for s in recorded if not s.alive()]
        for s in stopped:
            click.echo(f"starting {s.launch.name} again (it had stopped: {local.last_line(s.log)})")
        again = local.start(layout, [s.launch for s in stopped])
        started = [*running, *again]
        started.sort(key=lambda s: PROCESSES.index(s.launch.name))
        local.write_processes(layout, started)
        local.wait_ready(started, layout.keys, wait)
        return started
    started = local.start(layout, local.launches(layout, endpoints, options))
    try:
        local.wait_ready(started, layout.keys, wait)
    except (SecDFDError, KeyboardInterrupt):
        local.stop(started)
        layout.processes.unlink(missing_ok=True)
        raise
    return started


def _refuse_taken_ports(endpoints: local.Endpoints) -> None:
    taken = local.ports_in_use(endpoints)
    if taken:
        raise DeploymentError(f"port in use: {', '.join(taken)}; stop what holds it (an earlier `secdfd up` "
                              "with another --state?) or choose other --dealer/--server-a/--server-b/--peer")


def _file_digest(path: Path | None) -> str:
    from secdfd.common.ml.export import DEFAULT_MODEL

    f = DEFAULT_MODEL if path is None else path
    try:
        return hashlib.sha256(f.read_bytes()).hexdigest()
    except OSError as e:
        raise DeploymentError(f"cannot read the model file {f}: {e.strerror}") from None


def _wanted_source(model: Path | None, embedded: bool) -> dict[str, str] | None:
    if embedded:
        return {"file": "embedded", "sha256": _file_digest(None)}
    if model is not None:
        return {"file": str(model.resolve()), "sha256": _file_digest(model)}
    return None


def _source(layout: local.Layout) -> dict[str, str] | None:
    try:
        data = json.loads(layout.source.read_text())
        return {"file": str(data["file"]), "sha256": str(data["sha256"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def client_command(layout: local.Layout, endpoints: local.Endpoints) -> str:
    """The `secdfd-client detect` command line for this deployment (defaults left out)."""
    d = local.Endpoints()
    parts = ["secdfd-client detect"]
    if layout.root != Path(".secdfd"):
        parts.append(f"--keys {layout.keys}")
    if endpoints.server_a != d.server_a:
        parts.append(f"--server-a {endpoints.server_a}")
    if endpoints.server_b != d.server_b:
        parts.append(f"--server-b {endpoints.server_b}")
    return " ".join(parts)


@click.command("down")
@_STATE
def down_cmd(state: Path) -> None:
    """Stop the processes started by `secdfd up`."""
    layout = local.Layout(state)
    try:
        stopped = local.stop(local.read_processes(layout))
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    layout.processes.unlink(missing_ok=True)
    click.echo(f"stopped {', '.join(stopped)}" if stopped else "nothing was running")


@click.command("status", short_help="Processes, model served, bundles, requests.")
@_STATE
@click.option("--json", "as_json", is_flag=True, help="Print JSON: the model served and each party's state.")
def status_cmd(state: Path, as_json: bool) -> None:
    """Show the processes of `secdfd up`: running or stopped (and why), each party's state, bundles
    ready, requests served and failed, the last error, and the model served. Exit 1 unless all run."""
    layout = local.Layout(state)
    try:
        procs = local.read_processes(layout)
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    rows = [_status_row(s) for s in procs]
    up = bool(rows) and all(r["running"] for r in rows)
    model = _served_model(layout)
    if as_json:
        click.echo(json.dumps({"up": up, "model": model, "processes": rows}))
    elif not rows:
        click.echo(f"nothing started from {state}; `secdfd up` starts dealer and servers")
    else:
        if model:
            click.echo(f"model: {model['describe']}")
        for r in rows:
            click.echo(_status_line(r))
    if not up:
        raise SystemExit(1)


def _status_row(s: local.Started) -> dict[str, Any]:
    row: dict[str, Any] = {"name": s.launch.name, "running": s.alive(), "pid": s.pid,
                           "endpoint": s.launch.endpoint, "log": str(s.log)}
    h = health.read(Path(s.launch.state)) if s.launch.state else None
    if h is not None:
        row.update({k: h[k] for k in ("state", "bundles_ready", "requests_served", "requests_failed", "last_error")
                    if k in h})
    if not row["running"]:
        row["state"] = "stopped"
        row["last_log_line"] = local.last_line(s.log)
    return row


def _status_line(r: dict[str, Any]) -> str:
    if not r["running"]:
        extra = f"stopped: {r['last_log_line']}"
    elif r["name"] == roster.DEALER:
        extra = r.get("state", "")
    else:
        extra = (f"{r.get('state', '?')}, {r.get('bundles_ready', 0)} bundles ready, "
                 f"{r.get('requests_served', 0)} served, {r.get('requests_failed', 0)} failed")
        if r.get("last_error"):
            extra += f"; last error: {r['last_error']}"
    running = "running" if r["running"] else "stopped"
    return f"{r['name']:9s} {running:8s} pid {r['pid']:<7d} {r['endpoint']:24s} {extra}"


def _served_model(layout: local.Layout) -> dict[str, Any] | None:
    """The model of the deployment's shares (model.json, and the file they came from), if any."""
    try:
        info = read_info(layout.model_info)
    except SecDFDError:
        return None
    source = _source(layout) or {}
    return {"arch": info.arch, "size": info.size, "split": info.split, "file": source.get("file"),
            "sha256": source.get("sha256"),
            "describe": info.describe() + (f", from {source['file']}" if source else "")}
