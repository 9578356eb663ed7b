"""Shared test helpers: run a protocol for both parties over the in-memory channel."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from secdfd.common.bench.protocols import run_protocol
from secdfd.common.engine.ring import FixedPoint


@pytest.fixture
def fp() -> FixedPoint:
    return FixedPoint(16)


@pytest.fixture
def run2():
    """run2(deal, proto, x_ring) -> (reconstructed ring output, figures)."""
    return run_protocol


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Keys for every party (one folder each), made once per test module."""
    from secdfd.common.net.keys import make_keys

    d = tmp_path_factory.mktemp("keys")
    make_keys(d)
    return d


@pytest.fixture
def servers(keys):
    """server_a and server_b joined by a CurveZMQ channel on loopback (2 s deadline)."""
    from secdfd.common.net.keys import load_party
    from secdfd.common.net.transport import Node, ZmqChannel

    with Node(load_party(keys, "server_a")) as na, Node(load_party(keys, "server_b")) as nb:
        a = ZmqChannel.listen(na, "tcp://127.0.0.1:*", timeout=2.0)
        b = ZmqChannel.connect(nb, a.endpoint, timeout=2.0)
        yield a, b


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def write_tiny_model(path: Path, size: int = 32) -> Path:
    """A deployable fused dfdnet-s for `size` inputs with seeded, freshly initialised weights (tests only)."""
    from secdfd.common.ml.dfdnet import build_model, init_weights
    from secdfd.common.ml.export import fuse, save_deployable

    torch.manual_seed(0)  # test weights only
    rgb, ycc = build_model("dfdnet-s", size), build_model("dfdnet-s", size)
    for m in (rgb, ycc):
        init_weights(m)
    save_deployable(fuse(rgb.eval(), ycc.eval()), path, "dfdnet-s")
    return path


def start_tiny_deployment(root: Path, options, size: int = 32):
    """Keys, the shares of a tiny model (`write_tiny_model`) and dealer, server_a and server_b as
    processes on free loopback ports, all ready: (layout, endpoints, started). Stop with local.stop."""
    from secdfd.common.net.keys import make_keys
    from secdfd.common.service import deployment, local

    layout = local.Layout(root)
    write_tiny_model(root / "model.pt", size)
    make_keys(layout.keys)
    deployment.share_model(root / "model.pt", layout.shares)
    eps = local.Endpoints.free()
    started = local.start(layout, local.launches(layout, eps, options))
    try:
        local.wait_ready(started, layout.keys, 180)
    except BaseException:
        local.stop(started)
        raise
    return layout, eps, started


def assert_failed_record(out: str, path: str | None = None) -> dict:
    """`secdfd-client detect --json` for one file that failed: stdout is exactly one JSON object with
    an `error` and no verdict (machines see the failure in the same stream as results)."""
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1, out
    record = json.loads(lines[0])
    assert set(record) == {"file", "error"} and record["error"], record
    assert path is None or record["file"] == path, record
    return record
