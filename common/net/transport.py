"""ZeroMQ transport: CURVE on every socket, allow-lists enforced by ZAP, deadlines on every receive.

One `Node` per process owns the ZeroMQ context, the party's CURVE keypair and the ZAP
authenticator (a `zmq.auth.thread.ThreadAuthenticator`). A listening socket is a CURVE server
(`curve_server` is set before `bind`) in a ZAP domain whose allow-list is a folder of public keys
(`allow/<domain>/` from `secdfd keys`); a peer whose key is not in that folder fails the handshake
and never delivers a message. A connecting socket is a CURVE client that pins the server's public
key. Messages use the wire format of `secdfd.common.net.wire`.

Three ways of talking, all with deadlines:

- `ZmqChannel` (server_a <-> server_b): the `Channel` interface over a DEALER-DEALER pair, server_a
  binding, server_b connecting. `exchange` is one round: send this party's tensors, receive the
  peer's. Messages carry a conversation id (`sid`) and a per-direction counter, so a late message of
  an earlier conversation is recognised and dropped, and a message out of step is a ProtocolError.
  `send`/`recv` carry single messages of the current conversation, `next_message` whatever comes
  next, and `abort` tells the peer why a conversation failed so that it stops waiting at once. What
  the messages mean (set-up, session start, ready) is the session protocol's business
  (`secdfd.common.service.session`), which may claim a message of another conversation through the
  `interrupt` hook.
- `Requester` (client -> server, server -> dealer): one outstanding request at a time on a DEALER
  socket; the reply must echo the request's session id and counter. A socket monitor turns a
  refused key or a dropped connection into an immediate PeerLost instead of a silent timeout.
- `Responder` (server and dealer side): a ROUTER socket; each request comes with the sender's
  authenticated public key (the ZAP User-Id), so a party's role is taken from its key, never from
  what it claims. Malformed requests are answered with an error message and never reach the caller.

Deadlines raise PeerTimeout naming the peer and the step. Tensor frames are handed to ZeroMQ without
copying; `exchange` waits until ZeroMQ has released them, so the caller may reuse its tensors.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from secdfd.common.engine.channel import Stats, payload_bytes
from secdfd.common.errors import ERRORS, NotAdmitted, PeerLost, PeerTimeout, ProtocolError, RemoteError, SecDFDError
from secdfd.common.net.keys import KeyFileError, PartyKeys, allowed_keys, read_public
from secdfd.common.net.wire import (
    DEFAULT_LIMITS,
    MESSAGE_KINDS,
    Limits,
    Message,
    MessageKinds,
    error_message,
    pack,
    unpack,
)

log = logging.getLogger(__name__)

Socket = zmq.Socket[bytes]  # every socket here sends and receives bytes frames

_HEARTBEAT_MS = 1000  # ZMTP pings: a dead peer is noticed (and reconnected) within a few seconds
_HEARTBEAT_TIMEOUT_MS = 5000
_FRAME_OVERHEAD = 256
ALLOW_REFRESH = 1.0  # seconds between looks at a listening socket's allow-list folder
_LINK_CHECK_MS = 500  # in a session, how often a channel looks at its link besides on disconnect events


class Node:
    """One process's ZeroMQ context, CURVE identity and ZAP authenticator.

    Use as a context manager, or call `close()`: it stops the authenticator and closes every
    socket it made.
    """

    def __init__(self, keys: PartyKeys, limits: Limits = DEFAULT_LIMITS, kinds: MessageKinds = MESSAGE_KINDS) -> None:
        self.keys = keys
        self.limits = limits
        self.kinds = kinds
        self.context = zmq.Context()
        self._auth: ThreadAuthenticator | None = None
        self._sockets: list[Socket] = []
        self._domains: dict[str, Path] = {}

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self._sockets:
            s.close(linger=0)
        self._sockets.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.term()

    def _socket(self, socket_type: int, limits: Limits | None = None) -> Socket:
        s = self.context.socket(socket_type)
        s.linger = 0
        # set before bind/connect; it applies per frame, to the frame as it travels (CURVE adds a few
        # dozen bytes of nonce, tag and flags to each)
        s.maxmsgsize = (limits or self.limits).max_frame + _FRAME_OVERHEAD
        s.heartbeat_ivl = _HEARTBEAT_MS
        s.heartbeat_timeout = _HEARTBEAT_TIMEOUT_MS
        s.curve_secretkey = self.keys.secret
        s.curve_publickey = self.keys.public
        self._sockets.append(s)
        return s

    def listen(self, endpoint: str, domain: str, socket_type: int = zmq.ROUTER,
               limits: Limits | None = None) -> tuple[Socket, str]:
        """A CURVE server socket bound to `endpoint`, admitting only keys in allow/<domain>/.

        Returns the socket and the endpoint actually bound (useful with tcp://127.0.0.1:*).
        """
        s, bound, _ = self.listen_monitored(endpoint, domain, socket_type, monitor=False, limits=limits)
        return s, bound

    def listen_monitored(self, endpoint: str, domain: str, socket_type: int = zmq.ROUTER,
                         monitor: bool = True, limits: Limits | None = None) -> tuple[Socket, str, Socket | None]:
        """`listen`, plus (with `monitor`) a socket reporting handshakes and disconnections."""
        folder = self.keys.allow_dir(domain)
        if not allowed_keys(folder):
            raise KeyFileError(f"{self.keys.name}: allow-list {folder} is empty, nobody could connect; "
                               "copy the peers' public .key files into it")
        if self._auth is None:
            self._auth = ThreadAuthenticator(self.context, log=log.getChild("zap"))
            self._auth.start()
        self._auth.configure_curve(domain=domain, location=str(folder))
        self._domains[domain] = folder
        s = self._socket(socket_type, limits)
        s.curve_server = True  # before bind: every connection must do the CURVE handshake
        s.zap_domain = domain.encode()
        s.zap_enforce_domain = True  # no ZAP handler answering means refusal, never admission
        mon = None
        if monitor:
            mon = s.get_monitor_socket(_MONITORED)
            self._sockets.append(mon)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as e:
            raise PeerLost(f"{self.keys.name} cannot listen on {endpoint}: {e.strerror}; "
                           "choose another address or stop the process using it") from None
        return s, str(s.get_string(zmq.LAST_ENDPOINT)), mon

    def reload_allow(self, domain: str) -> None:
        """Read domain's allow-list folder again (new handshakes see the change at once)."""
        if self._auth is not None and domain in self._domains:
            self._auth.configure_curve(domain=domain, location=str(self._domains[domain]))

    def connect(self, endpoint: str, server: str, socket_type: int = zmq.DEALER,
                monitor: bool = False) -> tuple[Socket, Socket | None]:
        """A CURVE client socket to `server` at `endpoint`, pinning the server's public key.

        With `monitor`, also a socket that reports handshake failures and disconnections.
        """
        s = self._socket(socket_type)
        s.curve_serverkey = self.keys.server_key(server)
        s.immediate = True  # queue messages only on completed (authenticated) connections
        mon = None
        if monitor:
            mon = s.get_monitor_socket(_MONITORED)
            self._sockets.append(mon)
        s.connect(endpoint)
        return s, mon


_MONITORED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)


def remote_error(peer: str, msg: Message) -> SecDFDError:
    """The local exception for an `error` message: same class by name, RemoteError if unknown."""
    name = str(msg.meta.get("error", ""))
    cls = ERRORS.get(name)
    if cls is None or cls is SecDFDError:
        cls = RemoteError
    where = f" at step {msg.step}" if msg.step else ""
    return cls(f"{peer} reported {name}{where}: {msg.meta.get('message', '')}")


def _ms(deadline: float) -> int:
    return max(0, int((deadline - time.monotonic()) * 1000))


def _recv_now(sock: Socket) -> list[zmq.Frame] | None:
    """The next message if one is there, else None. A poll may report a socket readable when no
    message can be read (a ZMTP heartbeat wakes it), so a receive must never block: a blocking one
    waited for good when the peer had died meanwhile."""
    try:
        return sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return None


def _send(sock: Socket, frames: list[Any], deadline: float, peer: str, step: str,
          track: bool = False) -> zmq.MessageTracker | None:
    if not sock.poll(_ms(deadline), zmq.POLLOUT):
        raise PeerTimeout(f"could not send to {peer} at step {step}: not connected within the deadline; "
                          f"check that {peer} is running, reachable and has this party's public key")
    try:
        return sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=track)
    except zmq.Again:
        raise PeerTimeout(f"could not send to {peer} at step {step}: its queue is full") from None


class ZmqChannel:
    """One server's end of the server_a <-> server_b channel (the `Channel` interface)."""

    def __init__(self, sock: Socket, peer: str, timeout: float, limits: Limits = DEFAULT_LIMITS,
                 kinds: MessageKinds = MESSAGE_KINDS, endpoint: str = "", monitor: Socket | None = None) -> None:
        self.sock = sock
        self.endpoint = endpoint
        self.peer = peer
        self.timeout = timeout
        self.limits = limits
        self.kinds = kinds
        self.stats = Stats()
        self.sid = ""
        self._sent = 0
        self._received = 0
        self._monitor = monitor
        self._poller = zmq.Poller()
        self._poller.register(sock, zmq.POLLIN)
        if monitor is not None:
            self._poller.register(monitor, zmq.POLLIN)
        # a message of another conversation arrived while waiting in this one: an error to end the
        # wait with, or None to drop the message (set by the session protocol)
        self.interrupt: Callable[[Message, str], SecDFDError | None] | None = None
        self._linked = False

    @classmethod
    def listen(cls, node: Node, endpoint: str, peer: str = "server_b", timeout: float = 60.0) -> ZmqChannel:
        """server_a's end: bind `endpoint` in the "peer" domain; read `.endpoint` for the bound one."""
        sock, bound, mon = node.listen_monitored(endpoint, "peer", zmq.DEALER)
        return cls(sock, peer, timeout, node.limits, node.kinds, bound, mon)

    @classmethod
    def connect(cls, node: Node, endpoint: str, peer: str = "server_a", timeout: float = 60.0) -> ZmqChannel:
        """server_b's end: connect to server_a's peer endpoint."""
        sock, mon = node.connect(endpoint, peer, zmq.DEALER, monitor=True)
        return cls(sock, peer, timeout, node.limits, node.kinds, endpoint, mon)

    @property
    def connected(self) -> bool:
        """Whether the peer is connected now (authenticated: both ends queue only on such links)."""
        return bool(self.sock.poll(0, zmq.POLLOUT))

    def begin(self, sid: str, received: int = 0) -> None:
        """Start conversation `sid`: message counters restart (`received` messages of it already in
        hand), messages of other conversations are dropped or claimed by `interrupt`."""
        self.sid = sid
        self._sent = 0
        self._received = received
        self._linked = received > 0  # from this conversation's first message on, a lost link is fatal

    def exchange(self, step: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One round: send `tensors` (all openings of the round in one message), get the peer's."""
        deadline = time.monotonic() + self.timeout
        self._check_link(step)
        frames = pack(Message("open", self.sid, self._sent, step, {}, tensors), self.kinds)
        tracker = _send(self.sock, frames, deadline, self.peer, step, track=True)
        self._sent += 1
        self._linked = True
        self.stats.add(step, payload_bytes(tensors))
        got = self._recv("open", step, deadline).tensors
        if len(got) != len(tensors) or any(
            g.shape != t.shape or g.dtype != t.dtype for g, t in zip(got, tensors, strict=False)
        ):
            raise ProtocolError(f"{self.peer} is out of step at {step}: sent {_sig(got)}, expected "
                                f"{_sig(tensors)}; both servers must run the same plan")
        if tracker is not None and not tracker.done:
            tracker.wait(max(0.001, deadline - time.monotonic()))  # our buffers are free again
        return list(got)

    def send(self, kind: str, step: str, meta: Mapping[str, Any] | None = None) -> None:
        """Send a control message of this session (counted as one round of `step`)."""
        deadline = time.monotonic() + self.timeout
        self._check_link(step)
        _send(self.sock, pack(Message(kind, self.sid, self._sent, step, dict(meta or {})), self.kinds),
              deadline, self.peer, step)
        self._sent += 1
        self._linked = True
        self.stats.add(step, 0)

    def recv(self, kind: str, step: str, timeout: float | None = None) -> Message:
        """Receive the next message of this session, which must be of `kind`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        return self._recv(kind, step, deadline)

    def next_message(self, timeout: float, step: str = "idle") -> Message | None:
        """Whatever message comes next, of any conversation, without checking it against this one;
        None at the deadline. For waiting between conversations: a lost link is not an error here."""
        return self._next(time.monotonic() + timeout, step, idle=True)

    def notify(self, kind: str, meta: Mapping[str, Any]) -> None:
        """A message outside every conversation (session id ""), e.g. server_b's `have`; it leaves the
        counters of the current conversation alone. PeerTimeout if the link is not up in time."""
        deadline = time.monotonic() + self.timeout
        _send(self.sock, pack(Message(kind, "", 0, "notice", dict(meta)), self.kinds), deadline, self.peer, "notice")

    def abort(self, exc: BaseException, step: str = "") -> None:
        """Best effort: tell the peer why this session failed, so it stops waiting now."""
        try:
            frames = pack(error_message(exc, self.sid, self._sent, step), self.kinds)
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            self._sent += 1
        except (zmq.ZMQError, ValueError):
            log.debug("could not report the error to %s", self.peer)

    def _next(self, deadline: float, step: str, idle: bool = False) -> Message | None:
        """The next message, None at the deadline.

        In a session (not `idle`), a lost link is PeerLost at once: the messages in flight went with
        it, so waiting for the deadline could only end in a timeout. Queued messages come first.
        """
        while True:
            if self.sock.poll(0, zmq.POLLIN):  # the common case in a round: the peer was first
                events: dict[Any, int] = {self.sock: zmq.POLLIN}
            else:
                wait = _ms(deadline) if idle else min(_ms(deadline), _LINK_CHECK_MS)
                events = dict(self._poller.poll(wait))
            if self.sock in events:
                frames = _recv_now(self.sock)
                if frames is not None:
                    return unpack(frames, self.peer, step, self.limits, self.kinds)
            if self._monitor is not None and self._monitor in events:
                while self._monitor.poll(0):  # only a wake-up: the socket's own state is what counts
                    recv_monitor_message(self._monitor)
            if not idle:
                self._check_link(step)
            if time.monotonic() >= deadline:
                return None

    def _check_link(self, step: str) -> None:
        """PeerLost if this session's link is gone: its messages in flight went with it."""
        if self._linked and not self.connected:
            raise PeerLost(f"lost the connection to {self.peer} at step {step}; it may have stopped or "
                           "restarted")

    def _recv(self, kind: str, step: str, deadline: float) -> Message:
        while True:
            msg = self._next(deadline, step)
            if msg is None:
                raise PeerTimeout(f"no message from {self.peer} within {self.timeout:g} s at step {step}; "
                                  f"check that {self.peer} is running")
            if msg.sid != self.sid:
                err = self.interrupt(msg, step) if self.interrupt is not None else None
                if err is not None:
                    raise err
                log.debug("dropping %s from %s of conversation %s", msg.kind, self.peer, msg.sid)
                continue
            if msg.kind == "error":
                raise remote_error(self.peer, msg)
            if msg.seq != self._received or msg.kind != kind or msg.step != step:
                raise ProtocolError(f"{self.peer} is out of step: expected {kind} #{self._received} at step "
                                    f"{step}, got {msg.kind} #{msg.seq} at step {msg.step}")
            self._received += 1
            self._linked = True
            return msg


def _sig(tensors: Sequence[torch.Tensor]) -> str:
    return "[" + ", ".join(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in tensors) + "]"


class Pending(NamedTuple):
    """A request sent and not yet answered."""

    sid: str
    seq: int
    step: str
    deadline: float
    waited: float


class Requester:
    """Requests to one server (client -> server, server -> dealer), one at a time, with deadlines."""

    def __init__(self, node: Node, endpoint: str, server: str, timeout: float = 30.0,
                 limits: Limits | None = None) -> None:
        """`limits` bounds the replies read (default: the node's); frames are bounded by the node's."""
        self.server = server
        self.endpoint = endpoint
        self.timeout = timeout
        self.limits = limits or node.limits
        self.kinds = node.kinds
        self.sock, mon = node.connect(endpoint, server, zmq.DEALER, monitor=True)
        self._monitor: Socket = mon  # type: ignore[assignment]  # monitor=True always makes one
        self._stream = secrets.token_hex(8)
        self._seq = 0
        self._failure: str | None = None
        self._disconnected = False

    def request(self, kind: str, meta: Mapping[str, Any] | None = None,
                tensors: Sequence[torch.Tensor] = (), *, step: str | None = None, sid: str | None = None,
                timeout: float | None = None, link_wait: float | None = None) -> Message:
        """Send one request and return the reply; an `error` reply is raised as its exception."""
        return self.finish(self.start(kind, meta, tensors, step=step, sid=sid, timeout=timeout, link_wait=link_wait))

    def start(self, kind: str, meta: Mapping[str, Any] | None = None,
              tensors: Sequence[torch.Tensor] = (), *, step: str | None = None, sid: str | None = None,
              timeout: float | None = None, link_wait: float | None = None) -> Pending:
        """Send a request without waiting for the reply (so that two servers can work at once).

        `timeout` bounds the whole request; `link_wait`, if shorter, how long to wait for the
        connection to be up (a peer that is down is then reported sooner than its reply would be)."""
        step = step or kind
        sid = sid or self._stream
        seq = self._seq
        self._seq += 1
        waited = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + waited
        frames = pack(Message(kind, sid, seq, step, dict(meta or {}), tensors), self.kinds)
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLOUT)
        # 1. wait until the connection is authenticated (immediate=True: no queueing before that);
        #    a refused key shows up on the monitor at once instead of as a silent timeout
        link_deadline = deadline if link_wait is None else min(deadline, time.monotonic() + link_wait)
        while not self.link_up(step):
            if not poller.poll(_ms(link_deadline)):
                waited_link = waited if link_wait is None else min(waited, link_wait)
                raise PeerTimeout(f"could not reach {self.server} at {self.endpoint} within {waited_link:g} s at "
                                  f"step {step}; check that {self.server} is running and that it has this "
                                  "party's public key")
        try:
            self.sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            raise PeerTimeout(f"could not send to {self.server} at step {step}: its queue is full") from None
        self._disconnected = False
        return Pending(sid, seq, step, deadline, waited)

    def finish(self, pending: Pending) -> Message:
        """Wait for the reply to `pending`, which must echo its session id and counter."""
        reply = self.poll(pending, pending.deadline)
        assert reply is not None  # poll raises at the request's own deadline
        return reply

    def link_up(self, step: str = "detect") -> bool:
        """Whether a request can go now (the connection is authenticated); PeerLost if the server
        refused this party's key or the handshake failed."""
        self._read_monitor()
        if self.sock.poll(0, zmq.POLLOUT):
            return True
        if self._failure is not None:
            raise PeerLost(f"{self._failure} (step {step})")
        return False

    @property
    def sockets(self) -> tuple[Socket, Socket]:
        """The sockets a reply or a disconnection shows up on (to wait on several servers at once)."""
        return self.sock, self._monitor

    def poll(self, pending: Pending, until: float) -> Message | None:
        """The reply to `pending` if it comes before `until` (monotonic), else None.

        Raises at the request's own deadline (PeerTimeout), on an error reply, and when the connection
        drops (PeerLost): a caller waiting for several servers learns of a failure at once.
        """
        sid, seq, step, deadline, waited = pending
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self.sock, zmq.POLLIN)
        while True:
            events = dict(poller.poll(_ms(min(until, deadline))))
            if not events:
                if until < deadline and time.monotonic() < deadline:  # (poll rounds down to whole ms)
                    return None
                raise PeerTimeout(f"no answer from {self.server} at {self.endpoint} within {waited:g} s at "
                                  f"step {step}; check that {self.server} is running")
            if self.sock in events and (frames := _recv_now(self.sock)) is not None:
                reply = unpack(frames, self.server, step, self.limits, self.kinds)
                if reply.kind == "error" and (reply.sid == "" or (reply.sid, reply.seq) == (sid, seq)):
                    raise remote_error(self.server, reply)
                if (reply.sid, reply.seq) == (sid, seq):
                    return reply
                log.debug("dropping a late reply from %s", self.server)
            elif self._monitor in events:
                self._read_monitor()
                if self._disconnected:  # the request or its reply was lost with the connection
                    raise PeerLost(f"{self.server} at {self.endpoint} closed the connection during step "
                                   f"{step}; it may have stopped or restarted, try again")

    def _read_monitor(self) -> None:
        """Track the connection: the latest handshake failure (cleared by a success), disconnects."""
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._failure = (f"{self.server} at {self.endpoint} refused this party's key: add this "
                                 f"party's public key to {self.server}'s allow-list")
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                self._failure = (f"CURVE handshake with {self.server} at {self.endpoint} failed: check "
                                 f"that public/{self.server}.key is {self.server}'s current key")
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._failure = None
            elif event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True


@dataclass(frozen=True)
class Request:
    """A validated request: who sent it (by authenticated key) and what."""

    route: bytes
    sender: str  # the name of the sender's key file in the allow-list (e.g. "client", "server_a")
    message: Message
    key: bytes = b""  # the sender's authenticated public key (z85)


class AllowList:
    """An allow-list folder of public keys, read again whenever its files change."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._stamp: tuple[tuple[str, int, int], ...] | None = None
        self.names: dict[bytes, str] = {}  # key -> the stem of its file
        self.refresh()

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        out = []
        for f in sorted(self.folder.glob("*.key")):
            try:
                st = f.stat()
            except OSError:
                continue
            out.append((f.name, st.st_mtime_ns, st.st_size))
        return tuple(out)

    def refresh(self) -> bool:
        """Read the folder again if a file was added, removed or changed; True if it was."""
        stamp = self._fingerprint()
        if stamp == self._stamp:
            return False
        names = {}
        for f in sorted(self.folder.glob("*.key")):
            try:
                names[read_public(f)] = f.stem
            except KeyFileError as e:
                log.warning("%s", e)
        self._stamp, self.names = stamp, names
        return True


class Responder:
    """The server side of requests: a CURVE ROUTER socket in one ZAP domain.

    The domain's allow-list is read again within `ALLOW_REFRESH` seconds of a change: a key added
    can connect, and a key removed is refused at its next handshake and, on a connection made
    before, at its next request (NotAdmitted). A request names its sender by the key file's name.
    """

    def __init__(self, node: Node, endpoint: str, domain: str, limits: Limits | None = None) -> None:
        self.sock, self.endpoint = node.listen(endpoint, domain, zmq.ROUTER, limits)
        self.node = node
        self.domain = domain
        self.name = node.keys.name
        self.allow = AllowList(node.keys.allow_dir(domain))
        self._checked = time.monotonic()
        self.limits = limits or node.limits
        self.kinds = node.kinds

    def refresh_allow(self) -> None:
        """Read the allow-list again if it changed (at most every ALLOW_REFRESH seconds); a serve loop
        calls it often, since a refused key never reaches `recv`."""
        now = time.monotonic()
        if now - self._checked < ALLOW_REFRESH:
            return
        self._checked = now
        if self.allow.refresh():
            self.node.reload_allow(self.domain)
            log.info("%s: allow-list %s read again (%d keys)", self.name, self.allow.folder, len(self.allow.names))

    def recv(self, timeout: float) -> Request | None:
        """The next well-formed request from an admitted key, or None when `timeout` passes first."""
        deadline = time.monotonic() + timeout
        self.refresh_allow()
        while self.sock.poll(_ms(deadline), zmq.POLLIN):
            frames = _recv_now(self.sock)
            if frames is None or len(frames) < 2:
                continue
            route = frames[0].bytes
            key = str(frames[1].get("User-Id") or "").encode()
            sender = self.allow.names.get(key)
            if sender is None:  # admitted once, removed from the allow-list since
                self._send(route, error_message(NotAdmitted(
                    f"{self.name} no longer admits this party's key; ask its operator to put the public key "
                    f"back into allow/{self.domain}/")))
                continue
            try:
                msg = unpack(frames[1:], sender, "request", self.limits, self.kinds)
            except ProtocolError as e:
                log.warning("%s", e)
                self._send(route, error_message(e))
                continue
            return Request(route, sender, msg, key)
        return None

    def reply(self, req: Request, kind: str, meta: Mapping[str, Any] | None = None,
              tensors: Sequence[torch.Tensor] = ()) -> None:
        m = req.message
        self._send(req.route, Message(kind, m.sid, m.seq, m.step, dict(meta or {}), tensors))

    def reply_error(self, req: Request, exc: BaseException) -> None:
        m = req.message
        self._send(req.route, error_message(exc, m.sid, m.seq, m.step))

    def _send(self, route: bytes, msg: Message) -> None:
        # ROUTER drops a reply to a peer that has gone; a server never blocks on a departed client.
        try:
            self.sock.send_multipart([route, *pack(msg, self.kinds)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("reply to a departed peer dropped")

