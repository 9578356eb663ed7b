"""The dealer process (`secdfd-dealer`): provisioning and correlated-randomness bundles.

It learns the architecture and input size only (from the public model info `model.json` written by
`secdfd share`, or from its options), never an image, a weight or an output. It listens in the
"servers" ZAP domain; which server asks is taken from the authenticated public key, never from the
request. Bundle ids come from a persisted ledger, and each id's two halves are handed out once
each, in id order (see secdfd.common.service.supply). A bundle for a batch of several face crops is
made when server_a asks for one (ids from a second ledger), and its other half handed to server_b
once, when it asks for that id.
"""

from __future__ import annotations

import hashlib
import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import click
import torch

from secdfd.common import roster
from secdfd.common.cli.envvars import show_envvars
from secdfd.common.engine.randomness import MAX_BATCH, RANDOMNESS_LAYOUT
from secdfd.common.errors import ProtocolError, SecDFDError
from secdfd.common.net.keys import load_party
from secdfd.common.net.transport import Node, Request, Responder
from secdfd.common.net.wire import Limits
from secdfd.common.service import deployment
from secdfd.common.service.health import HealthFile
from secdfd.common.service.startup import run_process, trim_heap
from secdfd.common.service.supply import BatchBook, BundleBook, IdLedger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DealerConfig:
    keys: Path
    state: Path
    listen: str
    info: deployment.ModelInfo
    cap: int = 64  # halves kept per server that has not fetched them yet
    max_bytes: int = 2 << 30  # and the bytes they may take
    max_batch: int = 4  # the most inputs one batch bundle covers (servers learn it at provisioning)


class DealerService:
    """Serve provisioning and bundles until `stop` is set."""

    def __init__(self, config: DealerConfig) -> None:
        self.config = config
        self.ready = threading.Event()
        self.endpoint = ""
        self.health = HealthFile(config.state, roster.DEALER)

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop`; the health file (STATE/status.json) follows every state."""
        self.health.follow(lambda: self._run(stop))

    def _run(self, stop: threading.Event) -> None:
        cfg = self.config
        keys = load_party(cfg.keys, "dealer")
        dealer = deployment.make_dealer(cfg.info, cfg.state)
        digest = deployment.architecture_digest(cfg.info, dealer.plan)  # servers check it is their plan
        provisions = deployment.provision_bytes(dealer)
        # names the provisioning (stable across restarts: the seeds are kept); servers check bundles
        epoch = hashlib.sha256(b"secdfd-epoch\0" + b"".join(dealer.provision_seeds)).hexdigest()[:16]
        ledger = IdLedger(Path(cfg.state) / "dealer.ids")
        book = BundleBook(lambda i: deployment.bundle_bytes(dealer, i), ledger, cfg.cap, cfg.max_bytes)
        batches = BatchBook(lambda i, n: deployment.bundle_bytes(dealer, i, n),
                            IdLedger(Path(cfg.state) / "dealer.batch.ids"))
        with Node(keys) as node:
            front = Responder(node, cfg.listen, "servers", REQUEST_LIMITS)
            self.endpoint = front.endpoint
            self.ready.set()
            self.health.update(force=True, state="serving")
            log.info("dealer ready on %s", self.endpoint)
            while not stop.is_set():
                req = front.recv(timeout=0.2)
                if req is not None:
                    self._handle(front, req, provisions, (book, batches), (epoch, digest))
                self.health.update(extra={"bundles_made": ledger.last + 1,
                                          "halves_waiting": [book.waiting(0), book.waiting(1)],
                                          "bytes_waiting": [book.waiting_bytes(0), book.waiting_bytes(1)],
                                          "batch_halves_waiting": batches.waiting()})

    def _handle(self, front: Responder, req: Request, provisions: tuple[bytes, bytes],
                books: tuple[BundleBook, BatchBook], names: tuple[str, str]) -> None:
        epoch, digest = names
        book, batches = books
        if req.sender not in roster.SERVERS:
            front.reply_error(req, ProtocolError("the dealer serves server_a and server_b only"))
            return
        role = roster.SERVERS.index(req.sender)
        kind = req.message.kind
        try:
            if kind == "provision_request":
                info = self.config.info
                front.reply(req, "provision", {"epoch": epoch, "model": info.arch, "input_size": info.size,
                                               "frac_bits": info.frac, "split": info.split, "digest": digest,
                                               "max_batch": self.config.max_batch, "layout": RANDOMNESS_LAYOUT},
                            [_as_tensor(provisions[role])])
            elif kind == "bundle_request":
                t0 = time.perf_counter()
                bundle_id, half = book.next_for(role)
                trim_heap()  # making both halves allocated and freed the bundle's tensors
                front.reply(req, "bundle", {"bundle": bundle_id, "batch": 1, "epoch": epoch,
                                            "seconds": time.perf_counter() - t0}, _as_frames(half))
                self.health.served()
            elif kind in ("batch_request", "batch_fetch"):
                self._batch(front, req, role, batches, epoch)
            else:
                raise ProtocolError(f"the dealer does not serve {kind!r} requests")
        except SecDFDError as e:
            log.warning("%s", e)
            front.reply_error(req, e)
            self.health.failed(e)
        except Exception as e:  # noqa: BLE001 - one failed request must never stop the dealer
            log.exception("request failed")
            front.reply_error(req, SecDFDError(f"internal error in the dealer ({type(e).__name__}); see its log"))


    def _batch(self, front: Responder, req: Request, role: int, batches: BatchBook, epoch: str) -> None:
        """A batch bundle: server_a asks for a new one of `batch` inputs, server_b for its half of an id."""
        t0 = time.perf_counter()
        meta = req.message.meta
        if req.message.kind == "batch_request":
            if role != 0:
                raise ProtocolError("only server_a asks for new batch bundles; server_b fetches the announced id")
            batch = int(meta["batch"])  # the wire checked its type
            limit = self.config.max_batch
            if not 2 <= batch <= limit:
                raise ProtocolError(f"a batch bundle covers 2 to {limit} inputs (the dealer's --max-batch), "
                                    f"not {batch!r}")
            bundle_id, half = batches.make(batch)
        else:
            if role != 1:
                raise ProtocolError("server_a gets its half of a batch bundle when it asks for the bundle")
            bundle_id, batch = int(meta["bundle"]), int(meta["batch"])
            half = batches.take(bundle_id)
        front.reply(req, "bundle", {"bundle": bundle_id, "batch": batch, "epoch": epoch,
                                    "seconds": time.perf_counter() - t0}, _as_frames(half))
        self.health.served()


def _as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


FRAME_BYTES = 1 << 20  # a bundle travels in frames of at most 1 MiB
REQUEST_LIMITS = Limits(max_tensors=0, max_bytes=0, max_envelope=1 << 16)  # servers' requests carry no tensor


def _as_frames(data: bytes | bytearray) -> list[torch.Tensor]:
    """`data` as consecutive frames of at most FRAME_BYTES (views of one buffer, no copies).

    A ZMTP heartbeat is answered only between frames: one frame of hundreds of MB (a full-width
    bundle) would outlast the receiver's heartbeat timeout on a 1 Gbit/s link shared by both
    servers, and the connection would be dropped and the request retried forever.
    """
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return [torch.frombuffer(buf, dtype=torch.uint8, offset=i, count=min(FRAME_BYTES, len(buf) - i))
            for i in range(0, len(buf), FRAME_BYTES)]


@click.command("secdfd-dealer", context_settings={"auto_envvar_prefix": "SECDFD_DEALER",
                                                  "help_option_names": ["-h", "--help"]})
@click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              help="Keys folder from `secdfd keys` (or the dealer's own subfolder).")
@click.option("--state", type=click.Path(path_type=Path), default=Path(".secdfd/state/dealer"),
              show_default=True, help="Where the bundle-id ledger and provisioning seeds are kept.")
@click.option("--listen", default=roster.endpoint(roster.DEALER), show_default=True, help="Endpoint to bind.")
@click.option("--model", "model_info", type=click.Path(path_type=Path), default=Path(".secdfd/shares/model.json"),
              show_default=True, envvar="SECDFD_DEALER_MODEL",
              help="Public model info from `secdfd share` (OUT/model.json): the architecture, input size and the "
                   "split whose weight masks this dealer deals for.")
@click.option("--max-batch", type=click.IntRange(1, MAX_BATCH), default=4, show_default=True,
              help="The most face crops one secure session may hold: a batch bundle is made when server_a asks, "
                   "as large as that many one-crop bundles. The servers serve up to the smaller of theirs and this.")
@click.option("--threads", type=int, default=0, envvar=["SECDFD_DEALER_THREADS", "SECDFD_THREADS"],
              help="CPU threads for torch [default: every core; `secdfd up` uses 1].")
def main(keys: Path, state: Path, listen: str, model_info: Path, max_batch: int, threads: int) -> None:
    """Run the dealer: provisioning for the weight masks and one bundle per inference."""
    try:
        info = deployment.read_info(model_info)
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    service = DealerService(DealerConfig(keys, state, listen, info, max_batch=max_batch))
    sys.exit(run_process(roster.DEALER, threads, service.run))


show_envvars(main)
