"""The requests a server holds: bounds per client and in total, pairing, fairness, expiry."""

from __future__ import annotations

import time

import pytest

from secdfd.common.errors import Busy
from secdfd.common.net.transport import Request
from secdfd.common.net.wire import Message
from secdfd.common.service.queue import RequestQueue


def req(key: bytes, sid: str) -> Request:
    return Request(b"route", "client", Message("detect", sid), key)


def test_bounds_per_client_and_in_total():
    q = RequestQueue("server_a", per_client=2, total=3)
    q.add(req(b"x", "1"))
    q.add(req(b"x", "2"))
    with pytest.raises(Busy, match="this client has 2 requests waiting"):
        q.add(req(b"x", "3"))
    q.add(req(b"y", "1"))
    with pytest.raises(Busy, match="3 requests are waiting"):
        q.add(req(b"z", "1"))
    with pytest.raises(Busy, match="already holds this request"):
        q.add(req(b"y", "1"))
    assert len(q) == 3


def test_only_paired_requests_run_and_a_key_names_only_its_own():
    q = RequestQueue("server_a", per_client=2, total=8)
    q.add(req(b"x", "1"))
    assert q.next_ready() is None and not q.has_ready()
    q.announce((b"y", "1"))  # another client's key with the same session id pairs nothing of x
    assert q.next_ready() is None
    q.announce((b"x", "1"))
    e = q.next_ready()
    assert e is not None and e.ticket == (b"x", "1") and len(q) == 0
    q.announce((b"x", "2"))  # server_b's notice may come first
    q.add(req(b"x", "2"))
    assert q.has_ready() and q.next_ready().ticket == (b"x", "2")  # type: ignore[union-attr]


def test_round_robin_over_clients():
    """x queued two requests before y queued one: after x's first runs, y's runs before x's second."""
    q = RequestQueue("server_a", per_client=2, total=8)
    for t in ((b"x", "1"), (b"x", "2"), (b"y", "1"), (b"z", "1")):
        q.add(req(*t))
        q.announce(t)
    order = [q.next_ready().ticket for _ in range(4)]  # type: ignore[union-attr]
    assert order == [(b"x", "1"), (b"y", "1"), (b"z", "1"), (b"x", "2")]
    # with one client alone, its requests run in arrival order
    for t in ((b"x", "3"), (b"x", "4")):
        q.add(req(*t))
        q.announce(t)
    assert [q.next_ready().ticket for _ in range(2)] == [(b"x", "3"), (b"x", "4")]  # type: ignore[union-attr]


def test_expiry_and_a_restarted_follower():
    q = RequestQueue("server_a", per_client=4, total=8)
    q.add(req(b"x", "1"))
    q.add(req(b"x", "2"))
    q.announce((b"x", "2"))
    time.sleep(0.05)
    assert [e.ticket for e in q.expired(unpaired_after=0.01, after=10)] == [(b"x", "1")]  # never paired
    assert [e.ticket for e in q.unpair_all()] == [(b"x", "2")]  # server_b lost its shares
    assert len(q) == 0
    q.add(req(b"x", "3"))
    q.announce((b"x", "3"))
    time.sleep(0.05)
    assert [e.ticket for e in q.expired(unpaired_after=10, after=0.01)] == [(b"x", "3")]  # waited too long
