"""Several face crops in one secure session, against dealer, server_a and server_b as processes: each
crop's verdict is the plaintext model's, the request takes the rounds of one crop, a batch bundle is
made for it and used once by each server, and what breaks these promises is refused."""

from __future__ import annotations

import secrets

import pytest
import torch
from conftest import start_tiny_deployment

from secdfd.common import roster
from secdfd.common.errors import PeerLost, ProtocolError, RandomnessError
from secdfd.common.ml.export import load_deployable
from secdfd.common.net.keys import load_party
from secdfd.common.net.transport import Node, Requester
from secdfd.common.service import deployment, local
from secdfd.common.service.client import Client, ClientConfig

pytestmark = pytest.mark.processes

SIZE = 32
MAX = 3


@pytest.fixture(scope="module")
def deploy(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    layout, eps, started = start_tiny_deployment(root, local.Options(timeout=10.0, depth=2, max_batch=MAX), SIZE)
    client = Client(ClientConfig(layout.keys, eps.server_a, eps.server_b, 120.0))
    try:
        yield layout, eps, client, load_deployable(root / "model.pt")
    finally:
        client.close()
        local.stop(started)


def _ledger(layout, party: str, name: str) -> int:
    path = layout.state(party) / name
    return int(path.read_text()) if path.exists() else -1


def _crops(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_three_crops_in_one_session_match_the_plaintext_model_in_the_rounds_of_one(deploy):
    layout, _, client, model = deploy
    assert client.max_batch == MAX
    x = _crops(3, 1)
    one = client.detect_tensor(x[:1])
    used_before = [_ledger(layout, s, f"{s}.used") for s in roster.SERVERS]
    out = client.detect_batch(x)
    with torch.no_grad():
        plain = model(x).reshape(-1).tolist()
    assert len(out) == 3
    for r, p in zip(out, plain, strict=True):
        assert abs(r["p_fake"] - p) <= 1e-3 and r["verdict"] == roster.verdict(p)
    assert abs(out[0]["p_fake"] - one["p_fake"]) <= 1e-3
    assert len({r["request"] for r in out}) == 1 and {r["batch"] for r in out} == {3} and one["batch"] == 1
    assert out[0]["rounds"] == one["rounds"]
    assert one["bytes_per_server"][0] < out[0]["bytes_per_server"][0] <= 3 * one["bytes_per_server"][0]
    # one batch bundle, made for this request, claimed by both servers under the dealer's batch id;
    # the one-crop bundles were not touched
    made = _ledger(layout, roster.DEALER, "dealer.batch.ids")
    assert made >= 0
    assert [_ledger(layout, s, f"{s}.batch.used") for s in roster.SERVERS] == [made, made]
    assert [_ledger(layout, s, f"{s}.used") for s in roster.SERVERS] == used_before


def test_the_client_sends_more_crops_than_the_servers_take_in_several_requests(deploy):
    _, _, client, model = deploy
    x = _crops(5, 2)
    out = client.detect_crops(list(x.split(1)))
    with torch.no_grad():
        plain = model(x).reshape(-1).tolist()
    assert [r["batch"] for r in out] == [3, 3, 3, 2, 2]
    assert len({r["request"] for r in out}) == 2
    assert max(abs(r["p_fake"] - p) for r, p in zip(out, plain, strict=True)) <= 1e-3


def test_more_crops_than_the_maximum_are_refused_before_any_bundle_is_made(deploy):
    layout, eps, client, _ = deploy
    made = _ledger(layout, roster.DEALER, "dealer.batch.ids")
    used = [_ledger(layout, s, f"{s}.batch.used") for s in roster.SERVERS]
    with pytest.raises(ProtocolError, match=f"the servers take 1 to {MAX} in one request"):
        client.detect_batch(_crops(MAX + 1, 3))
    # a client that sends them anyway: the frame is over the servers' limit for MAX crops, and the
    # connection is dropped before anything is buffered
    x0, x1 = deployment.share_image(_crops(MAX + 1, 3), client.info)
    with Node(load_party(layout.keys, "client")) as node:
        for endpoint, server, share in ((eps.server_a, roster.SERVER_A, x0), (eps.server_b, roster.SERVER_B, x1)):
            with pytest.raises(PeerLost, match="closed the connection"):
                Requester(node, endpoint, server, timeout=10.0).request("detect", tensors=[share], sid="x" * 32)
    assert _ledger(layout, roster.DEALER, "dealer.batch.ids") == made
    assert [_ledger(layout, s, f"{s}.batch.used") for s in roster.SERVERS] == used
    assert client.detect_tensor(_crops(1, 4))["batch"] == 1  # and the service goes on


def test_different_crop_counts_to_the_two_servers_fail_that_request_only(deploy):
    layout, _, client, model = deploy
    made = _ledger(layout, roster.DEALER, "dealer.batch.ids")
    for a, b in ((2, 3), (3, 1), (1, 2)):
        x0, _ = deployment.share_image(_crops(a, 5), client.info)
        _, x1 = deployment.share_image(_crops(b, 5), client.info)
        with pytest.raises(ProtocolError, match=f"sent server_a {a} crops and server_b {b}"):
            client._request((x0, x1), secrets.token_hex(16))
    # refused when the shares were paired: the dealer made nothing for them
    assert _ledger(layout, roster.DEALER, "dealer.batch.ids") == made
    x = _crops(2, 6)
    out = client.detect_batch(x)
    with torch.no_grad():
        plain = model(x).reshape(-1).tolist()
    assert max(abs(r["p_fake"] - p) for r, p in zip(out, plain, strict=True)) <= 1e-3


def test_the_dealer_hands_a_batch_half_out_once_and_makes_batches_for_server_a_only(deploy):
    layout, eps, client, _ = deploy
    client.detect_batch(_crops(2, 7))
    used = _ledger(layout, roster.DEALER, "dealer.batch.ids")
    with Node(load_party(layout.keys, "server_b")) as node:
        as_b = Requester(node, eps.dealer, roster.DEALER, timeout=10.0)
        # server_b already took its half of the last batch bundle: a second fetch gets nothing
        with pytest.raises(RandomnessError, match="holds no half of batch bundle"):
            as_b.request("batch_fetch", {"bundle": used, "batch": 2})
        with pytest.raises(ProtocolError, match="only server_a asks for new batch bundles"):
            as_b.request("batch_request", {"batch": 2})
    with Node(load_party(layout.keys, "server_a")) as node:
        as_a = Requester(node, eps.dealer, roster.DEALER, timeout=10.0)
        for batch in (1, MAX + 1):
            with pytest.raises(ProtocolError, match=f"covers 2 to {MAX} inputs"):
                as_a.request("batch_request", {"batch": batch})
        with pytest.raises(ProtocolError, match="field 'batch' must be int"):
            as_a.request("batch_request", {"batch": "2"})
        with pytest.raises(ProtocolError, match="server_a gets its half"):
            as_a.request("batch_fetch", {"bundle": used, "batch": 2})
    assert _ledger(layout, roster.DEALER, "dealer.batch.ids") == used  # nothing made for the refusals
