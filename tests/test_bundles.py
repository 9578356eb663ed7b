"""Bundle ids are never reused (also across restarts); both servers see the same id sequence."""

from __future__ import annotations

import threading
import time

import pytest

from secdfd.common.errors import PeerTimeout, RandomnessError
from secdfd.common.service.supply import BundleBook, BundleQueue, IdLedger, PrepareAhead, Ready


def test_ledger_never_reuses_ids_across_restarts(tmp_path):
    path = tmp_path / "state" / "server_a.used"
    led = IdLedger(path)
    assert led.last == -1
    led.claim(3)
    led.claim(7)
    with pytest.raises(RandomnessError, match="bundle 7 was already used"):
        led.claim(7)
    with pytest.raises(RandomnessError, match="bundle 5 was already used"):
        led.claim(5)
    again = IdLedger(path)  # a restart
    assert again.last == 7
    with pytest.raises(RandomnessError):
        again.claim(7)
    dealer = IdLedger(tmp_path / "dealer.next")
    assert [dealer.next() for _ in range(3)] == [0, 1, 2]
    assert IdLedger(tmp_path / "dealer.next").next() == 3
    (tmp_path / "bad").write_text("x")
    with pytest.raises(RandomnessError, match="corrupt"):
        IdLedger(tmp_path / "bad")


def test_book_hands_each_half_once_in_the_same_order(tmp_path):
    made = []

    def make(i):
        made.append(i)
        return (f"a{i}", f"b{i}")

    book = BundleBook(make, IdLedger(tmp_path / "next"), cap=3)
    a = [book.next_for(0) for _ in range(3)]
    b = [book.next_for(1) for _ in range(2)]
    a.append(book.next_for(0))
    b += [book.next_for(1) for _ in range(3)]
    assert a == [(0, "a0"), (1, "a1"), (2, "a2"), (3, "a3")]
    assert b == [(0, "b0"), (1, "b1"), (2, "b2"), (3, "b3"), (4, "b4")]
    assert made == [0, 1, 2, 3, 4] and book.waiting(0) == 1 and book.waiting(1) == 0
    # beyond the cap the oldest waiting half is dropped: server_b will never see id 5
    assert [book.next_for(0)[0] for _ in range(5)] == [4, 5, 6, 7, 8]
    assert book.waiting(1) == 3 and book.next_for(1)[0] == 6


def _counter_fetch(start=0, delay=0.0):
    state = {"next": start}

    def fetch():
        time.sleep(delay)
        i = state["next"]
        state["next"] += 1
        return Ready(i, "e", f"bundle{i}")

    return fetch


def test_queue_is_bounded_and_refilled():
    q = BundleQueue(_counter_fetch(), depth=3, owner="server_a").start()
    try:
        deadline = time.monotonic() + 2
        while len(q) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert len(q) == 3  # never more than the depth
        assert [q.take_next(1.0).bundle_id for _ in range(5)] == [0, 1, 2, 3, 4]
    finally:
        q.stop()


def test_take_specific_id_drops_older_and_refuses_gone():
    q = BundleQueue(_counter_fetch(), depth=2, owner="server_b").start()
    try:
        assert q.take(3, 2.0).bundle == "bundle3"  # 0..2 dropped, never used
        assert q.take(4, 2.0).bundle_id == 4
        time.sleep(0.05)
        with pytest.raises(RandomnessError, match="no longer holds bundle 2"):
            q.take(2, 1.0)
    finally:
        q.stop()


def test_waits_with_deadline_and_reports_fetch_errors():
    calls = []

    def failing():
        calls.append(1)
        raise PeerTimeout("no answer from dealer within 1 s at step bundle_request")

    q = BundleQueue(failing, depth=2, owner="server_a", retry=0.05).start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RandomnessError, match="server_a had no bundle ready within 0.3 s.*no answer from dealer"):
            q.take_next(0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0 and len(calls) >= 2
    finally:
        q.stop()
    slow = BundleQueue(_counter_fetch(delay=0.2), depth=1, owner="server_a").start()
    try:
        got = []
        t = threading.Thread(target=lambda: got.append(slow.take_next(2.0).bundle_id))
        t.start()
        t.join(3)
        assert got == [0]  # the request waited for the bundle instead of proceeding without one
    finally:
        slow.stop()


def _counting_queue(ids, idle=None):
    it = iter(ids)
    return BundleQueue(lambda: Ready(next(it), "e", {"id": 0}), depth=2, owner="server_b", retry=0.01,
                       idle=idle).start()


def test_prepare_ahead_prepares_next_while_idle_only():
    idle = threading.Event()
    idle.set()
    prepared = []

    def prepare(bundle):
        prepared.append(time.monotonic())
        return "rands"

    queue = _counting_queue(range(100), idle)
    ahead = PrepareAhead(queue, prepare, idle, "server_a").start()
    try:
        p = ahead.take_next(5)
        assert (p.bundle_id, p.rands) == (0, "rands") and p.seconds >= 0
        assert not idle.is_set()  # the caller is online: nothing is prepared meanwhile
        time.sleep(0.3)
        assert len(prepared) == 1 and not ahead.ready
        idle.set()  # the session ended
        assert ahead.take_next(5).bundle_id == 1 and len(prepared) == 2
    finally:
        ahead.stop()
        queue.stop()


def test_prepare_ahead_follows_the_announced_id():
    queue = _counting_queue([0, 1, 2, *range(5, 100)])
    ahead = PrepareAhead(queue, lambda b: "r", None, "server_b").start()
    try:
        assert ahead.take(2, 5).bundle_id == 2  # 0 and 1 were skipped by server_a: dropped, never used
        with pytest.raises(RandomnessError, match="no longer holds bundle 4"):
            ahead.take(4, 5)  # the dealer dropped it
        assert ahead.take(5, 5).bundle_id == 5
    finally:
        ahead.stop()
        queue.stop()


def test_prepare_ahead_reports_why_nothing_is_ready():
    def fetch():
        raise PeerTimeout("dealer did not answer")

    queue = BundleQueue(fetch, depth=1, owner="server_a", retry=0.01).start()
    failing = PrepareAhead(queue, lambda b: "r", None, "server_a").start()
    try:
        time.sleep(0.2)  # the first fetch has failed
        t0 = time.monotonic()
        with pytest.raises(RandomnessError, match="no bundle ready and the dealer cannot be reached.*did not answer"):
            failing.take_next(30)  # nothing is on its way: refused at once, not at the deadline
        assert time.monotonic() - t0 < 1.5
    finally:
        failing.stop()
        queue.stop()


def test_book_bounds_what_waits_for_a_server_in_bytes(tmp_path):
    """A server that never fetches: the halves waiting for it never take more than max_bytes."""
    size = 1000

    def make(i):
        return (bytes(size), bytes(size))

    book = BundleBook(make, IdLedger(tmp_path / "next"), cap=64, max_bytes=3500)
    for _ in range(20):
        book.next_for(0)  # only server_a fetches
    assert book.waiting(1) == 3 and book.waiting_bytes(1) == 3000  # 3 x 1000 <= 3500 < 4 x 1000
    assert book.next_for(1)[0] == 17 and book.waiting_bytes(1) == 2000  # the oldest were dropped
