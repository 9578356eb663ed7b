"""The party runtime: one piece of code that runs server_a or server_b.

Start-up (both servers):
1. load keys and this server's weight share; ask the dealer for provisioning material (and check
   that the dealer deals for the same model);
2. join the peer channel (server_a binds, server_b connects) and run the set-up session
   (F = W - B opened once);
3. start the bundle queue (bounded, refilled from the dealer in the background) and the
   preparation of the next bundle (the engine's input-independent `prepare`: the offline part);
4. listen for clients (only now: a client that can connect is a client that can be served).

One inference (a session), driven by server_a:
1. a client sends share i of its image to server i under one client session id;
2. server_a takes the oldest ready bundle k, records k as used, and announces (k, client sid) to
   server_b (`session`); server_b waits for the client's share, takes bundle k (recording it as
   used) and answers `ready`. Two messages, counted as rounds of step "session";
3. both run the online phase of the plan over the channel (the bundle was prepared ahead, while
   no session was online); each returns its output share and report to the client. Reports
   separate online seconds (`seconds`) from offline ones (`prepare_seconds`, `dealer_seconds`).
A failure on either side is sent to the peer (`abort`) and to the client as one-line errors; the
next session starts clean (left-over messages of the failed one are dropped by session id).
A lost peer connection fails the session at once (not at the round deadline). If server_b
restarted, it asks for set-up again and server_a re-runs it, between sessions or in place of the one
it was waiting in; if server_a restarted, its start-up set-up reaches server_b between sessions.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
import zmq

from secdfd.common.errors import ModelError, PeerLost, PeerTimeout, ProtocolError, RandomnessError, SecDFDError
from secdfd.common.net.keys import allowed_keys, load_party
from secdfd.common.net.transport import Node, Request, Requester, Responder, ZmqChannel
from secdfd.common.net.wire import Message
from secdfd.common.service import deployment
from secdfd.common.service.supply import BundleQueue, IdLedger, PrepareAhead, Prepared, Ready

log = logging.getLogger(__name__)

ROLES = {"a": 0, "b": 1}
NAMES = ("server_a", "server_b")
_SETUP = -1  # the `bundle` of a set-up session
_PEER_GRACE = 5.0  # how long a request waits for server_b to reconnect before it fails
_ASK_EVERY = 2.0  # how often server_b repeats its request for set-up while it waits


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
    client_wait: float = 30.0  # how long a session waits for the client's other share
    bundle_wait: float = 60.0  # how long a request waits for a ready bundle
    startup: float = 300.0  # how long start-up waits for the dealer and the peer
    device: str = "cpu"
    limbs: bool | None = None  # float64 limb ring products: None = on CUDA only

    @property
    def role(self) -> int:
        return ROLES[self.party]

    @property
    def name(self) -> str:
        return NAMES[self.role]

    @property
    def peer_name(self) -> str:
        return NAMES[1 - self.role]


class ServerRuntime:
    """One server process: set up, then serve sessions until `stop` is set."""

    def __init__(self, config: ServerConfig) -> None:
        if config.party not in ROLES:
            raise ValueError(f"party must be 'a' or 'b', got {config.party!r}")
        self.config = config
        self.ready = threading.Event()  # set once clients can be served
        self.endpoint = ""  # the client endpoint actually bound
        self.peer_endpoint = ""
        self._pending: dict[str, tuple[Request, float]] = {}  # server_b: client sid -> request
        self.idle = threading.Event()  # clear while a session is online: background work waits
        self.idle.set()

    # --- start-up -------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        cfg = self.config
        deployment.check_device(cfg.device)
        keys = load_party(cfg.keys, cfg.name)
        self.info, weights = deployment.load_weight_share(cfg.weights, cfg.name)
        self.ledger = IdLedger(Path(cfg.state) / f"{cfg.name}.used")
        with Node(keys) as node:
            dealer = Requester(node, cfg.dealer, "dealer", timeout=cfg.startup)
            prov = dealer.request("provision_request")
            self._check_dealer(prov)
            self.epoch = str(prov.meta["epoch"])
            self._provision = bytes(prov.tensors[0].numpy())
            if cfg.role == 0:
                self.channel = ZmqChannel.listen(node, cfg.peer, cfg.peer_name, cfg.timeout)
            else:
                self.channel = ZmqChannel.connect(node, cfg.peer, cfg.peer_name, cfg.timeout)
            self.party = deployment.make_party(cfg.role, self.info, weights, self._provision, self.channel,
                                               cfg.device, cfg.limbs)
            del weights
            self.peer_endpoint = self.channel.endpoint  # published once the plan is traced
            if not self._setup(stop):
                return
            queue = BundleQueue(self._fetcher(node), cfg.depth, cfg.name, idle=self.idle).start()
            ahead = PrepareAhead(queue, self.party.prepare, self.idle, cfg.name).start()
            try:
                names = {k: "client" for k in allowed_keys(keys.allow_dir("clients"))}
                self.front = Responder(node, cfg.listen, "clients", names)
                self.endpoint = self.front.endpoint
                self.ready.set()
                log.info("%s ready on %s", cfg.name, self.endpoint)
                serve = self._serve_a if cfg.role == 0 else self._serve_b
                serve(queue, ahead, stop)
            finally:
                ahead.stop()
                queue.stop()

    def _check_dealer(self, prov: Message) -> None:
        """The dealer must deal for this server's model, or every bundle would be for another plan."""
        theirs = deployment.ModelInfo(str(prov.meta["model"]), int(prov.meta["input_size"]),
                                      int(prov.meta["frac_bits"]), self.info.cmp_bits)
        if theirs != self.info:
            raise ModelError(f"the dealer deals for {theirs.describe()}, {self.config.name}'s weight share is for "
                             f"{self.info.describe()}; start the dealer with --model DIR/model.json from the "
                             "same `secdfd share`")

    def _setup(self, stop: threading.Event, patience: float | None = None) -> bool:
        """The set-up session (open F = W - B), started by server_a and joined by server_b.

        server_b first asks for it (a `session` message for bundle -1: server_a, if it is already
        serving, answers by starting set-up), then waits for it. A session announced before it
        (server_b restarted while server_a kept running) is answered with PeerLost; server_a then
        finds server_b's request and runs set-up again. Set-up may run any number of times: it opens
        the same F = W - B each time (the shares and the masks B do not change), so a repeat reveals
        nothing new and bundles prepared before it stay valid. `patience` bounds the wait for the
        peer (start-up's by default). False if `stop` was set before set-up happened.
        """
        cfg = self.config
        patience = cfg.startup if patience is None else patience
        self.channel.timeout = patience  # the peer may still be starting
        try:
            if cfg.role == 0:  # server_b's requests for set-up are answered by this one
                self.channel.begin(f"setup-{secrets.token_hex(8)}", stale=_asks_for_setup)
                self.channel.send("session", "session", {"bundle": _SETUP, "client": ""})
            else:
                # ask, and ask again every few seconds: a request can be lost with a connection, and
                # server_a drops the ones that reach it while it runs set-up (they ask for that)
                deadline = time.monotonic() + patience
                ask = 0.0
                while True:
                    if stop.is_set():
                        return False
                    now = time.monotonic()
                    if now > deadline:
                        raise PeerTimeout(f"server_a did not start set-up within {patience:g} s; "
                                          "check that it is running")
                    if now >= ask:
                        self.channel.begin(f"setup-request-{secrets.token_hex(8)}")
                        self.channel.send("session", "session", {"bundle": _SETUP, "client": ""})
                        ask = time.monotonic() + _ASK_EVERY
                    msg = self.channel.recv_session(min(1.0, _ASK_EVERY))
                    if msg is not None and _asks_for_setup(msg):
                        break
                    if msg is not None:
                        self.channel.abort(PeerLost("server_b is not set up (it started or lost set-up) and has "
                                                    "asked for set-up"), "session")
            self.party.setup()
        finally:
            self.channel.timeout = cfg.timeout
        log.info("%s: weights set up with %s", cfg.name, cfg.peer_name)
        return True

    def _rejoin(self, stop: threading.Event) -> None:
        """server_b after a failed set-up: ask server_a for it until it happens (or `stop`)."""
        while not stop.is_set():
            try:
                if self._setup(stop, self.config.timeout):
                    return
            except Exception as e:  # noqa: BLE001 - server_b lives on until server_a is back
                _log_failure("set-up with server_a failed; asking again", e)
                stop.wait(1.0)

    def _fetcher(self, node: Node) -> Callable[[], Ready]:
        cfg = self.config
        holder: dict[str, Requester] = {}

        def fetch() -> Ready:
            # runs in the queue's thread, which owns this socket
            if "r" not in holder:
                holder["r"] = Requester(node, cfg.dealer, "dealer", timeout=cfg.timeout)
            reply = holder["r"].request("bundle_request")
            bundle_id = int(reply.meta["bundle"])
            if reply.meta["epoch"] != self.epoch:
                raise RandomnessError("the dealer was re-provisioned since this server started; "
                                      "restart both servers")
            data = b"".join(t.numpy().tobytes() for t in reply.tensors)  # the dealer's frames, in order
            bundle = deployment.load_bundle(data, cfg.role, bundle_id)
            return Ready(bundle_id, str(reply.meta["epoch"]), bundle, float(reply.meta["seconds"]), len(data))

        return fetch

    # --- serving --------------------------------------------------------------------------

    def _info(self, req: Request, queue: BundleQueue, ahead: PrepareAhead) -> None:
        self.front.reply(req, "info_reply", {"party": self.config.name, "model": self.info.arch,
                                             "input_size": self.info.size, "frac_bits": self.info.frac,
                                             "bundles_ready": len(queue), "prepared": int(ahead.ready)})

    def _check_share(self, req: Request) -> None:
        x = req.message.tensors[0]
        if tuple(x.shape) != self.info.input_shape:
            raise ProtocolError(f"the image share has shape {list(x.shape)}, {self.config.name} serves "
                                f"{list(self.info.input_shape)}; resize the image to {self.info.size}")

    def _waiting(self, poller: zmq.Poller) -> tuple[bool, bool]:
        """Within 200 ms: whether a client request waits, and whether a peer message does."""
        events = dict(poller.poll(0 if self.channel.stashed else 200))
        return self.front.sock in events, self.channel.sock in events or self.channel.stashed is not None

    def _poller(self) -> zmq.Poller:
        poller = zmq.Poller()
        poller.register(self.front.sock, zmq.POLLIN)
        poller.register(self.channel.sock, zmq.POLLIN)
        return poller

    def _serve_a(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self._poller()
        while not stop.is_set():
            client, peer = self._waiting(poller)
            if peer:
                msg = self._next_session()  # between sessions, only server_b asking for set-up
                if msg is not None and _asks_for_setup(msg):
                    log.info("server_b asks for set-up")
                    self._set_up_safely(stop)
            if not client:
                continue
            req = self.front.recv(timeout=0)
            if req is None:
                continue
            if req.message.kind == "info":
                self._info(req, queue, ahead)
            elif req.message.kind == "detect":
                try:
                    self._session_a(req, ahead)
                finally:
                    self.idle.set()  # the session is over: background work resumes
            else:
                self.front.reply_error(req, ProtocolError(f"{self.config.name} does not serve "
                                                          f"{req.message.kind!r} requests"))

    def _set_up_safely(self, stop: threading.Event) -> None:
        try:
            self._setup(stop, self.config.timeout)
        except Exception as e:  # noqa: BLE001 - server_b asks again; this server serves on
            _log_failure("set-up with server_b failed; it runs again when server_b asks again", e)

    def _next_session(self) -> Message | None:
        """The peer's next session start, if one is waiting; a malformed message is logged and dropped."""
        try:
            return self.channel.recv_session(0)
        except SecDFDError as e:
            log.warning("dropped a message from %s: %s", self.config.peer_name, e)
            return None

    def _session_a(self, req: Request, ahead: PrepareAhead) -> None:
        cfg = self.config
        attempts = cfg.depth + 3  # a restarted server_b lost the bundles it held: skip those ids
        try:
            self._check_share(req)
            self._wait_for_peer(min(cfg.timeout, _PEER_GRACE))  # before a bundle is claimed
            for attempt in range(attempts):
                if attempt:
                    self._wait_for_peer(min(cfg.timeout, _PEER_GRACE))
                prep = ahead.take_next(cfg.bundle_wait)
                self.ledger.claim(prep.bundle_id)  # before use: never twice, even after a crash
                self.channel.begin(f"b{prep.bundle_id}")
                self.channel.send("session", "session", {"bundle": prep.bundle_id, "client": req.message.sid})
                try:
                    self.channel.recv("ready", "session", timeout=cfg.client_wait + cfg.bundle_wait)
                    break
                except RandomnessError:  # server_b cannot get this bundle: use the next one
                    if attempt == attempts - 1:
                        raise
                except PeerLost:  # server_b restarted: set up again, then retry with a fresh bundle
                    request = self.channel.stashed
                    if attempt == attempts - 1 or request is None or not _asks_for_setup(request):
                        raise
                    log.info("server_b asks for set-up")
                    self.channel.recv_session(0)
                    self._setup(threading.Event(), cfg.timeout)
                self.idle.set()  # let the next bundle be prepared
            y, report = self.party.run(req.message.tensors[0], prep.rands)
            self.front.reply(req, "result", {"report": self._report(report, prep)}, [y])
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            err = _session_error(e, self.config.name)
            self.channel.abort(err, "session")
            self.front.reply_error(req, err)

    def _wait_for_peer(self, grace: float) -> None:
        """PeerLost unless server_b is connected (or reconnects within `grace` seconds): a session
        that cannot start should not use up a bundle, nor keep the client waiting for its deadline."""
        deadline = time.monotonic() + grace
        while not self.channel.connected:
            if time.monotonic() > deadline:
                raise PeerLost(f"server_b is not connected to server_a (waited {grace:g} s); check that it "
                               "is running: it sets up with server_a again when it starts")
            time.sleep(0.05)

    def _serve_b(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self._poller()
        while not stop.is_set():
            client, peer = self._waiting(poller)
            if client:
                self._client_request(queue, ahead)
            if peer:
                msg = self._next_session()
                if msg is not None and _asks_for_setup(msg):  # server_a restarted
                    log.info("server_a runs set-up (it started again)")
                    try:
                        self.party.setup()
                        log.info("server_b: weights set up with server_a")
                    except Exception as e:  # noqa: BLE001 - server_b lives on until server_a is back
                        _log_failure("set-up with server_a failed; asking again", e)
                        self._rejoin(stop)
                elif msg is not None:
                    try:
                        self._session_b(msg, queue, ahead)
                    finally:
                        self.idle.set()
            self._expire()

    def _client_request(self, queue: BundleQueue, ahead: PrepareAhead) -> None:
        req = self.front.recv(0)
        if req is None:
            return
        if req.message.kind == "info":
            self._info(req, queue, ahead)
        elif req.message.kind == "detect":
            try:
                self._check_share(req)
            except ProtocolError as e:
                self.front.reply_error(req, e)
                return
            self._pending[req.message.sid] = (req, time.monotonic())
        else:
            self.front.reply_error(req, ProtocolError(f"server_b does not serve {req.message.kind!r} requests"))

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, (req, t) in list(self._pending.items()):
            if now - t > self.config.client_wait + self.config.bundle_wait:
                del self._pending[sid]
                self.front.reply_error(req, PeerTimeout("server_a did not start this session in time; "
                                                        "check that the client reached server_a"))

    def _session_b(self, msg: Message, queue: BundleQueue, ahead: PrepareAhead) -> None:
        cfg = self.config
        req = None
        try:
            client_sid = str(msg.meta["client"])
            deadline = time.monotonic() + cfg.client_wait
            while client_sid not in self._pending:
                if time.monotonic() > deadline:
                    raise PeerTimeout(f"no image share from the client for this session within "
                                      f"{cfg.client_wait:g} s")
                if self.front.sock.poll(100):
                    self._client_request(queue, ahead)
            req, since = self._pending.pop(client_sid)
            bundle_id = int(msg.meta["bundle"])
            try:
                prep = ahead.take(bundle_id, cfg.bundle_wait)
            except RandomnessError as e:  # server_a retries this client's request with its next bundle
                self._pending[client_sid] = (req, since)
                log.info("%s; asking server_a for another", e)
                self.channel.abort(e, "session")
                return
            self.ledger.claim(bundle_id)
            self.channel.send("ready", "session")
            y, report = self.party.run(req.message.tensors[0], prep.rands)
            self.front.reply(req, "result", {"report": self._report(report, prep)}, [y])
        except PeerLost as e:
            if req is not None and self.channel.stashed is not None:
                # server_a gave this session up and started another (set-up, or this client's request
                # again with a fresh bundle): the client's share waits for it, as after a RandomnessError
                self._pending[client_sid] = (req, since)
                log.info("session given up by server_a (%s); keeping the client's share for its retry", e)
                return
            self._fail_b(e, req)
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            self._fail_b(e, req)

    def _fail_b(self, e: Exception, req: Request | None) -> None:
        err = _session_error(e, self.config.name)
        self.channel.abort(err, "session")
        if req is not None:
            self.front.reply_error(req, err)

    def _report(self, report: Any, prep: Prepared) -> dict[str, Any]:
        report.prepare_seconds = prep.seconds
        d = deployment.report_dict(report)
        d.update(bundle=prep.bundle_id, party=self.config.name, dealer_seconds=prep.ready.dealer_seconds,
                 dealer_bytes=prep.ready.nbytes)
        return d


def _log_failure(what: str, e: Exception) -> None:
    if isinstance(e, SecDFDError):
        log.warning("%s: %s", what, e)
    else:
        log.exception(what)


def _asks_for_setup(msg: Message) -> bool:
    return msg.kind == "session" and msg.meta.get("bundle") == _SETUP


def _session_error(e: Exception, name: str) -> SecDFDError:
    """What a failed session reports: our own errors as they are, anything else as an internal error."""
    if isinstance(e, SecDFDError):
        log.warning("session failed: %s", e)
        return e
    log.exception("session failed")
    return SecDFDError(f"internal error in {name} ({type(e).__name__}: {e}); see its log")


_DEFAULT_LISTEN = {"a": "tcp://127.0.0.1:7301", "b": "tcp://127.0.0.1:7302"}


def set_threads(threads: int) -> None:
    """torch's CPU threads for this process; 0 keeps torch's default (every core).

    Processes that share a machine (dealer and both servers under `secdfd up`) each take one.
    """
    if threads > 0:
        torch.set_num_threads(threads)


@click.command("secdfd-server", context_settings={"auto_envvar_prefix": "SECDFD_SERVER",
                                                  "help_option_names": ["-h", "--help"]})
@click.option("--party", type=click.Choice(["a", "b"]), required=True, help="Which server this is.")
@click.option("--keys", type=click.Path(path_type=Path), default=Path(".secdfd/keys"), show_default=True,
              help="Keys folder from `secdfd keys` (or this server's own subfolder).")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="This server's weight share [default: .secdfd/shares/server_<party>.weights].")
@click.option("--state", type=click.Path(path_type=Path), default=None,
              help="Folder of the used-bundle ledger [default: .secdfd/state/server_<party>].")
@click.option("--listen", default=None, help="Client endpoint to bind [default: a 7301, b 7302 on loopback].")
@click.option("--peer", default="tcp://127.0.0.1:7310", show_default=True,
              help="Server-to-server endpoint: server_a binds it, server_b connects to it.")
@click.option("--dealer", default="tcp://127.0.0.1:7300", show_default=True, help="Dealer endpoint.")
@click.option("--depth", type=int, default=4, show_default=True, help="Bundles kept ready.")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="Deadline of one round (s).")
@click.option("--threads", type=int, default=0, envvar=["SECDFD_SERVER_THREADS", "SECDFD_THREADS"],
              help="CPU threads for torch (env SECDFD_THREADS) [default: every core; `secdfd up` uses 1].")
@click.option("--device", default="cpu", show_default=True, help="Where the ring arithmetic runs: cpu or cuda.")
@click.option("--limbs", is_flag=True, default=None,
              help="Use float64 limb ring products on CPU too (always on with CUDA).")
def server_main(party: str, keys: Path, weights: Path | None, state: Path | None, listen: str | None,
                peer: str, dealer: str, depth: int, timeout: float, threads: int, device: str,
                limbs: bool | None) -> None:
    """Run server_a or server_b."""
    name = NAMES[ROLES[party]]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s")
    set_threads(threads)
    if depth < 1:
        raise click.UsageError("--depth must be at least 1")
    try:
        deployment.check_device(device)
    except ModelError as e:
        raise click.UsageError(str(e)) from None
    cfg = ServerConfig(party=party, keys=keys, weights=weights or Path(f".secdfd/shares/{name}.weights"),
                       state=state or Path(f".secdfd/state/{name}"), listen=listen or _DEFAULT_LISTEN[party],
                       peer=peer, dealer=dealer, depth=depth, timeout=timeout, device=device,
                       limbs=limbs or None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        ServerRuntime(cfg).run(stop)
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
