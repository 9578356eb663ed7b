"""`secdfd-server`: the options both servers take, and the command that runs either one.

Each server's entry point (`python -m secdfd.server_a`, `python -m secdfd.server_b`) builds its
command with `server_command(ROLE)`. `secdfd-server --party a|b` (or SECDFD_SERVER_PARTY, as the
compose file sets it) runs that entry point as a program: the role's code is never imported here.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

import click

from secdfd.common import roster
from secdfd.common.cli.envvars import show_envvars
from secdfd.common.engine.randomness import MAX_BATCH
from secdfd.common.errors import ModelError
from secdfd.common.service import deployment
from secdfd.common.service.server import ServerBase, ServerConfig
from secdfd.common.service.startup import run_process

CONTEXT = {"auto_envvar_prefix": "SECDFD_SERVER", "help_option_names": ["-h", "--help"]}


def server_command(role: type[ServerBase]) -> click.Command:
    """The click command that runs `role` (server_a's Leader or server_b's Follower)."""
    me = roster.server(role.party_letter)

    @click.command("secdfd-server", context_settings=CONTEXT)
    @click.option("--party", type=click.Choice([me.letter]), default=me.letter, show_default=True,
                  help=f"Which server this is ({me.name} here).")
    @click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
                  help="Keys folder from `secdfd keys` (or this server's own subfolder).")
    @click.option("--weights", type=click.Path(path_type=Path), default=Path(f".secdfd/shares/{me.name}.weights"),
                  show_default=True, help="This server's weight share.")
    @click.option("--state", type=click.Path(path_type=Path), default=Path(f".secdfd/state/{me.name}"),
                  show_default=True, help="Folder of the used-bundle ledger.")
    @click.option("--listen", default=roster.endpoint(me.name), show_default=True, help="Client endpoint to bind.")
    @click.option("--peer", default=roster.endpoint("peer"), show_default=True,
                  help="Server-to-server endpoint: server_a binds it, server_b connects to it.")
    @click.option("--dealer", default=roster.endpoint(roster.DEALER), show_default=True, help="Dealer endpoint.")
    @click.option("--depth", type=click.IntRange(min=1), default=4, show_default=True,
                  help="Bundles kept ready, the one already prepared included (2 at least in effect).")
    @click.option("--timeout", type=float, default=60.0, show_default=True, help="Deadline of one round (s).")
    @click.option("--client-wait", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
                  help="How long a request is held for the client's other share (s).")
    @click.option("--queue-wait", type=click.FloatRange(min=0.1), default=120.0, show_default=True,
                  help="How long a request with both shares may wait for its turn (s); then Busy.")
    @click.option("--max-pending", type=click.IntRange(min=1), default=32, show_default=True,
                  help="Requests held at once, all clients together; beyond: Busy.")
    @click.option("--max-pending-per-client", type=click.IntRange(min=1), default=2, show_default=True,
                  help="Requests one client key may have held at once; beyond: Busy.")
    @click.option("--max-batch", type=click.IntRange(1, MAX_BATCH), default=4, show_default=True,
                  help="The most face crops one request may hold; they run as one secure session (the rounds "
                       "shared) on a batch bundle the dealer makes then. The dealer's --max-batch also bounds it.")
    @click.option("--threads", type=int, default=0, envvar=["SECDFD_SERVER_THREADS", "SECDFD_THREADS"],
                  help="CPU threads for torch [default: every core; `secdfd up` uses 1].")
    @click.option("--device", default="cpu", show_default=True, help="Where the ring arithmetic runs: cpu or cuda.")
    @click.option("--limbs", is_flag=True, default=None,
                  help="Use float64 limb ring products on CPU too, as CUDA always does (slower on CPU than "
                       "its default int64 matrix products; for checking the CUDA path without a GPU).")
    def command(party: str, keys: Path, weights: Path, state: Path, listen: str, peer: str, dealer: str,
                depth: int, timeout: float, client_wait: float, queue_wait: float, max_pending: int,
                max_pending_per_client: int, max_batch: int, threads: int, device: str, limbs: bool | None) -> None:
        try:
            deployment.check_device(device)
        except ModelError as e:
            raise click.UsageError(str(e)) from None
        if max_pending_per_client > max_pending:
            raise click.BadParameter("is more than --max-pending", param_hint="--max-pending-per-client")
        cfg = ServerConfig(party=party, keys=keys, weights=weights, state=state, listen=listen, peer=peer,
                           dealer=dealer, depth=depth, timeout=timeout, client_wait=client_wait,
                           queue_wait=queue_wait, max_pending_per_client=max_pending_per_client,
                           max_pending=max_pending, max_batch=max_batch, device=device, limbs=limbs or None)
        sys.exit(run_process(me.name, threads, role(cfg).run))

    command.help = f"Run {me.name}: {'the leader' if me.role == 0 else 'the follower'} of the two servers."
    return show_envvars(command)


def main() -> None:
    """`secdfd-server --party a|b [OPTIONS]`: run `python -m secdfd.server_<party>` with the options."""
    args = sys.argv[1:]
    party = os.environ.get("SECDFD_SERVER_PARTY")
    for i, a in enumerate(args):
        if a == "--party" and i + 1 < len(args):
            party = args[i + 1]
        elif a.startswith("--party="):
            party = a.split("=", 1)[1]
    if party is None or party not in roster.SERVER_ROLES:
        if any(a in ("-h", "--help") for a in args) or party is None:
            click.echo("Usage: secdfd-server --party a|b [OPTIONS]\n\n  Run server_a (--party a) or server_b "
                       "(--party b); `secdfd-server --party a --help` lists the options.\n  The party may "
                       "also come from SECDFD_SERVER_PARTY.", err=party is not None)
            sys.exit(0 if party is None and any(a in ("-h", "--help") for a in args) else 2)
        click.echo(f"Error: --party must be a or b, not {party!r}", err=True)
        sys.exit(2)
    module = roster.SERVER_ROLES[party].module
    sys.argv = [f"secdfd-server --party {party}", *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
