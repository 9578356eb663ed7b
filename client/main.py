"""The client (`secdfd-client detect IMAGE...`): share the image, ask both servers, print the verdict.

Per image: load with Pillow (any common format, converted to RGB, bombs refused), resize to the
servers' input size, encode in fixed point, split into two shares with the CSPRNG, send share i to
server i under one fresh session id (both requests in flight at once), add the two output shares
and decode the fused fake probability. Only this process ever sees the image or the verdict.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import zmq

from secdfd.common import deployment
from secdfd.common.errors import PeerTimeout, ProtocolError, SecDFDError
from secdfd.common.keys import load_party
from secdfd.common.transport import Node, Pending, Requester
from secdfd.common.wire import Message

THRESHOLD = 0.5


@dataclass(frozen=True)
class ClientConfig:
    keys: Path
    server_a: str
    server_b: str
    timeout: float = 120.0


class Client:
    """A connection to both servers; `detect` one image at a time."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.node = Node(load_party(config.keys, "client"))
        try:
            self.servers = (Requester(self.node, config.server_a, "server_a", config.timeout),
                            Requester(self.node, config.server_b, "server_b", config.timeout))
            infos = [r.request("info", timeout=min(config.timeout, 10.0)).meta for r in self.servers]
        except BaseException:
            self.node.close()  # an open ZeroMQ context would block garbage collection
            raise
        a, b = ((i["model"], i["input_size"], i["frac_bits"]) for i in infos)
        if a != b:
            self.node.close()
            raise ProtocolError(f"server_a serves {a[0]} at {a[1]}, server_b {b[0]} at {b[1]}; "
                                "both must be provisioned from the same model")
        self.info = deployment.ModelInfo(a[0], a[1], a[2])

    def close(self) -> None:
        self.node.close()

    def detect(self, path: Path, breakdown: bool = False) -> dict[str, Any]:
        """Load, share and detect one image file (see `detect_tensor`)."""
        from secdfd.common.data import load_image

        return self.detect_tensor(load_image(path, self.info.size), str(path), breakdown)

    def detect_tensor(self, x: torch.Tensor, name: str = "", breakdown: bool = False) -> dict[str, Any]:
        """The verdict for x, (1, 3, size, size) in [0, 1], with the figures of this inference.

        `seconds` is what this client waited (sharing excluded); `online_seconds` the servers'
        online phase; `offline_seconds` the dealer's generation plus the servers' preparation of
        the bundle, done before the request. With `breakdown`, `steps` lists each plan step's
        bytes per server, rounds and seconds.
        """
        x0, x1 = deployment.share_image(x, self.info)
        sid = secrets.token_hex(16)
        t0 = time.perf_counter()
        pending = [r.start("detect", tensors=[s], sid=sid) for r, s in zip(self.servers, (x0, x1), strict=True)]
        replies = self._finish(pending)
        seconds = time.perf_counter() - t0
        p_fake = deployment.fake_probability(replies[0].tensors[0], replies[1].tensors[0], self.info)
        reports = [dict(r.meta["report"]) for r in replies]
        dealer_s = max(float(r["dealer_seconds"]) for r in reports)  # the first to ask waited for both halves
        prepare_s = [float(r["prepare_seconds"]) for r in reports]
        out: dict[str, Any] = {
            "file": name,
            "verdict": "fake" if p_fake >= THRESHOLD else "real",
            "p_fake": p_fake,
            "seconds": seconds,
            "online_seconds": max(float(r["seconds"]) for r in reports),
            "bytes_per_server": [int(r["bytes"]) for r in reports],
            "rounds": int(reports[0]["rounds"]),
            "offline_seconds": dealer_s + max(prepare_s),
            "dealer_seconds": dealer_s,
            "prepare_seconds": prepare_s,
            "dealer_bytes": sum(int(r["dealer_bytes"]) for r in reports),
            "bundle": int(reports[0]["bundle"]),
        }
        if breakdown:
            out["steps"] = merge_steps([list(r["steps"]) for r in reports])
        return out


    def _finish(self, pending: list[Pending]) -> list[Message]:
        """Both replies, waiting on both servers at once: the first failure ends the request (a
        server that lost its peer answers late or never). A deadline names the server(s) that did
        not answer (the deadlines coincide)."""
        poller = zmq.Poller()
        for r in self.servers:
            for sock in r.sockets:
                poller.register(sock, zmq.POLLIN)
        replies: list[Message | None] = [None, None]
        late: list[PeerTimeout] = []
        while any(m is None for m in replies) and not late:
            poller.poll(max(1, int((min(p.deadline for p in pending) - time.monotonic()) * 1000)))
            for i, (r, p) in enumerate(zip(self.servers, pending, strict=True)):
                if replies[i] is None:
                    try:
                        replies[i] = r.poll(p, time.monotonic())  # whatever has arrived, no waiting
                    except PeerTimeout as e:
                        late.append(e)
        if late and all(m is None for m in replies):  # the deadlines coincide: neither answered
            raise PeerTimeout(f"no answer from server_a nor server_b within {self.config.timeout:g} s at step detect; "
                              "check that both are running and reach each other")
        if late:
            raise late[0]
        return [m for m in replies if m is not None]


def merge_steps(per_server: list[list[Any]]) -> list[dict[str, Any]]:
    """Both servers' step lists ([index, name, op, bytes, rounds, seconds] each) as one breakdown."""
    merged: dict[int, dict[str, Any]] = {}
    for role, steps in enumerate(per_server):
        for index, name, op, nbytes, rounds, secs in steps:
            row = merged.setdefault(int(index), {"name": name, "op": op, "bytes_per_server": [0, 0], "rounds": 0,
                                                 "seconds": 0.0})
            row["bytes_per_server"][role] = int(nbytes)
            row["rounds"] = max(row["rounds"], int(rounds))
            row["seconds"] = max(row["seconds"], float(secs))
    return [merged[i] for i in sorted(merged)]


@click.group("secdfd-client", context_settings={"auto_envvar_prefix": "SECDFD_CLIENT",
                                                "help_option_names": ["-h", "--help"]})
def main() -> None:
    """SecDFD client: detect DeepFake faces without showing the image to anybody."""


@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              envvar="SECDFD_CLIENT_KEYS", help="Keys folder from `secdfd keys` (or the client's own subfolder).")
@click.option("--server-a", default="tcp://127.0.0.1:7301", show_default=True, envvar="SECDFD_CLIENT_SERVER_A",
              help="server_a endpoint.")
@click.option("--server-b", default="tcp://127.0.0.1:7302", show_default=True, envvar="SECDFD_CLIENT_SERVER_B",
              help="server_b endpoint.")
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
