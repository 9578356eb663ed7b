"""The session protocol between the servers over a real CurveZMQ channel on loopback."""

from __future__ import annotations

import pytest
import torch

from secdfd.common.engine.channel import run_pair
from secdfd.common.errors import PeerLost, PeerTimeout
from secdfd.common.net.wire import Message, pack
from secdfd.common.service.session import SessionLink, SplitId

SPLIT = SplitId("0" * 32, "m" * 32)

pytestmark = pytest.mark.sockets

ANY = "tcp://127.0.0.1:*"


def test_session_start_and_stale_messages(servers):
    """The follower adopts each new session; left-overs of an aborted one are dropped."""
    a, b = servers
    lb = SessionLink(b, "server_b", SPLIT)
    # an aborted session leaves its start and one opening in b's queue
    a.begin("old")
    a.send("session", "session", {"bundle": 1, "client": "c1", "key": "", "request": "r1", "batch": 1})
    a.sock.send_multipart(pack(Message("open", "old", 1, "open/1", tensors=[torch.tensor([99])])))

    def fa():
        a.begin("new")
        a.send("session", "session", {"bundle": 9, "client": "c2", "key": "", "request": "r2", "batch": 1})
        a.recv("ready", "session")
        a.sock.send_multipart(pack(Message("open", "old", 2, "open/1", tensors=[torch.tensor([98])])))
        return a.exchange("open/1", [torch.tensor([5])])

    def fb():
        first = lb.next_start(2.0)
        assert (first.sid, first.meta["bundle"]) == ("old", 1)
        msg = lb.next_start(2.0)  # drops the old opening, adopts "new"
        assert (msg.sid, dict(msg.meta)) == ("new", {"bundle": 9, "client": "c2", "key": "", "request": "r2",
                                                     "batch": 1})
        b.send("ready", "session")
        return b.exchange("open/1", [torch.tensor([6])])  # drops the late opening of "old"

    ra, rb = run_pair(fa, fb)
    assert int(ra[0]) == 6 and int(rb[0]) == 5


def test_a_session_started_by_the_peer_ends_the_current_one(servers):
    """The peer starting a session (it gave ours up, or restarted) ends ours with PeerLost; its
    start message is kept for next_start. A `stale` predicate drops such messages instead."""
    a, b = servers
    la = SessionLink(a, "server_a", SPLIT)
    b.begin("b-1")
    b.send("session", "session", {"bundle": 7, "client": "", "key": "", "request": "", "batch": 1})
    assert la.next_start(2.0).meta["bundle"] == 7
    a.send("ready", "session")
    b.recv("ready", "session")
    b.begin("b-2")  # server_b gives b-1 up and starts over
    b.send("session", "session", {"bundle": -1, "client": "", "key": "", "request": "", "batch": 1})
    with pytest.raises(PeerLost, match="server_b started a new session during step session"):
        a.recv("ready", "session")
    assert la.stashed is not None and la.stashed.sid == "b-2"
    msg = la.next_start(0)
    assert msg is not None and (msg.sid, msg.meta["bundle"]) == ("b-2", -1) and la.stashed is None
    # the same start message, declared stale, is dropped: the session goes on to its deadline
    la.begin("a-3", stale=lambda m: m.meta.get("bundle") == -1)
    b.begin("b-3")
    b.send("session", "session", {"bundle": -1, "client": "", "key": "", "request": "", "batch": 1})
    with pytest.raises(PeerTimeout):
        a.recv("ready", "session", timeout=0.5)
    assert la.stashed is None
