"""What both compute servers share: start-up, the bundle supply, client requests, reports.

The two roles build on `ServerBase`: server_a/ holds the leader (it opens sessions and claims bundle
ids), server_b/ the follower (it pairs clients' shares with the leader's sessions). The session
protocol between them is `secdfd.common.service.session`.

Start-up (`ServerBase.run`):
1. load keys and this server's weight share; ask the dealer for provisioning material (and check
   that the dealer deals for the same model);
2. open the server-to-server channel (the leader binds, the follower connects) and run the set-up
   session (F = W - B opened once);
3. start the bundle queue (bounded, refilled from the dealer in the background) and the preparation
   of the next bundle (the engine's input-independent `prepare`: the offline part);
4. listen for clients (only now: a client that can connect is a client that can be served), then
   serve until `stop` is set.
A failure in a session is reported to the peer (`abort`) and to the client as one-line errors; the
server serves on. Reports separate online seconds (`seconds`) from offline ones (`prepare_seconds`,
`dealer_seconds`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from secdfd.common import roster
from secdfd.common.engine.evaluator import Party
from secdfd.common.engine.figures import Report
from secdfd.common.engine.plan import Plan
from secdfd.common.engine.randomness import RANDOMNESS_LAYOUT
from secdfd.common.errors import Busy, ModelError, ProtocolError, RandomnessError, SecDFDError
from secdfd.common.net.keys import load_party
from secdfd.common.net.transport import Node, Request, Requester, Responder, ZmqChannel
from secdfd.common.net.wire import Limits, Message
from secdfd.common.service import deployment
from secdfd.common.service.health import HealthFile
from secdfd.common.service.queue import RequestQueue
from secdfd.common.service.session import SessionLink, SplitId
from secdfd.common.service.startup import trim_heap
from secdfd.common.service.supply import BundleQueue, IdLedger, PrepareAhead, Prepared, Ready

log = logging.getLogger(__name__)

DEALER_LINK_WAIT = 3.0  # a bundle request gives up this soon when the dealer cannot be reached
# what a server reads from the dealer: a bundle in frames of 1 MiB; a batch bundle of a wide model
# passes 2 GiB (dfdnet-s at 128 px: about 217 MB per crop)
DEALER_REPLIES = Limits(max_tensors=1 << 14, max_bytes=1 << 34, max_envelope=1 << 16)


@dataclass(frozen=True)
class ServerConfig:
    """Everything one server needs; parsed once from options and environment at the edge."""

    party: str  # "a" or "b"
    keys: Path
    weights: Path
    state: Path
    listen: str  # client endpoint (bind)
    peer: str  # server_a binds it, server_b connects to it
    dealer: str
    depth: int = 4
    timeout: float = 60.0  # one protocol round, one dealer request
    client_wait: float = 30.0  # how long a held request waits for the client's other share
    bundle_wait: float = 60.0  # how long a request waits for a ready bundle
    queue_wait: float = 120.0  # how long a paired request may wait for its turn
    max_pending_per_client: int = 2  # requests one client key may have held at once
    max_pending: int = 32  # requests held at once, all clients together
    startup: float = 300.0  # how long start-up waits for the dealer and the peer
    max_batch: int = 4  # face crops one request may hold (one secure session); the dealer's bound also holds
    device: str = "cpu"
    limbs: bool | None = None  # float64 limb ring products: None = on CUDA only

    @property
    def role(self) -> int:
        return roster.server(self.party).role

    @property
    def name(self) -> str:
        return roster.server(self.party).name

    @property
    def peer_name(self) -> str:
        return roster.server(self.party).peer


class ServerBase:
    """One server process: set up, then serve until `stop` is set. Subclasses are the two roles."""

    party_letter = ""  # "a" or "b", set by each role

    def __init__(self, config: ServerConfig) -> None:
        if config.party != self.party_letter:
            raise ValueError(f"{type(self).__name__} is server_{self.party_letter}, the configuration is for "
                             f"server_{config.party}")
        self.config = config
        self.ready = threading.Event()  # set once clients can be served
        self.endpoint = ""  # the client endpoint actually bound
        self.peer_endpoint = ""  # the server-to-server endpoint (bound by server_a), once known
        self.idle = threading.Event()  # clear while a session is online: background work waits
        self.idle.set()
        self.health = HealthFile(config.state, config.name)
        self.max_batch = 1  # set at start-up: the smaller of this server's and the dealer's bound
        self._dealer: Requester | None = None

    # --- what each role does ------------------------------------------------------------------

    def open_channel(self, node: Node) -> ZmqChannel:
        raise NotImplementedError

    def set_up(self, stop: threading.Event) -> bool:
        """The set-up session at start-up; False if `stop` was set before it happened."""
        raise NotImplementedError

    def serve(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        raise NotImplementedError

    # --- start-up -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Start up and serve until `stop`; the health file follows every state."""
        self.health.follow(lambda: self._run(stop), bundles_ready=0, prepared=False)

    def _run(self, stop: threading.Event) -> None:
        cfg = self.config
        deployment.check_device(cfg.device)
        keys = load_party(cfg.keys, cfg.name)
        share = deployment.load_weight_share(cfg.weights, cfg.name, keys)
        self.info = share.info
        self.digest = share.digest
        plan = deployment.plan_for(self.info)
        if deployment.architecture_digest(self.info, plan) != share.digest:
            raise ModelError(f"{cfg.weights} was made for another definition of {self.info.arch} than this "
                             "release's; share the model again with this release")
        self.ledger = IdLedger(Path(cfg.state) / f"{cfg.name}.used")
        self.batch_ledger = IdLedger(Path(cfg.state) / f"{cfg.name}.batch.used")
        with Node(keys) as node:
            self.node = node
            dealer = Requester(node, cfg.dealer, roster.DEALER, timeout=cfg.startup)
            prov = dealer.request("provision_request")
            self._check_dealer(prov)
            self.epoch = str(prov.meta["epoch"])
            self.max_batch = self._batch_limit(plan, int(prov.meta["max_batch"]))
            provision = bytes(prov.tensors[0].numpy())
            self.channel = self.open_channel(node)
            self.link = SessionLink(self.channel, cfg.name, SplitId(self.info.split, share.digest))
            self.party: Party = deployment.make_party(cfg.role, self.info, share.weights, provision, self.channel,
                                                      cfg.device, cfg.limbs, plan)
            del share
            self.peer_endpoint = self.channel.endpoint  # published once the plan is traced
            self.health.update(force=True, state="setting up")
            if not self.set_up(stop):
                return
            # `depth` bundles ready in all: the one prepared ahead and depth - 1 in the queue (1 at least)
            queue = BundleQueue(self._fetcher(node), max(1, cfg.depth - 1), cfg.name, idle=self.idle).start()
            ahead = PrepareAhead(queue, self.party.prepare, self.idle, cfg.name).start()
            try:
                self.front = Responder(node, cfg.listen, "clients", client_limits(self.info, self.max_batch))
                self.endpoint = self.front.endpoint
                self.ready.set()
                self.health.update(force=True, state="serving")
                log.info("%s ready on %s", cfg.name, self.endpoint)
                self._queue, self._ahead = queue, ahead
                self.serve(queue, ahead, stop)
            finally:
                ahead.stop()
                queue.stop()

    def _check_dealer(self, prov: Message) -> None:
        """The dealer must deal for this server's model, or every bundle would be for another plan."""
        theirs = deployment.ModelInfo(str(prov.meta["model"]), int(prov.meta["input_size"]),
                                      int(prov.meta["frac_bits"]), self.info.cmp_bits, str(prov.meta["split"]))
        if prov.meta["layout"] != RANDOMNESS_LAYOUT:
            raise ProtocolError(f"the dealer deals randomness of layout {prov.meta['layout']}, {self.config.name} "
                                f"reads layout {RANDOMNESS_LAYOUT}: its bundles would read as other values. Run the "
                                "dealer and the servers from the same SecDFD release")
        if theirs != self.info or prov.meta["digest"] != self.digest:
            raise ModelError(f"the dealer deals for {theirs.describe()}, {self.config.name}'s weight share is "
                             f"{self.info.describe()}; start the dealer with --model DIR/model.json from the "
                             "same `secdfd share` run as the servers' shares")

    def _batch_limit(self, plan: Plan, dealers: int) -> int:
        """The most crops one request may hold: this server's --max-batch, the dealer's, and 1 for a
        model whose plan mixes the inputs of a batch."""
        limit = min(self.config.max_batch, dealers)
        why = plan.batch_refusal() if limit > 1 else None
        if why is not None:
            log.info("%s serves one crop per request: this model cannot run several at once (%s)",
                     self.config.name, why)
            return 1
        if limit < self.config.max_batch:
            log.info("%s serves at most %d crops per request (the dealer's --max-batch)", self.config.name, limit)
        return limit

    def _fetcher(self, node: Node) -> Callable[[], Ready]:
        cfg = self.config
        holder: dict[str, Requester] = {}

        def fetch() -> Ready:
            # runs in the queue's thread, which owns this socket
            if "r" not in holder:
                holder["r"] = Requester(node, cfg.dealer, roster.DEALER, timeout=cfg.timeout, limits=DEALER_REPLIES)
            return self._bundle_reply(holder["r"].request("bundle_request", link_wait=DEALER_LINK_WAIT), 1)

        return fetch

    def _bundle_reply(self, reply: Message, batch: int) -> Ready:
        """The bundle in a dealer's reply, checked: this server's half, of this provisioning, the id
        and batch size announced."""
        bundle_id = int(reply.meta["bundle"])
        if reply.meta["epoch"] != self.epoch:
            raise RandomnessError("the dealer was re-provisioned since this server started; restart both servers")
        frames = reply.tensors
        data = bytearray().join(t.numpy().data for t in frames)  # the dealer's frames, in order, in one buffer
        if isinstance(frames, list):
            frames.clear()  # the frames are copied: a batch bundle runs to gigabytes
        bundle = deployment.load_bundle(data, self.config.role, bundle_id, batch)
        return Ready(bundle_id, str(reply.meta["epoch"]), bundle, float(reply.meta["seconds"]), len(data))

    def batch_bundle(self, kind: str, meta: dict[str, Any], batch: int) -> Ready:
        """A batch bundle from the dealer (server_a: `batch_request`, a new one; server_b: `batch_fetch`,
        the id server_a announced). Background work stops first (`PrepareAhead.hold`): the caller's
        session is as good as online. The dealer's time grows with the batch, and so does the wait."""
        self._ahead.hold()
        if self._dealer is None:  # the serving thread's own socket (the queue's belongs to its thread)
            self._dealer = Requester(self.node, self.config.dealer, roster.DEALER, timeout=self.config.timeout,
                                     limits=DEALER_REPLIES)
        reply = self._dealer.request(kind, meta, link_wait=DEALER_LINK_WAIT, timeout=self.config.timeout * batch)
        ready = self._bundle_reply(reply, batch)
        if kind == "batch_fetch" and ready.bundle_id != meta["bundle"]:
            raise RandomnessError(f"the dealer sent batch bundle {ready.bundle_id}, not {meta['bundle']}")
        return ready

    def prepare_now(self, ready: Ready) -> Prepared:
        """Expand a bundle in the serving thread (a batch bundle, made for the session at hand)."""
        t0 = time.perf_counter()
        rands = self.party.prepare(ready.bundle)
        return Prepared(ready, rands, time.perf_counter() - t0)

    # --- serving ----------------------------------------------------------------------------

    def answer_info(self, req: Request, queue: BundleQueue, ahead: PrepareAhead) -> None:
        """What a client may know: the model served and the number format (no service-wide counters)."""
        self.front.reply(req, "info_reply", {"party": self.config.name, "model": self.info.arch,
                                             "input_size": self.info.size, "frac_bits": self.info.frac,
                                             "max_batch": self.max_batch})

    def check_share(self, req: Request) -> None:
        """A share of 1 to max_batch crops of the served size, or ProtocolError (before anything is held)."""
        x = req.message.tensors[0]
        one = self.info.input_shape
        if x.dim() != len(one) or tuple(x.shape[1:]) != one[1:] or x.shape[0] < 1:
            raise ProtocolError(f"the image share has shape {list(x.shape)}, {self.config.name} serves "
                                f"{list(one)}; resize the image to {self.info.size}")
        if x.shape[0] > self.max_batch:
            raise ProtocolError(f"the request holds {x.shape[0]} crops, {self.config.name} takes at most "
                                f"{self.max_batch} in one request (its --max-batch and the dealer's); send them "
                                "in several requests")

    def take_requests(self, held: RequestQueue, queue: BundleQueue, ahead: PrepareAhead) -> None:
        """Every client request waiting now: `info` is answered, `detect` held (or refused: a share of
        the wrong shape, Busy), `cancel` drops the client's own held request."""
        while (req := self.front.recv(0)) is not None:
            kind = req.message.kind
            if kind == "info":
                self.answer_info(req, queue, ahead)
            elif kind == "detect":
                try:
                    self.check_share(req)
                    held.add(req)
                except (ProtocolError, Busy) as e:
                    self.answer_failure(req, e)
                    continue
                self.held_request(req)
            elif kind == "cancel":
                held.pop((req.key, req.message.sid))
                self.front.reply(req, "cancelled")
            else:
                self.refuse(req)

    def held_request(self, req: Request) -> None:
        """A client's share is now held (server_b tells server_a)."""

    def answer_failure(self, req: Request, err: Exception) -> None:
        """A client request that will not run: its one-line error, counted and logged."""
        self.front.reply_error(req, err)
        self.health.failed(err)
        log.info("a request of %s failed before it ran (%s: %s)", req.sender, type(err).__name__, err)

    def refuse(self, req: Request) -> None:
        self.front.reply_error(req, ProtocolError(f"{self.config.name} does not serve "
                                                  f"{req.message.kind!r} requests"))

    def poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.front.sock, zmq.POLLIN)
        poller.register(self.channel.sock, zmq.POLLIN)
        return poller

    def waiting(self, poller: zmq.Poller, busy: bool = False) -> tuple[bool, bool]:
        """Within 200 ms (at once when `busy`): whether a client request waits, and whether a peer
        message does."""
        self._publish_supply()
        self.front.refresh_allow()
        events = dict(poller.poll(0 if busy or self.link.waiting() else 200))
        return self.front.sock in events, self.channel.sock in events or self.link.waiting()

    def session_over(self) -> None:
        """Between sessions: the heap's free memory back to the system, then background work resumes."""
        trim_heap()
        self.idle.set()

    def _publish_supply(self) -> None:
        """Bundles ready and whether one is prepared, for the health file (written at most once a second
        unless forced)."""
        self.health.update(bundles_ready=len(self._queue) + int(self._ahead.ready), prepared=self._ahead.ready)

    def online(self, req: Request, prep: Prepared, request: str) -> None:
        """The online phase of one session, and the client's reply."""
        y, report = self.party.run(req.message.tensors[0], prep.rands)
        # the health file first: whoever hears the reply and looks finds this session's state (a
        # benchmark waits for the next bundle to be prepared), not the one from before the session
        self._publish_supply()
        self.health.served()
        self.front.reply(req, "result", {"report": self.report(report, prep, request)}, [y])
        log.info("request %s: answered, %.2f s online", request, report.seconds)

    def report(self, report: Report, prep: Prepared, request: str) -> dict[str, Any]:
        """What the client hears of its inference: its own figures and an opaque request id."""
        report.prepare_seconds = prep.seconds
        d = report.to_dict()
        d.update(request=request, party=self.config.name, dealer_seconds=prep.ready.dealer_seconds,
                 dealer_bytes=prep.ready.nbytes)
        return d

    def fail(self, e: Exception, req: Request | None, request: str = "") -> None:
        """A failed session: tell the peer and, if there is one, the client."""
        err = session_error(e, self.config.name)
        self.link.abort(err)
        if req is not None:
            self.front.reply_error(req, err)
            self.health.failed(err)
            log.info("request %s: failed (%s)", request or "-", type(err).__name__)


def client_limits(info: deployment.ModelInfo, max_batch: int = 1) -> Limits:
    """What a client may send a server: one tensor, an image share of up to `max_batch` crops of the
    served size (int64), and a small envelope. A larger frame drops the client's connection before it
    is buffered; more frames or bytes in one message are refused when it is read."""
    share = 8 * max_batch
    for d in info.input_shape[1:]:
        share *= d
    return Limits(max_tensors=1, max_bytes=share, max_envelope=1 << 16)


def log_failure(what: str, e: Exception) -> None:
    if isinstance(e, SecDFDError):
        log.warning("%s: %s", what, e)
    else:
        log.exception(what)


def session_error(e: Exception, name: str) -> SecDFDError:
    """What a failed session reports: our own errors as they are, anything else as an internal error."""
    if isinstance(e, SecDFDError):
        log.warning("session failed: %s", e)
        return e
    log.exception("session failed")
    return SecDFDError(f"internal error in {name} ({type(e).__name__}: {e}); see its log")
