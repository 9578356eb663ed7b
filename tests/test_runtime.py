"""Dealer, server_a, server_b and client over CURVE sockets on loopback (threads of one process).

A reduced DFDNet (dfdnet-s at 32x32) keeps this light; the secure fused probability must match the
plaintext model, the ids of the bundles used must never repeat, and user errors come back as
one-line errors while the servers keep serving.
"""

from __future__ import annotations

import threading

import pytest
import torch
from PIL import Image

from secdfd.common.engine.randomness import RANDOMNESS_LAYOUT
from secdfd.common.errors import DataError, ProtocolError
from secdfd.common.ml.data import load_image
from secdfd.common.ml.dfdnet import FusedDFDNet, build_model
from secdfd.common.ml.export import load_deployable, save_deployable
from secdfd.common.net.keys import make_keys
from secdfd.common.service import deployment
from secdfd.common.service.client import Client, ClientConfig
from secdfd.common.service.server import ServerConfig
from secdfd.common.service.supply import IdLedger
from secdfd.dealer.main import DealerConfig, DealerService
from secdfd.server_a.leader import Leader
from secdfd.server_b.follower import Follower

pytestmark = pytest.mark.sockets

SIZE = 32
ANY = "tcp://127.0.0.1:*"


def _start(target, stop):
    errors = []

    def run():
        try:
            target.run(stop)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)
            target.ready.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert target.ready.wait(120), "a party did not start"
    assert not errors, errors
    return t


@pytest.fixture(scope="module")
def deployment_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("deploy")
    make_keys(d / "keys")
    torch.manual_seed(0)  # test weights only
    model = FusedDFDNet(build_model("dfdnet-s", SIZE, folded=True), build_model("dfdnet-s", SIZE, folded=True))
    save_deployable(model, d / "model.pt", "dfdnet-s")
    deployment.share_model(d / "model.pt", d / "shares")
    Image.new("RGB", (50, 40), (200, 30, 90)).save(d / "face.png")
    (d / "not-an-image.png").write_bytes(b"hello")
    return d


@pytest.fixture(scope="module")
def parties(deployment_dir):
    d = deployment_dir
    stop = threading.Event()
    dealer = DealerService(DealerConfig(d / "keys", d / "state" / "dealer", ANY,
                                        deployment.read_info(d / "shares" / "model.json")))
    threads = [_start(dealer, stop)]
    a = Leader(ServerConfig("a", d / "keys", d / "shares" / "server_a.weights", d / "state" / "a",
                                   ANY, ANY, dealer.endpoint, depth=2, timeout=30.0))
    b_holder = {}

    def start_b():
        # server_b needs server_a's bound peer endpoint, known once server_a has bound it
        while not a.peer_endpoint:
            threading.Event().wait(0.01)
        b = Follower(ServerConfig("b", d / "keys", d / "shares" / "server_b.weights", d / "state" / "b",
                                       ANY, a.peer_endpoint, dealer.endpoint, depth=2, timeout=30.0))
        b_holder["b"] = b
        b.run(stop)

    tb = threading.Thread(target=start_b, daemon=True)
    tb.start()
    threads.append(_start(a, stop))
    while "b" not in b_holder:
        threading.Event().wait(0.01)
    assert b_holder["b"].ready.wait(120)
    yield a, b_holder["b"]
    stop.set()
    for t in [*threads, tb]:
        t.join(10)


def test_detect_matches_plaintext_and_ids_are_fresh(deployment_dir, parties):
    a, b = parties
    d = deployment_dir
    client = Client(ClientConfig(d / "keys", a.endpoint, b.endpoint, timeout=60.0))
    try:
        assert client.info == deployment.ModelInfo("dfdnet-s", SIZE)  # the client is not told the split
        for server in client.servers:  # nothing service-wide: no bundle counts, no other clients' requests
            assert set(server.request("info").meta) == {"party", "model", "input_size", "frac_bits", "max_batch"}
        r1 = client.detect(d / "face.png")
        r2 = client.detect(d / "face.png")
    finally:
        client.close()
    with torch.no_grad():
        plain = float(load_deployable(d / "model.pt")(load_image(d / "face.png", SIZE)))
    for r in (r1, r2):
        assert abs(r["p_fake"] - plain) <= 1e-3
        assert r["verdict"] == ("fake" if plain >= 0.5 else "real")
        assert r["rounds"] > 0 and min(r["bytes_per_server"]) > 0
    # the client hears of an opaque request id, never of a bundle id or other service-wide counters
    assert r1["request"] != r2["request"] and "bundle" not in r1 and "bundle" not in str(r1)
    assert IdLedger(d / "state" / "a" / "server_a.used").last == IdLedger(d / "state" / "b" / "server_b.used").last
    assert IdLedger(d / "state" / "a" / "server_a.used").last >= 1  # two bundles, ids 0 and 1 (or later)


def test_user_errors_leave_servers_serving(deployment_dir, parties):
    a, b = parties
    d = deployment_dir
    client = Client(ClientConfig(d / "keys", a.endpoint, b.endpoint, timeout=60.0))
    try:
        with pytest.raises(DataError):
            client.detect(d / "not-an-image.png")
        # a share of the wrong size is refused by both servers with a clear error
        bad = torch.zeros(1, 3, SIZE - 1, SIZE - 1, dtype=torch.int64)
        with pytest.raises(ProtocolError, match="resize the image to 32"):
            client.servers[0].request("detect", tensors=[bad])
        # a share of the wrong size that fits the frame limit of 4 crops is refused by its shape
        wide = torch.zeros(1, 3, SIZE + 1, SIZE + 1, dtype=torch.int64)
        with pytest.raises(ProtocolError, match="resize the image to 32"):
            client.servers[1].request("detect", tensors=[wide])
        # one a little larger than shares of 4 crops (the default --max-batch) is refused before its
        # shape is read; a frame well over that drops the connection (test_batch_processes)
        limit = 4 * 3 * SIZE * SIZE * 8
        big = torch.zeros(limit // 8 + 16, dtype=torch.int64)
        with pytest.raises(ProtocolError, match=f"tensor payload exceeds {limit} bytes"):
            client.servers[1].request("detect", tensors=[big])
        assert client.detect(d / "face.png")["verdict"] in ("real", "fake")
    finally:
        client.close()


def test_a_dealer_of_another_randomness_layout_is_refused(deployment_dir, monkeypatch, tmp_path):
    """A dealer of another release deals bundles whose values a server would read as others (and so
    compute a wrong verdict): the server refuses it when provisioning, before any request."""
    d = deployment_dir
    monkeypatch.setattr("secdfd.dealer.main.RANDOMNESS_LAYOUT", RANDOMNESS_LAYOUT + 1)  # the dealer's side only
    stop = threading.Event()
    dealer = DealerService(DealerConfig(d / "keys", tmp_path / "dealer", ANY,
                                        deployment.read_info(d / "shares" / "model.json")))
    t = _start(dealer, stop)
    a = Leader(ServerConfig("a", d / "keys", d / "shares" / "server_a.weights", tmp_path / "a",
                            ANY, ANY, dealer.endpoint, depth=2, timeout=5.0, startup=5.0))
    try:
        with pytest.raises(ProtocolError, match=f"randomness of layout {RANDOMNESS_LAYOUT + 1}, .* reads layout "
                                                f"{RANDOMNESS_LAYOUT}.*same SecDFD release"):
            a.run(stop)
        assert not a.ready.is_set()
    finally:
        stop.set()
        t.join(10)
