"""server_b, the follower: it holds clients' shares until server_a starts their sessions.

A client's `detect` request is checked and kept (under the client's session id) until server_a
announces the session for it; then server_b takes the announced bundle, records its id as used,
answers `ready` and runs the online phase. A share nobody asks for is answered with a timeout
after `client_wait + bundle_wait` seconds. If server_a gives a session up (it restarted, or server_b
could not get the bundle), the client's share is kept for server_a's retry. When server_a starts
again, its set-up is joined; if set-up fails, server_b keeps asking for it.
"""

from __future__ import annotations

import logging
import threading
import time

from secdfd.common.errors import PeerLost, PeerTimeout, ProtocolError, RandomnessError
from secdfd.common.net.transport import Node, Request, ZmqChannel
from secdfd.common.net.wire import Message
from secdfd.common.service.server import ServerBase, ServerConfig, log_failure
from secdfd.common.service.session import asks_for_setup
from secdfd.common.service.supply import BundleQueue, PrepareAhead

log = logging.getLogger(__name__)


class Follower(ServerBase):
    """server_b."""

    party_letter = "b"

    def __init__(self, config: ServerConfig) -> None:
        super().__init__(config)
        self._pending: dict[str, tuple[Request, float]] = {}  # client session id -> request, since

    def open_channel(self, node: Node) -> ZmqChannel:
        return ZmqChannel.connect(node, self.config.peer, self.config.peer_name, self.config.timeout)

    def set_up(self, stop: threading.Event) -> bool:
        return self.link.join_setup(self.party, stop, self.config.startup)

    def serve(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self.poller()
        while not stop.is_set():
            client, peer = self.waiting(poller)
            if client:
                self._client_request(queue, ahead)
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
                        self._session(msg, queue, ahead)
                    finally:
                        self.idle.set()
            self._expire()

    def _rejoin(self, stop: threading.Event) -> None:
        """After a failed set-up: ask server_a for it until it happens (or `stop`)."""
        while not stop.is_set():
            try:
                if self.link.join_setup(self.party, stop, self.config.timeout):
                    return
            except Exception as e:  # noqa: BLE001 - server_b lives on until server_a is back
                log_failure("set-up with server_a failed; asking again", e)
                stop.wait(1.0)

    def _client_request(self, queue: BundleQueue, ahead: PrepareAhead) -> None:
        req = self.front.recv(0)
        if req is None:
            return
        if req.message.kind == "info":
            self.answer_info(req, queue, ahead)
        elif req.message.kind == "detect":
            try:
                self.check_share(req)
            except ProtocolError as e:
                self.front.reply_error(req, e)
                return
            self._pending[req.message.sid] = (req, time.monotonic())
        else:
            self.refuse(req)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid, (req, t) in list(self._pending.items()):
            if now - t > self.config.client_wait + self.config.bundle_wait:
                del self._pending[sid]
                self.front.reply_error(req, PeerTimeout("server_a did not start this session in time; "
                                                        "check that the client reached server_a"))

    def _session(self, msg: Message, queue: BundleQueue, ahead: PrepareAhead) -> None:
        cfg = self.config
        req = None
        client_sid = str(msg.meta["client"])
        request = str(msg.meta["request"])
        since = 0.0
        try:
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
                self.link.abort(e)
                return
            self.ledger.claim(bundle_id)
            self.link.ready()
            self.online(req, prep, request)
        except PeerLost as e:
            if req is not None and self.link.stashed is not None:
                # server_a gave this session up and started another (set-up, or this client's request
                # again with a fresh bundle): the client's share waits for it, as after a RandomnessError
                self._pending[client_sid] = (req, since)
                log.info("session given up by server_a (%s); keeping the client's share for its retry", e)
                return
            self.fail(e, req, request)
        except Exception as e:  # noqa: BLE001 - one failed session must never stop the server
            self.fail(e, req, request)
