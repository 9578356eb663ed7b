"""server_b, the follower: it holds clients' shares until server_a starts their sessions.

A client's `detect` request is checked and held (`RequestQueue`: bounded per client and in total,
Busy beyond that), and server_a is told (`have`). When server_a starts the session for it, server_b
takes the held share and the announced bundle at once, records the bundle id as used, answers
`ready` and runs the online phase; a session for a share it does not hold (expired, cancelled, or
lost in a restart) is refused at once, never waited for. If server_b cannot get the bundle, the
share stays held for server_a's next one. A session of several crops names a batch bundle that
server_b fetches from the dealer (once) and prepares before it answers `ready`. When server_a
starts again, its set-up is joined; if set-up fails, server_b keeps asking for it.
"""

from __future__ import annotations

import logging
import threading

from secdfd.common.errors import Busy, PeerLost, ProtocolError, RandomnessError, SecDFDError
from secdfd.common.net.transport import Node, Request, ZmqChannel
from secdfd.common.net.wire import Message
from secdfd.common.service.queue import Entry, RequestQueue
from secdfd.common.service.server import ServerBase, ServerConfig, log_failure
from secdfd.common.service.session import asks_for_setup
from secdfd.common.service.supply import BundleQueue, PrepareAhead

log = logging.getLogger(__name__)


class Follower(ServerBase):
    """server_b."""

    party_letter = "b"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self.held = RequestQueue("server_b", config.max_pending_per_client, config.max_pending)

    def open_channel(self, node: Node) -> ZmqChannel:
        return ZmqChannel.connect(node, self.config.peer, self.config.peer_name, self.config.timeout)

    def set_up(self, stop: threading.Event) -> bool:
        return self.link.join_setup(self.party, stop, self.config.startup)

    def serve(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self.poller()
        while not stop.is_set():
            client, peer = self.waiting(poller)
            if client:
                self.take_requests(self.held, queue, ahead)
            if peer:
                msg = self.link.next_start_now()
                if msg is not None and asks_for_setup(msg):  # server_a restarted
                    log.info("server_a runs set-up (it started again)")
                    try:
                        self.link.follow_setup(self.party)
                    except Exception as e:  # noqa: BLE001 - server_b lives on until server_a is back
                        log_failure("set-up with server_a failed; asking again", e)
                        self._rejoin(stop)
                elif msg is not None:
                    try:
                        self._session(msg, ahead)
                    finally:
                        self.session_over()
            after = self.config.queue_wait + self.config.client_wait  # server_a answers first
            for old in self.held.expired(after, after):
                self.answer_failure(old.request, Busy("server_a did not start this request in time; retry later"))

    def held_request(self, req: Request) -> None:
        """A share is held: tell server_a, which pairs it with its own."""
        try:
            self.link.announce(req.message.sid, req.key, int(req.message.tensors[0].shape[0]))
        except SecDFDError as e:
            self.held.pop((req.key, req.message.sid))
            self.answer_failure(req, PeerLost(f"server_b cannot reach server_a ({e}); check that server_a runs"))

    def _rejoin(self, stop: threading.Event) -> None:
        """After a failed set-up: ask server_a for it until it happens (or `stop`)."""
        while not stop.is_set():
            try:
                if self.link.join_setup(self.party, stop, self.config.timeout):
                    return
            except Exception as e:  # noqa: BLE001 - server_b lives on until server_a is back
                log_failure("set-up with server_a failed; asking again", e)
                stop.wait(1.0)

    def _session(self, msg: Message, ahead: PrepareAhead) -> None:
        cfg = self.config
        request = str(msg.meta["request"])
        entry: Entry | None = self.held.pop((str(msg.meta["key"]).encode(), str(msg.meta["client"])))
        if entry is None:
            self.link.abort(ProtocolError("server_b holds no share of this request (it expired, was cancelled, or "
                                          "server_b restarted); send the image again"))
            return
        try:
            bundle_id = int(msg.meta["bundle"])
            crops = int(msg.meta.get("batch", 1))
            if crops != entry.request.message.tensors[0].shape[0]:
                raise ProtocolError(f"the client sent server_a {crops} crops and server_b "
                                    f"{entry.request.message.tensors[0].shape[0]}; send the image again")
            if crops > 1:  # a batch bundle server_a just had made: fetch this server's half of it
                ready = self.batch_bundle("batch_fetch", {"bundle": bundle_id, "batch": crops}, crops)
                self.batch_ledger.claim(bundle_id)
                prep = self.prepare_now(ready)
                self.link.ready()
                self.online(entry.request, prep, request)
                return
            try:
                prep = ahead.take(bundle_id, cfg.bundle_wait)
            except RandomnessError as e:  # server_a retries this request with its next bundle
                self.held.restore(entry)
                log.info("%s; asking server_a for another", e)
                self.link.abort(e)
                return
            self.ledger.claim(bundle_id)
            self.link.ready()
            self.online(entry.request, prep, request)
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            self.fail(e, entry.request, request)
