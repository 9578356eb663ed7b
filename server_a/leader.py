"""server_a, the leader: it opens every session and claims the bundle ids.

Per client request (`detect`): check the share, make sure server_b is connected (within a short
grace, before any bundle is claimed), take the oldest prepared bundle, record its id as used, start
the session with server_b and wait for its `ready`, then run the online phase. If server_b cannot
get that bundle (it restarted and lost it), the next one is used; if server_b restarted and asks for
set-up, set-up runs first and the request is retried with a fresh bundle. Between sessions, server_b's
set-up requests are answered.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from secdfd.common.errors import PeerLost, RandomnessError
from secdfd.common.net.transport import Node, Request, ZmqChannel
from secdfd.common.service.server import ServerBase, log_failure
from secdfd.common.service.session import asks_for_setup
from secdfd.common.service.supply import BundleQueue, PrepareAhead

log = logging.getLogger(__name__)

PEER_GRACE = 5.0  # how long a request waits for server_b to reconnect before it fails


class Leader(ServerBase):
    """server_a."""

    party_letter = "a"

    def open_channel(self, node: Node) -> ZmqChannel:
        return ZmqChannel.listen(node, self.config.peer, self.config.peer_name, self.config.timeout)

    def set_up(self, stop: threading.Event) -> bool:
        self.link.lead_setup(self.party, self.config.startup)
        return True

    def serve(self, queue: BundleQueue, ahead: PrepareAhead, stop: threading.Event) -> None:
        poller = self.poller()
        while not stop.is_set():
            client, peer = self.waiting(poller)
            if peer:
                msg = self.link.next_start_now()  # between sessions, only server_b asking for set-up
                if msg is not None and asks_for_setup(msg):
                    log.info("server_b asks for set-up")
                    self._set_up_safely()
            if not client:
                continue
            req = self.front.recv(timeout=0)
            if req is None:
                continue
            if req.message.kind == "info":
                self.answer_info(req, queue, ahead)
            elif req.message.kind == "detect":
                try:
                    self._session(req, ahead)
                finally:
                    self.idle.set()  # the session is over: background work resumes
            else:
                self.refuse(req)

    def _set_up_safely(self) -> None:
        try:
            self.link.lead_setup(self.party, self.config.timeout)
        except Exception as e:  # noqa: BLE001 - server_b asks again; this server serves on
            log_failure("set-up with server_b failed; it runs again when server_b asks again", e)

    def _session(self, req: Request, ahead: PrepareAhead) -> None:
        cfg = self.config
        request = secrets.token_hex(8)  # what logs and the client call this request; says nothing else
        attempts = cfg.depth + 3  # a restarted server_b lost the bundles it held: skip those ids
        try:
            self.check_share(req)
            self._wait_for_peer(min(cfg.timeout, PEER_GRACE))  # before a bundle is claimed
            for attempt in range(attempts):
                if attempt:
                    self._wait_for_peer(min(cfg.timeout, PEER_GRACE))
                prep = ahead.take_next(cfg.bundle_wait)
                self.ledger.claim(prep.bundle_id)  # before use: never twice, even after a crash
                self.link.start(prep.bundle_id, req.message.sid, request)
                try:
                    self.link.wait_ready(cfg.client_wait + cfg.bundle_wait)
                    break
                except RandomnessError:  # server_b cannot get this bundle: use the next one
                    if attempt == attempts - 1:
                        raise
                except PeerLost:  # server_b restarted: set up again, then retry with a fresh bundle
                    start = self.link.stashed
                    if attempt == attempts - 1 or start is None or not asks_for_setup(start):
                        raise
                    log.info("server_b asks for set-up")
                    self.link.next_start(0)
                    self.link.lead_setup(self.party, cfg.timeout)
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
