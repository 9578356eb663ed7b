"""The client (`secdfd-client detect IMAGE...`): share each image, ask both servers, print the verdict.

The client session itself is `secdfd.common.service.client.Client`; this is its command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from secdfd.common import roster
from secdfd.common.errors import SecDFDError
from secdfd.common.service.client import Client, ClientConfig


@click.group("secdfd-client", context_settings={"auto_envvar_prefix": "SECDFD_CLIENT",
                                                "help_option_names": ["-h", "--help"]})
def main() -> None:
    """SecDFD client: detect DeepFake faces without showing the image to anybody."""


@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              envvar="SECDFD_CLIENT_KEYS", help="Keys folder from `secdfd keys` (or the client's own subfolder).")
@click.option("--server-a", default=roster.endpoint(roster.SERVER_A), show_default=True,
              envvar="SECDFD_CLIENT_SERVER_A", help="server_a endpoint.")
@click.option("--server-b", default=roster.endpoint(roster.SERVER_B), show_default=True,
              envvar="SECDFD_CLIENT_SERVER_B", help="server_b endpoint.")
@click.option("--timeout", type=float, default=120.0, show_default=True, envvar="SECDFD_CLIENT_TIMEOUT",
              help="Deadline per request (s).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image.")
def detect(images: tuple[Path, ...], keys: Path, server_a: str, server_b: str, timeout: float,
           as_json: bool) -> None:
    """Print real/fake, the fused fake probability, the online time and the bytes for each IMAGE."""
    try:
        client = Client(ClientConfig(keys, server_a, server_b, timeout))
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    failed = 0
    try:
        for path in images:
            try:
                r = client.detect(path)
            except SecDFDError as e:
                failed += 1
                where = "" if str(e).startswith(str(path)) else f"{path}: "
                click.echo(f"Error: {where}{e}", err=True)
                continue
            if as_json:
                click.echo(json.dumps(r))
            else:
                mb = [b / 1e6 for b in r["bytes_per_server"]]
                click.echo(f"{path}: {r['verdict']} (p_fake {r['p_fake']:.4f}), {r['online_seconds']:.2f} s online "
                           f"({r['seconds']:.2f} s waited), {mb[0]:.1f} / {mb[1]:.1f} MB sent by server_a / "
                           f"server_b, {r['rounds']} rounds")
    finally:
        client.close()
    if failed:
        sys.exit(1)
