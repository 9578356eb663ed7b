"""server_a, the leader: it decides which request runs next, and opens every session.

A client's `detect` request is checked and held (`RequestQueue`: bounded per client and in total,
Busy beyond that). When server_b announces that it holds the other share (`have`), the request is
paired; between sessions the leader runs the next paired request, fairly across clients: it makes
sure server_b is connected (within a short grace, before any bundle is claimed), takes the oldest
prepared bundle, records its id as used, starts the session and waits for server_b's `ready`, then
runs the online phase. If server_b cannot get that bundle, the next one is used. A request of several
face crops runs as one session on a batch bundle, made by the dealer when the session starts. A request whose
other share never arrives is answered with a timeout, one that waited too long in the queue with
Busy; if server_b restarts, the requests it had announced are answered at once (it lost its shares)
and set-up runs again.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from secdfd.common.errors import Busy, PeerLost, PeerTimeout, ProtocolError, RandomnessError
from secdfd.common.net.transport import Node, Request, ZmqChannel
from secdfd.common.service.queue import Entry, RequestQueue
from secdfd.common.service.server import ServerBase, ServerConfig, log_failure
from secdfd.common.service.session import asks_for_setup
from secdfd.common.service.supply import BundleQueue, PrepareAhead

log = logging.getLogger(__name__)

PEER_GRACE = 5.0  # how long a request waits for server_b to reconnect before it fails


class Leader(ServerBase):
    """server_a."""

    party_letter = "a"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.held = RequestQueue("server_a", config.max_pending_per_client, config.max_pending)
        self._b_down_since: float | None = None  # since when server_b has not been connected

    def open_channel(self, node: Node) -> ZmqChannel:
        return ZmqChannel.listen(node, self.config.peer, self.config.peer_name, self.config.timeout)

    def set_up(self, stop: threading.Event) -> bool:
        self.link.lead_setup(self.party, self.config.startup)
        return True

    def serve(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self.poller()
        while not stop.is_set():
            client, peer = self.waiting(poller, busy=self.held.has_ready())
            if peer:
                msg = self.link.next_start_now()  # between sessions, only server_b asking for set-up
                if msg is not None and asks_for_setup(msg):
                    log.info("server_b asks for set-up")
                    self._server_b_restarted()
                    self._set_up_safely()
            if client:
                self.take_requests(self.held, queue, ahead)
            self._pair()
            self._expire()
            entry = self.held.next_ready()
            if entry is not None:
                try:
                    self._session(entry, ahead)
                finally:
                    self.session_over()

    def _pair(self) -> None:
        """server_b's `have` notices pair the requests they name."""
        for msg in self.link.take_notices():
            self.held.announce((str(msg.meta["key"]).encode(), str(msg.meta["client"])), int(msg.meta["crops"]))

    def _expire(self) -> None:
        cfg = self.config
        if self.channel.connected:
            self._b_down_since = None
        elif self._b_down_since is None:
            self._b_down_since = time.monotonic()
        elif time.monotonic() - self._b_down_since > PEER_GRACE:
            # server_b is gone: its shares with it; requests it never announced cannot pair either
            for e in self.held.expired(PEER_GRACE, PEER_GRACE):
                self.answer_failure(e.request, PeerLost(
                    f"server_b is not connected to server_a (waited {PEER_GRACE:g} s); check that it is running: "
                    "it sets up with server_a again when it starts"))
        for e in self.held.expired(cfg.client_wait, cfg.queue_wait):
            err: Exception
            if e.paired:
                err = Busy(f"server_a is busy: this request waited {cfg.queue_wait:g} s in the queue; retry later")
            else:
                err = PeerTimeout(f"server_b did not receive this request's share within {cfg.client_wait:g} s; "
                                  "check that the client reached server_b")
            self.answer_failure(e.request, err)

    def _server_b_restarted(self) -> None:
        """server_b lost every share it held: answer the requests it had announced."""
        for e in self.held.unpair_all():
            self.answer_failure(e.request, PeerLost("server_b restarted and lost its share of this request; "
                                                    "send the image again"))

    def _set_up_safely(self) -> None:
        try:
            self.link.lead_setup(self.party, self.config.timeout)
        except Exception as e:  # noqa: BLE001 - server_b asks again; this server serves on
            log_failure("set-up with server_b failed; it runs again when server_b asks again", e)

    def _session(self, entry: Entry, ahead: PrepareAhead) -> None:
        req = entry.request
        request = secrets.token_hex(8)  # what logs and the client call this request; says nothing else
        crops = int(req.message.tensors[0].shape[0])
        if crops != entry.peer_crops:  # before any bundle: a client cannot make the dealer work for nothing
            self.answer_failure(req, ProtocolError(f"the client sent server_a {crops} crops and server_b "
                                                   f"{entry.peer_crops} for one request; send the image again"))
        elif crops > 1:
            self._batch_session(req, crops, request)
        else:
            self._one_session(req, ahead, request)

    def _batch_session(self, req: Request, crops: int, request: str) -> None:
        """A request of several crops: a batch bundle made for it now, claimed before it is announced,
        then prepared here while server_b fetches and prepares its half."""
        try:
            self._wait_for_peer(min(self.config.timeout, PEER_GRACE))  # before a bundle is made
            ready = self.batch_bundle("batch_request", {"batch": crops}, crops)
            self.batch_ledger.claim(ready.bundle_id)
            self.link.start(ready.bundle_id, req.message.sid, req.key, request, crops)
            prep = self.prepare_now(ready)
            try:
                self.link.wait_ready(self.config.bundle_wait * crops)  # server_b fetches and prepares N crops
            except PeerLost:
                self._peer_restarted()
                raise
            self.online(req, prep, request)
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            self.fail(e, req, request)

    def _peer_restarted(self) -> None:
        """After PeerLost while server_b got ready: if it restarted (it asks for set-up), set up again
        and raise PeerLost for the client (server_b's share is gone); otherwise return."""
        start = self.link.stashed
        if start is None or not asks_for_setup(start):
            return
        log.info("server_b asks for set-up")
        self.link.next_start(0)
        self._server_b_restarted()
        self._set_up_safely()
        raise PeerLost("server_b restarted during this request and lost its share; send the image again") from None

    def _one_session(self, req: Request, ahead: PrepareAhead, request: str) -> None:
        cfg = self.config
        attempts = cfg.depth + 3  # a restarted server_b lost the bundles it held: skip those ids
        try:
            for attempt in range(attempts):
                self._wait_for_peer(min(cfg.timeout, PEER_GRACE))  # before a bundle is claimed
                prep = ahead.take_next(cfg.bundle_wait)
                self.ledger.claim(prep.bundle_id)  # before use: never twice, even after a crash
                self.link.start(prep.bundle_id, req.message.sid, req.key, request)
                try:
                    self.link.wait_ready(cfg.bundle_wait)
                    break
                except RandomnessError:  # server_b cannot get this bundle: use the next one
                    if attempt == attempts - 1:
                        raise
                except PeerLost:  # server_b restarted: its shares are gone; set up again
                    self._peer_restarted()
                    raise
                self.idle.set()  # let the next bundle be prepared
            self.online(req, prep, request)
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            self.fail(e, req, request)

    def _wait_for_peer(self, grace: float) -> None:
        """PeerLost unless server_b is connected (or reconnects within `grace` seconds): a session
        that cannot start should not use up a bundle, nor keep the client waiting for its deadline."""
        deadline = time.monotonic() + grace
        while not self.channel.connected:
            if time.monotonic() > deadline:
                raise PeerLost(f"server_b is not connected to server_a (waited {grace:g} s); check that it "
                               "is running: it sets up with server_a again when it starts")
            time.sleep(0.05)
