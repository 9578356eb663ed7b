"""One admitted client that misbehaves must not hurt the service or other clients, against real
dealer and server processes.

- a share sent to one server only claims no bundle and blocks no one; it is answered with a
  timeout once the other share has not come;
- requests beyond the per-client bound are refused at once with Busy;
- a frame larger than an image share is refused before it is buffered (the connection is dropped),
  and a message with extra frames is refused when read; the servers serve on.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from conftest import start_tiny_deployment
from PIL import Image

from secdfd.common.errors import Busy, PeerLost, PeerTimeout
from secdfd.common.net.keys import admit, load_party, make_party_keys
from secdfd.common.net.transport import Node, Requester
from secdfd.common.net.wire import Message, pack, unpack
from secdfd.common.service import local
from secdfd.common.service.client import Client, ClientConfig
from secdfd.common.service.supply import IdLedger

pytestmark = pytest.mark.processes

SIZE = 32
CLIENT_WAIT = 4.0


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    options = local.Options(timeout=20.0, extra=("--client-wait", str(CLIENT_WAIT), "--max-pending-per-client", "2"))
    layout, eps, started = start_tiny_deployment(root, options, SIZE)
    try:
        alice = root / "alice"
        public = make_party_keys(alice, "client")  # a second client, admitted by both servers
        for server in ("server_a", "server_b"):
            admit(layout.keys / server, server, public, name="alice")
            admit(alice, "client", layout.keys / "public" / f"{server}.key")
        time.sleep(2.5)  # the servers read their allow-lists again
        yield layout, eps, alice
    finally:
        local.stop(started)


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "face.png"
    Image.new("RGB", (40, 40), (160, 110, 90)).save(path)
    return path


def share() -> torch.Tensor:
    return torch.zeros(1, 3, SIZE, SIZE, dtype=torch.int64)


def used(layout: local.Layout) -> int:
    return IdLedger(layout.state("server_a") / "server_a.used").last


def test_half_requests_claim_no_bundle_and_block_no_one(deploy, image):
    layout, eps, alice = deploy
    with Node(load_party(layout.keys, "client")) as node:
        hostile = Requester(node, eps.server_a, "server_a", timeout=30)
        before = used(layout)
        halves = [hostile.start("detect", tensors=[share()], sid=secrets.token_hex(8)) for _ in range(2)]
        # a third one at once: beyond this client's bound of 2, refused at once
        t0 = time.monotonic()
        with pytest.raises(Busy, match="this client has 2 requests waiting"):
            hostile.request("detect", tensors=[share()], sid=secrets.token_hex(8))
        assert time.monotonic() - t0 < 3
        # another client is served meanwhile, with one bundle: the half requests took none
        good = Client(ClientConfig(alice, eps.server_a, eps.server_b, timeout=60))
        try:
            t0 = time.monotonic()
            assert good.detect(image)["verdict"] in ("real", "fake")
            assert time.monotonic() - t0 < 20
        finally:
            good.close()
        assert used(layout) == before + 1
        # the half requests end with a timeout that names the missing share, after the client wait
        for p in halves:
            with pytest.raises(PeerTimeout, match="server_b did not receive this request's share"):
                hostile.finish(p)
        assert used(layout) == before + 1


def test_a_share_sent_only_to_server_b_is_dropped_on_cancel(deploy, image):
    layout, eps, alice = deploy
    with Node(load_party(layout.keys, "client")) as node:
        b = Requester(node, eps.server_b, "server_b", timeout=30)
        sid = secrets.token_hex(8)
        b.start("detect", tensors=[share()], sid=sid)
        time.sleep(0.5)
        b.start("cancel", sid=sid, timeout=5)
        time.sleep(0.5)
        # the place is free again: two more of this client's requests are held (a third would be Busy)
        p = [b.start("detect", tensors=[share()], sid=secrets.token_hex(8)) for _ in range(2)]
        with pytest.raises(Busy):
            b.request("detect", tensors=[share()], sid=secrets.token_hex(8))
        for x in p:
            b.start("cancel", sid=x.sid, timeout=5)


def test_oversized_and_extra_frames_are_refused_and_the_servers_serve_on(deploy, image):
    layout, eps, alice = deploy
    with Node(load_party(layout.keys, "client")) as node:
        r = Requester(node, eps.server_a, "server_a", timeout=10)
        big = torch.zeros(1, 3, 4 * SIZE, 4 * SIZE, dtype=torch.int64)  # a frame 16 times the share size
        with pytest.raises((PeerLost, PeerTimeout)):
            r.request("detect", tensors=[big], sid=secrets.token_hex(8))
    with Node(load_party(layout.keys, "client")) as node:
        sock = node.connect(eps.server_a, "server_a", zmq.DEALER)[0]
        frames = pack(Message("detect", "s1", 0, "detect", {}, [share()]))
        sock.send_multipart([*frames, frames[1], frames[1]])  # two frames more than declared
        assert sock.poll(10_000)
        reply = unpack(sock.recv_multipart(), "server_a")
        assert reply.kind == "error" and reply.meta["error"] == "ProtocolError"
        assert "envelope declares 1 tensors but 3 tensor frames followed" in str(reply.meta["message"])
    good = Client(ClientConfig(alice, eps.server_a, eps.server_b, timeout=60))
    try:
        assert good.detect(image)["verdict"] in ("real", "fake")
    finally:
        good.close()


def test_one_client_cannot_starve_another(deploy, image):
    """Client x keeps two requests queued all the time; client y's request is answered within the
    time of a few inferences, not after x's queue."""
    layout, eps, alice = deploy
    stop = threading.Event()
    served_x = []

    def flood() -> None:
        c = Client(ClientConfig(layout.keys / "client", eps.server_a, eps.server_b, timeout=120))
        try:
            while not stop.is_set():
                c.detect(image)
                served_x.append(time.monotonic())
        finally:
            c.close()

    threads = [threading.Thread(target=flood) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    y = Client(ClientConfig(alice, eps.server_a, eps.server_b, timeout=120))
    try:
        t0 = time.monotonic()
        r = y.detect(image)
        waited = time.monotonic() - t0
    finally:
        y.close()
        stop.set()
        for t in threads:
            t.join(120)
    assert r["verdict"] in ("real", "fake")
    x_during = [t for t in served_x if t0 <= t <= t0 + waited]
    # y waited at most for the inference running when it came, plus its own: x got at most 2 in between
    assert len(x_during) <= 2, (waited, len(x_during))
