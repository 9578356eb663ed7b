"""The weight masks of one split never meet another model: the attack of a re-deployment, mounted.

A server sees F = W - B opened at set-up. If two models W, W' were ever opened under the same mask B,
one server alone would compute F' - F = W' - W, and with the public embedded model as W it would hold
every weight of the new one. Each `secdfd share` run is a split with its own id, and the dealer draws
fresh mask seeds per split id, so F' - F must be unrelated to W' - W.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import write_tiny_model

from secdfd.common.engine.channel import pair, run_pair
from secdfd.common.errors import ModelError
from secdfd.common.service import deployment
from secdfd.common.service.session import SessionLink, SplitId

SIZE = 32


def open_weights(shares, state):
    """Set-up as the servers run it, for the split in `shares`: the dealer of that split (state in
    `state`), both parties over an in-memory channel. Returns (F per key, W per key) in the ring."""
    info = deployment.read_info(shares / "model.json")
    dealer = deployment.make_dealer(info, state)
    p0, p1 = deployment.provision_bytes(dealer)
    a = deployment.load_weight_share(shares / "server_a.weights", "server_a")
    b = deployment.load_weight_share(shares / "server_b.weights", "server_b")
    plan = deployment.plan_for(info)
    c0, c1 = pair()
    party0 = deployment.make_party(0, info, a.weights, p0, c0, plan=plan)
    party1 = deployment.make_party(1, info, b.weights, p1, c1, plan=plan)
    run_pair(party0.setup, party1.setup)
    assert party0.weights is not None and party1.weights is not None
    F = party0.weights.F
    assert all(torch.equal(F[k], party1.weights.F[k]) for k in F)  # both servers see the same F
    fc = {k for k in F if F[k].shape != a.weights[k].shape}  # fc weights are kept transposed
    W = {k: (a.weights[k] + b.weights[k]) for k in F}
    W = {k: (w.t().contiguous() if k in fc else w) for k, w in W.items()}
    return F, W


def ring_stats(d_f: torch.Tensor, d_w: torch.Tensor) -> tuple[float, float, float]:
    """(share of equal elements, worst bit frequency of (F'-F)-(W'-W) away from 1/2, correlation of
    the low 16 bits of F'-F and W'-W)."""
    equal = float((d_f == d_w).double().mean())
    diff = d_f - d_w  # = B - B': uniform in the ring when the masks are independent
    bits = torch.stack([(diff >> i) & 1 for i in range(64)]).double().mean(1)
    worst = float((bits - 0.5).abs().max())
    lo_f = (d_f & 0xFFFF).double()
    lo_w = (d_w & 0xFFFF).double()
    corr = float(torch.corrcoef(torch.stack([lo_f, lo_w]))[0, 1])
    return equal, worst, corr


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    m1 = write_tiny_model(d / "m1.pt", SIZE)
    torch.manual_seed(1)  # a second model of the same architecture (test weights only)
    m2 = d / "m2.pt"
    from secdfd.common.ml.dfdnet import build_model, init_weights
    from secdfd.common.ml.export import fuse, save_deployable

    rgb, ycc = build_model("dfdnet-s", SIZE), build_model("dfdnet-s", SIZE)
    for m in (rgb, ycc):
        init_weights(m)
    save_deployable(fuse(rgb.eval(), ycc.eval()), m2, "dfdnet-s")
    return m1, m2


def test_two_models_shared_into_one_state_do_not_meet_the_same_masks(tmp_path, two_models):
    m1, m2 = two_models
    state = tmp_path / "dealer-state"  # the one state folder a re-deployment keeps
    deployment.share_model(m1, tmp_path / "s1")
    deployment.share_model(m2, tmp_path / "s2")
    F1, W1 = open_weights(tmp_path / "s1", state)
    F2, W2 = open_weights(tmp_path / "s2", state)
    assert sorted((state / "splits").glob("*.seeds")) and len(list((state / "splits").glob("*.seeds"))) == 2
    d_f = torch.cat([(F2[k] - F1[k]).reshape(-1) for k in sorted(F1)])
    d_w = torch.cat([(W2[k] - W1[k]).reshape(-1) for k in sorted(F1)])
    n = d_f.numel()
    assert n > 100_000
    assert not torch.equal(d_w, torch.zeros_like(d_w))  # the two models do differ
    equal, worst, corr = ring_stats(d_f, d_w)
    assert equal < 1e-4  # F' - F is not W' - W (equal elements only by chance, 2^-64 each)
    assert worst < 6 * 0.5 / n**0.5  # F' - F - (W' - W) = B - B' has fair bits everywhere
    assert abs(corr) < 6 / n**0.5  # and no linear relation to W' - W


def test_the_attack_works_when_masks_are_reused(tmp_path, two_models, monkeypatch):
    """The control: under one split id (the old behaviour) the same statistics expose W' - W."""
    m1, m2 = two_models
    monkeypatch.setattr(deployment, "new_split_id", lambda: "0" * 32)
    deployment.share_model(m1, tmp_path / "s1")
    deployment.share_model(m2, tmp_path / "s2")
    F1, W1 = open_weights(tmp_path / "s1", tmp_path / "state")
    F2, W2 = open_weights(tmp_path / "s2", tmp_path / "state")
    d_f = torch.cat([(F2[k] - F1[k]).reshape(-1) for k in sorted(F1)])
    d_w = torch.cat([(W2[k] - W1[k]).reshape(-1) for k in sorted(F1)])
    assert torch.equal(d_f, d_w)  # each server alone would learn W' - W
    equal, _, corr = ring_stats(d_f, d_w)
    assert equal == 1.0 and corr > 0.99


def test_two_architectures_on_one_state_share_no_mask_prefix(tmp_path):
    """dfdnet-s and dfdnet name many weights alike; their masks must not share a keystream prefix."""
    small = write_tiny_model(tmp_path / "small.pt", SIZE)
    torch.manual_seed(2)
    from secdfd.common.ml.dfdnet import build_model, init_weights
    from secdfd.common.ml.export import fuse, save_deployable

    rgb, ycc = build_model("dfdnet", SIZE), build_model("dfdnet", SIZE)
    for m in (rgb, ycc):
        init_weights(m)
    save_deployable(fuse(rgb.eval(), ycc.eval()), tmp_path / "full.pt", "dfdnet")
    state = tmp_path / "state"
    deployment.share_model(small, tmp_path / "s")
    deployment.share_model(tmp_path / "full.pt", tmp_path / "f")
    Fs, Ws = open_weights(tmp_path / "s", state)
    Ff, Wf = open_weights(tmp_path / "f", state)
    common = sorted(set(Fs) & set(Ff))
    assert len(common) > 50
    d_f = torch.cat([(Ff[k].reshape(-1)[: Fs[k].numel()] - Fs[k].reshape(-1)[: Ff[k].numel()]) for k in common])
    d_w = torch.cat([(Wf[k].reshape(-1)[: Ws[k].numel()] - Ws[k].reshape(-1)[: Wf[k].numel()]) for k in common])
    n = d_f.numel()
    equal, worst, corr = ring_stats(d_f, d_w)
    assert equal < 1e-4 and worst < 6 * 0.5 / n**0.5 and abs(corr) < 6 / n**0.5


def test_servers_refuse_shares_of_two_splits_before_opening_anything(servers):
    """Set-up between servers whose shares come from different splits ends with an error naming both
    splits on both sides, and no weight is opened."""
    a, b = servers
    opened = []

    class Party:
        def setup(self) -> None:
            opened.append(1)

    la = SessionLink(a, "server_a", SplitId("a" * 32, "m" * 32))
    lb = SessionLink(b, "server_b", SplitId("b" * 32, "m" * 32))
    errors: dict[str, BaseException] = {}

    def lead() -> None:
        try:
            la.lead_setup(Party(), 5.0)
        except Exception as e:  # noqa: BLE001 - inspected below
            errors["a"] = e

    t = threading.Thread(target=lead)
    t.start()
    with pytest.raises(ModelError) as eb:
        lb.join_setup(Party(), threading.Event(), 5.0)
    t.join(10)
    assert "a" * 32 in str(eb.value) and "b" * 32 in str(eb.value)
    err = errors["a"]  # the same class, by name, with server_b's sentence
    assert isinstance(err, ModelError) and "server_b reported" in str(err) and "b" * 32 in str(err)
    assert opened == []
