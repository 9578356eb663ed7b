"""Parties run by different operators: no two parties' secrets are ever in one place.

Each party makes its own keypair in its own folder (`secdfd keys new`), hands out only its public
key, and admits the peers' public keys (`secdfd keys admit`). The model owner seals each server's
share to that server's public key. Dealer, servers and client run as separate processes, each with
its own folder only. Then the client admission is changed while the servers run: a client removed
from the allow-lists is refused within seconds (on its open connection too), a new one is admitted
without a restart.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_tiny_model
from PIL import Image

from secdfd.client.main import main as client_main
from secdfd.common.cli.main import main
from secdfd.common.errors import NotAdmitted
from secdfd.common.service import local
from secdfd.common.service.client import Client, ClientConfig

pytestmark = pytest.mark.processes

SIZE = 32
TOPOLOGY = {  # who admits whom, as the operators would run `secdfd keys admit`
    "dealer": ["server_a", "server_b"],
    "server_a": ["dealer", "server_b", "client"],
    "server_b": ["dealer", "server_a", "client"],
    "client": ["server_a", "server_b"],
}


def secdfd(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def secrets_in(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*.key_secret")}


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    """One folder per party ("machine"), keys made and exchanged as the README says; shares sealed."""
    root = tmp_path_factory.mktemp("machines")
    homes = {p: root / p / "keys" for p in TOPOLOGY}
    for party, home in homes.items():
        secdfd("keys", "new", party, "--out", str(home))
    for party, peers in TOPOLOGY.items():
        for peer in peers:  # only public key files cross between machines
            secdfd("keys", "admit", str(homes[peer] / f"{peer}.key"), "--keys", str(homes[party]), "--party", party)
    owner = root / "owner"
    model = write_tiny_model(owner / "model.pt", SIZE)
    secdfd("share", str(model), "--out", str(owner / "shares"),
           "--seal", f"server_a={homes['server_a'] / 'server_a.key'}",
           "--seal", f"server_b={homes['server_b'] / 'server_b.key'}")
    for party in TOPOLOGY:
        assert secrets_in(root / party) == {f"{party}.key_secret"}  # each machine holds its own secret only
    assert not secrets_in(owner)
    return root, homes, owner / "shares"


@pytest.fixture(scope="module")
def running(machines):
    root, homes, shares = machines
    d, a, b, peer = (f"tcp://127.0.0.1:{p}" for p in local.free_ports(4))
    py = sys.executable
    argv = {
        "dealer": [py, "-m", "secdfd.dealer", "--keys", str(homes["dealer"]), "--state", str(root / "dealer" / "state"),
                   "--listen", d, "--model", str(shares / "model.json")],
        "server_a": [py, "-m", "secdfd.server_a", "--keys", str(homes["server_a"]),
                     "--weights", str(shares / "server_a.weights"), "--state", str(root / "server_a" / "state"),
                     "--listen", a, "--peer", peer, "--dealer", d, "--depth", "1", "--timeout", "30"],
        "server_b": [py, "-m", "secdfd.server_b", "--keys", str(homes["server_b"]),
                     "--weights", str(shares / "server_b.weights"), "--state", str(root / "server_b" / "state"),
                     "--listen", b, "--peer", peer, "--dealer", d, "--depth", "1", "--timeout", "30"],
    }
    layout = local.Layout(root / "run")
    started = local.start(layout, [local.Launch(n, tuple(v), {"SECDFD_THREADS": "1"}, {"server_a": a, "server_b": b,
                                                                                          "dealer": d}[n])
                                   for n, v in argv.items()])
    try:
        local.wait_ready(started, homes["client"], 240)
        yield a, b, homes
    finally:
        local.stop(started)


def _detect(keys: Path, a: str, b: str, image: Path):
    return CliRunner().invoke(client_main, ["detect", str(image), "--json", "--keys", str(keys), "--server-a", a,
                                            "--server-b", b, "--timeout", "30", "--no-crop"])


def test_a_sealed_share_opens_only_for_its_server(machines):
    root, homes, shares = machines
    assert (shares / "server_a.weights").read_bytes().startswith(b"SECDFD-SEALED-1\n")
    from secdfd.common.errors import ModelError
    from secdfd.common.net.keys import load_party
    from secdfd.common.service import deployment

    keys_a = load_party(homes["server_a"], "server_a")
    ok = deployment.load_weight_share(shares / "server_a.weights", "server_a", keys_a)
    assert ok.info.arch == "dfdnet-s"
    with pytest.raises(ModelError, match="sealed to another party's key"):
        deployment.load_weight_share(shares / "server_b.weights", "server_b", keys_a)
    with pytest.raises(ModelError, match="sealed"):
        deployment.load_weight_share(shares / "server_a.weights", "server_a")


def test_detect_with_separate_folders_then_revoke_and_admit(running, tmp_path):
    a, b, homes = running
    image = tmp_path / "face.png"
    Image.new("RGB", (40, 40), (170, 120, 100)).save(image)
    r = _detect(homes["client"], a, b, image)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["verdict"] in ("real", "fake")

    # a client connected before its key is removed: refused at its next request, within seconds
    client = Client(ClientConfig(homes["client"], a, b, timeout=30.0))
    try:
        for server in ("server_a", "server_b"):
            secdfd("keys", "revoke", "client", "--keys", str(homes[server]))
        deadline = time.monotonic() + 10
        while True:
            try:
                client.detect(image)
            except NotAdmitted as e:
                assert "no longer admits" in str(e)
                break
            assert time.monotonic() < deadline, "a revoked client was still served after 10 s"
            time.sleep(0.5)
    finally:
        client.close()
    refused = _detect(homes["client"], a, b, image)  # and a new connection with the revoked key
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "refused this party's key" in refused.output or "no longer admits" in refused.output

    # a new client, admitted while the servers run
    alice = tmp_path / "alice"
    secdfd("keys", "new", "client", "--out", str(alice))
    for server in ("server_a", "server_b"):
        secdfd("keys", "admit", str(homes[server] / f"{server}.key"), "--keys", str(alice), "--party", "client")
        secdfd("keys", "admit", str(alice / "client.key"), "--keys", str(homes[server]), "--party", server,
               "--name", "alice")
    deadline = time.monotonic() + 10
    while (r := _detect(alice, a, b, image)).exit_code != 0:
        assert time.monotonic() < deadline, f"a newly admitted client was refused after 10 s: {r.output}"
        time.sleep(0.5)
    assert json.loads(r.output)["verdict"] in ("real", "fake")


def test_keys_admit_refuses_a_peer_the_party_never_talks_to(tmp_path):
    home = tmp_path / "client"
    secdfd("keys", "new", "client", "--out", str(home))
    other = tmp_path / "other"
    secdfd("keys", "new", "client", "--out", str(other))
    r = CliRunner().invoke(main, ["keys", "admit", str(other / "client.key"), "--keys", str(home), "--party", "client",
                                  "--name", "bob"])
    assert r.exit_code == 1 and "client does not talk to a client" in r.output
