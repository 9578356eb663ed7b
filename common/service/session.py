"""The session protocol between server_a (the leader) and server_b (the follower).

The server-to-server channel (`secdfd.common.net.transport.ZmqChannel`) carries conversations, each
under its own id; this module says what they are. Messages (kinds of `secdfd.common.net.wire`):

    have {client, key, crops}  follower -> leader, outside every conversation (session id ""):
                               the follower holds its share (of `crops` crops) of client session
                               `client` of the client with public key `key`. Only such requests
                               are started, and only when both shares hold as many crops.
    session {bundle, client,   seq 0 of a conversation. Leader -> follower: start the inference of
             key, request,     the client session `client` of client `key` with bundle `bundle`
             batch}            (one message); both servers call it `request` in logs and replies.
                               batch > 1: the request holds that many crops, and `bundle` is a batch
                               bundle the leader just had made (the follower fetches its half).
                               Bundle SETUP (-1): the set-up session. Follower -> leader with
                               bundle SETUP: "run set-up with me" (a set-up request).
    ready                      follower -> leader: the client's share and the bundle are in hand.
    split {share, model}       at set-up, leader first, then follower: the split id and architecture
                               digest of the sender's weight share. Both must match before anything
                               is opened: shares of two splits would reconstruct garbage, and
                               opening W - B with the other split's share would reveal the
                               difference of the two shares to the peer.
    open                       one protocol round (the engine's exchanges, then the online phase).
    error                      either side: why this conversation failed; the other stops waiting.

One inference, driven by server_a:
1. the client sends share i of its image to server i under one client session id; each server holds
   it (`secdfd.common.service.queue`), and server_b tells server_a it has it (`have`);
2. once server_a holds its share and has heard `have`, and it is this client's turn, server_a takes
   the oldest ready bundle k, records k as used, and starts conversation "b<k>" with a `session`
   message; server_b takes its held share and bundle k (recording it as used) and answers `ready`
   at once: neither server ever waits for a share. Two messages, counted as rounds of "session";
3. both run the online phase of the plan; each returns its output share to the client.

Set-up (opening F = W - B once) is a conversation started by server_a with `session` for bundle
SETUP, the `split` check, then one round. server_b asks for it (a set-up request, repeated every
ASK_EVERY seconds: a request can be lost with a connection, and server_a drops those that reach it
while it already runs set-up). Either side may restart at any time:
- server_b restarted while server_a waits in a session: its set-up request is a new conversation,
  which ends server_a's wait at once (PeerLost, the request kept in `stashed`); server_a runs set-up
  and retries its client's request with a fresh bundle;
- server_a restarted: its start-up set-up reaches server_b between sessions, or ends the session
  server_b waits in, and server_b joins it.
Set-up may run any number of times: it opens the same F = W - B each time (the shares and masks do
not change), so a repeat reveals nothing new and bundles prepared before it stay valid.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

from secdfd.common.errors import ModelError, PeerLost, PeerTimeout, SecDFDError
from secdfd.common.net.transport import ZmqChannel
from secdfd.common.net.wire import Message

log = logging.getLogger(__name__)

SETUP = -1  # the bundle of a set-up session
ASK_EVERY = 2.0  # how often server_b repeats its request for set-up while it waits
STEP = "session"  # the step label of the session protocol's own messages
MAX_NOTICES = 4096  # `have` notices kept until the leader takes them
_SETUP_META = {"bundle": SETUP, "client": "", "key": "", "request": "", "batch": 1}


@dataclass(frozen=True)
class SplitId:
    """Which split of which model a server's weight share belongs to (`secdfd share` writes both)."""

    share: str
    model: str

    def __str__(self) -> str:
        return f"split {self.share} (architecture {self.model[:12]})"


class SetsUp(Protocol):
    """The engine party: `setup` opens F = W - B over the channel (one round)."""

    def setup(self) -> None: ...


def asks_for_setup(msg: Message) -> bool:
    """A `session` message for the set-up session (from server_b: a request; from server_a: the start)."""
    return msg.kind == "session" and msg.meta.get("bundle") == SETUP


def starts_conversation(msg: Message, current: str) -> bool:
    """The first message of a conversation other than `current`."""
    return msg.kind == "session" and msg.seq == 0 and msg.sid != current


class SessionLink:
    """One server's end of the session protocol, on top of its server-to-server channel."""

    def __init__(self, channel: ZmqChannel, name: str, split: SplitId) -> None:
        self.channel = channel
        self.name = name  # this server
        self.split = split  # the split of this server's weight share
        self.peer = channel.peer
        # the start of a conversation the peer began while this end was waiting in another
        self.stashed: Message | None = None
        self.notices: list[Message] = []  # `have` messages, in arrival order, until taken
        self._stale: Callable[[Message], bool] | None = None
        channel.interrupt = self._interrupt

    def _interrupt(self, msg: Message, step: str) -> SecDFDError | None:
        """A message of another conversation: a notice is kept, a new conversation ends ours (its
        start kept for `next_start`), anything else is dropped."""
        if msg.kind == "have":
            self._keep_notice(msg)
            return None
        if not starts_conversation(msg, self.channel.sid) or (self._stale is not None and self._stale(msg)):
            return None
        self.stashed = msg
        return PeerLost(f"{self.peer} started a new session during step {step}; it gave this one up or restarted")

    def begin(self, sid: str, stale: Callable[[Message], bool] | None = None) -> None:
        """Start conversation `sid`; a start from the peer for which `stale` holds is dropped, not obeyed."""
        self.channel.begin(sid)
        self._stale = stale

    def waiting(self) -> bool:
        """Whether a start from the peer is already in hand (so there is no need to poll)."""
        return self.stashed is not None

    def _keep_notice(self, msg: Message) -> None:
        self.notices.append(msg)
        if len(self.notices) > MAX_NOTICES:  # a peer cannot make this list grow without bound
            del self.notices[0]

    def take_notices(self) -> list[Message]:
        out, self.notices = self.notices, []
        return out

    def announce(self, client_sid: str, key: bytes, crops: int = 1) -> None:
        """Follower: tell the leader that this server holds its share (of `crops` crops) of the
        client's request."""
        self.channel.notify("have", {"client": client_sid, "key": key.decode(), "crops": crops})

    def next_start(self, timeout: float) -> Message | None:
        """Wait for the peer to start a conversation; None at the deadline. Adopts its id; left-over
        messages of earlier conversations are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg, self.stashed = self.stashed, None
            if msg is None:
                msg = self.channel.next_message(max(0.0, deadline - time.monotonic()), STEP)
            if msg is None:
                return None
            if msg.kind == "have":
                self._keep_notice(msg)
                continue
            if starts_conversation(msg, self.channel.sid):
                self.channel.begin(msg.sid, received=1)
                self._stale = None
                return msg
            log.debug("dropping %s from %s of conversation %s while idle", msg.kind, self.peer, msg.sid)

    def next_start_now(self) -> Message | None:
        """`next_start` without waiting; a malformed message is logged and dropped."""
        try:
            return self.next_start(0)
        except SecDFDError as e:
            log.warning("dropped a message from %s: %s", self.peer, e)
            return None

    # --- an inference ---------------------------------------------------------------------------

    def start(self, bundle_id: int, client_sid: str, key: bytes, request: str, batch: int = 1) -> None:
        """Leader: start the inference of client `key`'s session `client_sid` with bundle
        `bundle_id` (a batch bundle of `batch` crops when batch > 1: ids of their own ledger); both
        servers call it `request` (an opaque id) in their logs and replies."""
        self.begin(f"b{bundle_id}" if batch == 1 else f"n{bundle_id}")
        self.channel.send("session", STEP, {"bundle": bundle_id, "client": client_sid, "key": key.decode(),
                                            "request": request, "batch": batch})

    def wait_ready(self, timeout: float) -> None:
        """Leader: wait for the follower's `ready` (an `error` from it is raised as its exception)."""
        self.channel.recv("ready", STEP, timeout=timeout)

    def ready(self) -> None:
        """Follower: the client's share and the bundle are in hand."""
        self.channel.send("ready", STEP)

    def abort(self, err: BaseException) -> None:
        """Tell the peer why this conversation failed (best effort)."""
        self.channel.abort(err, STEP)

    # --- set-up ---------------------------------------------------------------------------------

    def lead_setup(self, party: SetsUp, patience: float) -> None:
        """server_a: start set-up and run it; server_b's set-up requests that arrive meanwhile are
        what this answers, so they are dropped, not obeyed. `patience` bounds the wait for the peer."""
        with round_deadline(self.channel, patience):
            self.begin(f"setup-{secrets.token_hex(8)}", stale=asks_for_setup)
            self.channel.send("session", STEP, _SETUP_META)
            self._send_split()
            self._check_split(self.channel.recv("split", STEP))
            party.setup()
        log.info("%s: weights set up with %s", self.name, self.peer)

    def join_setup(self, party: SetsUp, stop: threading.Event, patience: float) -> bool:
        """server_b: ask for set-up until server_a starts it, then run it. A session server_a
        announces meanwhile is answered with PeerLost: server_a then finds the request and runs
        set-up first. False if `stop` was set before set-up happened."""
        with round_deadline(self.channel, patience):
            deadline = time.monotonic() + patience
            ask = 0.0
            while True:
                if stop.is_set():
                    return False
                now = time.monotonic()
                if now > deadline:
                    raise PeerTimeout(f"{self.peer} did not start set-up within {patience:g} s; check that it "
                                      "is running")
                if now >= ask:
                    self.begin(f"setup-request-{secrets.token_hex(8)}")
                    self.channel.send("session", STEP, _SETUP_META)
                    ask = time.monotonic() + ASK_EVERY
                msg = self.next_start(min(1.0, ASK_EVERY))
                if msg is not None and asks_for_setup(msg):
                    break
                if msg is not None:
                    self.abort(PeerLost(f"{self.name} is not set up (it started or lost set-up) and "
                                        "has asked for set-up"))
            self.follow_setup(party)
        return True

    def follow_setup(self, party: SetsUp) -> None:
        """server_b, once server_a has started set-up (its `session` start adopted): check that both
        hold shares of the same split, then open F = W - B."""
        self._check_split(self.channel.recv("split", STEP))
        self._send_split()
        party.setup()
        log.info("%s: weights set up with %s", self.name, self.peer)

    def _send_split(self) -> None:
        self.channel.send("split", STEP, {"share": self.split.share, "model": self.split.model})

    def _check_split(self, msg: Message) -> None:
        """ModelError (also sent to the peer) unless the peer's share is of this server's split."""
        theirs = SplitId(str(msg.meta["share"]), str(msg.meta["model"]))
        if theirs == self.split:
            return
        err = ModelError(f"{self.name} holds a weight share of {self.split}, {self.peer} one of {theirs}: "
                         "give both servers the shares of one `secdfd share` run (and the dealer its model.json)")
        self.abort(err)
        raise err


@contextmanager
def round_deadline(channel: ZmqChannel, seconds: float) -> Iterator[None]:
    """The channel's round deadline is `seconds` within the block (the peer may still be starting)."""
    saved, channel.timeout = channel.timeout, seconds
    try:
        yield
    finally:
        channel.timeout = saved
