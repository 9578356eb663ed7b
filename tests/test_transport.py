"""ZeroMQ transport over loopback: CURVE allow-lists, exchange, counting, deadlines, errors."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import zmq

from secdfd.common.engine.channel import pair, run_pair
from secdfd.common.errors import PeerLost, PeerTimeout, ProtocolError, RandomnessError
from secdfd.common.net.keys import PartyKeys, load_party
from secdfd.common.net.transport import Node, Requester, Responder, ZmqChannel

pytestmark = pytest.mark.sockets

ANY = "tcp://127.0.0.1:*"


def test_exchange_is_exact_and_counted(servers):
    a, b = servers
    x = [torch.arange(-5, 1000, dtype=torch.int64), torch.tensor([2**63 - 1, -(2**63)])]
    y = [torch.arange(1005, dtype=torch.int64) * 3, torch.tensor([7, 8])]
    bits = torch.arange(16, dtype=torch.uint8)

    def party(ch, mine, bit):
        ch.begin("sess-1")
        got = ch.exchange("trunc/1", mine)
        got2 = ch.exchange("relu/1", [bit])
        got3 = ch.exchange("relu/1", [bit + 1])
        return got, got2, got3

    (ga, ga2, ga3), (gb, gb2, gb3) = run_pair(lambda: party(a, x, bits), lambda: party(b, y, bits + 100))
    assert all(torch.equal(p, q) for p, q in zip(ga, y, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(gb, x, strict=True))
    assert torch.equal(ga2[0], bits + 100) and torch.equal(gb3[0], bits + 1)
    for ch in (a, b):
        assert ch.stats.rounds == 3
        assert ch.stats.bytes == 1005 * 8 + 16 + 16 + 16
        assert (ch.stats.steps["trunc/1"].bytes, ch.stats.steps["trunc/1"].rounds) == (8056, 1)
        assert (ch.stats.steps["relu/1"].bytes, ch.stats.steps["relu/1"].rounds) == (32, 2)


def test_timeout_names_peer_and_step(servers):
    a, b = servers
    a.timeout = 0.3
    a.begin("s")
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match="server_b.*step mul/4"):
        a.exchange("mul/4", [torch.zeros(3, dtype=torch.int64)])
    assert 0.25 <= time.monotonic() - t0 < 1.5


def test_out_of_step_and_shape_mismatch(servers):
    a, b = servers

    def fa():
        a.begin("s")
        return a.exchange("relu/1", [torch.zeros(4, dtype=torch.int64)])

    def fb():
        b.begin("s")
        return b.exchange("relu/2", [torch.zeros(4, dtype=torch.int64)])

    with pytest.raises(ProtocolError, match="out of step"):
        run_pair(fa, fb)

    def fa2():
        a.begin("t")
        return a.exchange("x", [torch.zeros(4, dtype=torch.int64)])

    def fb2():
        b.begin("t")
        return b.exchange("x", [torch.zeros(5, dtype=torch.int64)])

    with pytest.raises(ProtocolError, match=r"sent \[int64\[5\]\], expected \[int64\[4\]\]"):
        run_pair(fa2, fb2)


def test_abort_reaches_the_peer_at_once(servers):
    """abort: the peer raises the same error class at once, with the peer's name."""
    a, b = servers
    deadline = time.monotonic() + 5
    while not (a.connected and b.connected):  # an abort is best effort: it goes only over a live link
        assert time.monotonic() < deadline
        time.sleep(0.01)
    a.begin("s3")
    b.begin("s3")
    b.abort(RandomnessError("bundle 12 is not held by the dealer"), step="session")
    t0 = time.monotonic()
    with pytest.raises(RandomnessError, match="server_b reported RandomnessError at step session: bundle 12"):
        a.exchange("open/1", [torch.tensor([1])])
    assert time.monotonic() - t0 < 1.5  # the deadline is 2 s


def test_request_reply_and_remote_errors(keys):
    with Node(load_party(keys, "server_a")) as ns, Node(load_party(keys, "client")) as nc:
        srv = Responder(ns, ANY, "clients")
        done = threading.Event()

        def serve():
            while not done.is_set():
                req = srv.recv(timeout=0.1)
                if req is None:
                    continue
                if req.message.kind == "info":
                    assert req.sender == "client"
                    srv.reply(req, "info_reply", {"party": "a", "model": "m", "input_size": 128,
                                                  "frac_bits": 16, "max_batch": 1})
                else:
                    srv.reply_error(req, RandomnessError("no bundle ready within 1 s"))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            req = Requester(nc, srv.endpoint, "server_a", timeout=2.0)
            r = req.request("info")
            assert dict(r.meta)["input_size"] == 128 and r.kind == "info_reply"
            with pytest.raises(RandomnessError, match="server_a reported RandomnessError at step detect"):
                req.request("detect", tensors=[torch.zeros(1, 3, 4, 4, dtype=torch.int64)])
            # a malformed request is answered with an error, and the server keeps serving
            req.sock.send_multipart([b"\x93\x01\x02\x03"])
            with pytest.raises(ProtocolError, match="server_a reported ProtocolError"):
                req.request("info")
            assert req.request("info").meta["party"] == "a"
        finally:
            done.set()
            t.join(2)


def test_unknown_key_is_refused(keys):
    # a client with a fresh keypair that is in nobody's allow-list, but that knows server_a's key
    public, secret = zmq.curve_keypair()
    real = load_party(keys, "client")
    rogue = PartyKeys("client", public, secret, dict(real.servers), {})
    with Node(load_party(keys, "server_a")) as ns, Node(rogue) as nr:
        srv = Responder(ns, ANY, "clients")
        req = Requester(nr, srv.endpoint, "server_a", timeout=5.0)
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="server_a .* refused this party's key.*allow-list"):
            req.request("info")
        assert time.monotonic() - t0 < 2.5  # the refusal is reported, not waited out (5 s)
        assert srv.recv(timeout=0.2) is None  # nothing ever reached the server


def test_wrong_server_key_and_wrong_socket_are_refused(keys):
    real = load_party(keys, "client")
    imposter_view = PartyKeys("client", real.public, real.secret, {"server_a": zmq.curve_keypair()[0]}, {})
    with Node(load_party(keys, "server_a")) as na, Node(imposter_view) as nc, \
            Node(load_party(keys, "server_b")) as nb:
        srv = Responder(na, ANY, "clients")
        with pytest.raises(PeerLost, match="handshake with server_a.*public/server_a.key"):
            Requester(nc, srv.endpoint, "server_a", timeout=1.0).request("info")
        # server_b's key is not in server_a's client allow-list
        with pytest.raises(PeerLost, match="refused"):
            Requester(nb, srv.endpoint, "server_a", timeout=1.0).request("info")
        assert srv.recv(timeout=0.1) is None
        # and a client's key is not in server_a's peer allow-list
        peer = ZmqChannel.listen(na, ANY, timeout=0.3)
        with Node(real) as nc2:
            intruder, _ = nc2.connect(peer.endpoint, "server_a", zmq.DEALER)
            assert not intruder.poll(300, zmq.POLLOUT)  # never authenticated, so nothing can be sent
            peer.begin("s")
            with pytest.raises(PeerTimeout, match="server_b"):
                peer.exchange("x", [torch.zeros(1, dtype=torch.int64)])


def test_unreachable_server_times_out(keys):
    with Node(load_party(keys, "client")) as nc:
        req = Requester(nc, "tcp://127.0.0.1:9", "server_b", timeout=0.4)
        t0 = time.monotonic()
        with pytest.raises(PeerTimeout, match="server_b.*step info"):
            req.request("info")
        assert time.monotonic() - t0 < 2.0


def test_server_gone_during_request_is_reported(keys):
    with Node(load_party(keys, "client")) as nc:
        ns = Node(load_party(keys, "server_a"))
        srv = Responder(ns, ANY, "clients")

        def die_after_receiving():
            assert srv.recv(timeout=2.0) is not None
            ns.close()  # the server stops without answering

        t = threading.Thread(target=die_after_receiving, daemon=True)
        t.start()
        req = Requester(nc, srv.endpoint, "server_a", timeout=5.0)
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="server_a .* closed the connection during step detect"):
            req.request("detect", tensors=[torch.zeros(3, dtype=torch.int64)])
        assert time.monotonic() - t0 < 2.0  # well before the 5 s deadline
        t.join(2)


def test_mute_server_reply_deadline(keys):
    """A server that takes the request and never answers: PeerTimeout at the request's deadline,
    naming the server and the step (also for a deadline that is not a whole number of ms)."""
    with Node(load_party(keys, "client")) as nc, Node(load_party(keys, "server_a")) as ns:
        srv = Responder(ns, ANY, "clients")
        req = Requester(nc, srv.endpoint, "server_a", timeout=5.0)
        for waited in (0.3, 0.2345):
            t0 = time.monotonic()
            with pytest.raises(PeerTimeout, match=f"no answer from server_a .* within {waited:g} s at step info"):
                req.request("info", timeout=waited)
            assert waited - 0.01 <= time.monotonic() - t0 < waited + 1.5
            assert srv.recv(timeout=1.0) is not None  # it did arrive


def test_counts_match_memory_channel(servers):
    a, b = servers
    ma, mb = pair(timeout=2.0)
    rounds = [("mul/1", [torch.zeros(10, 3, dtype=torch.int64)]),
              ("relu/2", [torch.zeros(7, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)])]

    def run(ch):
        if hasattr(ch, "begin"):
            ch.begin("s")
        for step, ts in rounds:
            ch.exchange(step, ts)

    run_pair(lambda: run(a), lambda: run(b))
    run_pair(lambda: run(ma), lambda: run(mb))
    assert (a.stats.bytes, a.stats.rounds) == (ma.stats.bytes, ma.stats.rounds) == (263, 2)
    assert {k: (v.bytes, v.rounds) for k, v in a.stats.steps.items()} == \
        {k: (v.bytes, v.rounds) for k, v in ma.stats.steps.items()}


def test_peer_gone_mid_session_is_lost_at_once(keys):
    """A peer that dies mid-session fails the session at once (PeerLost), not at the round deadline;
    before a session has used the link, an absent peer is still waited for (PeerTimeout)."""
    with Node(load_party(keys, "server_a")) as na:
        a = ZmqChannel.listen(na, ANY, timeout=20.0)
        nb = Node(load_party(keys, "server_b"))
        b = ZmqChannel.connect(nb, a.endpoint, timeout=20.0)

        def fa():
            a.begin("s")
            return a.exchange("relu/1", [torch.ones(3, dtype=torch.int64)])

        def fb():
            b.begin("s")
            return b.exchange("relu/1", [torch.zeros(3, dtype=torch.int64)])

        got_a, got_b = run_pair(fa, fb)
        assert torch.equal(got_a[0], torch.zeros(3, dtype=torch.int64))
        nb.close()  # server_b's process ends: its sockets close
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="lost the connection to server_b at step relu/2"):
            a.exchange("relu/2", [torch.ones(3, dtype=torch.int64)])
        assert time.monotonic() - t0 < 2.0  # the round deadline is 20 s
        # waiting in the middle of a round notices it too
        nb2 = Node(load_party(keys, "server_b"))
        b2 = ZmqChannel.connect(nb2, a.endpoint, timeout=20.0)
        b2.begin("t")
        b2.send("session", "session", {"bundle": 3, "client": "", "key": "", "request": "", "batch": 1})
        first = a.next_message(5.0)
        assert first is not None and first.sid == "t"
        a.begin(first.sid, received=1)
        threading.Timer(0.3, nb2.close).start()
        t0 = time.monotonic()
        with pytest.raises(PeerLost, match="lost the connection to server_b at step session"):
            a.recv("ready", "session")
        assert 0.25 < time.monotonic() - t0 < 2.0
        # a new session that has not used the link yet waits for the peer up to its deadline
        a.timeout = 0.4
        a.begin("u")
        with pytest.raises(PeerTimeout, match="server_b"):
            a.send("session", "session", {"bundle": 4, "client": "", "key": "", "request": "", "batch": 1})


def test_messages_of_another_conversation_are_dropped_or_claimed(servers):
    """A message of another conversation is dropped, unless the `interrupt` hook claims it: then the
    wait ends at once with the hook's error."""
    a, b = servers
    a.begin("x")
    b.begin("y")
    b.send("session", "session", {"bundle": 1, "client": "", "key": "", "request": "", "batch": 1})
    with pytest.raises(PeerTimeout):
        a.recv("ready", "session", timeout=0.3)
    a.interrupt = lambda msg, step: PeerLost(f"claimed {msg.sid} at {step}")
    b.begin("z")
    b.send("session", "session", {"bundle": 2, "client": "", "key": "", "request": "", "batch": 1})
    t0 = time.monotonic()
    with pytest.raises(PeerLost, match="claimed z at session"):
        a.recv("ready", "session", timeout=2.0)
    assert time.monotonic() - t0 < 1.0


def test_no_receive_outlives_its_deadline_right_after_a_handshake(keys):
    """A poll may report a socket readable when no message can be read (seen when the first
    heartbeats of a new CURVE connection arrive); the receive that follows must not block (it once
    blocked for good, outside every deadline)."""
    outcome: list[str] = []

    def attempts() -> None:
        for _ in range(3):
            with Node(load_party(keys, "server_a")) as na, Node(load_party(keys, "server_b")) as nb:
                a = ZmqChannel.listen(na, ANY, timeout=2.5)  # longer than the 1 s heartbeat interval
                ZmqChannel.connect(nb, a.endpoint, timeout=2.5)
                a.begin("s")
                try:
                    a.recv("open", "x")  # nothing is sent: only the deadline can end this
                except PeerTimeout:
                    outcome.append("timeout")

    t = threading.Thread(target=attempts, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"a receive blocked past its deadline after {len(outcome)} handshakes"
    assert outcome == ["timeout"] * 3
