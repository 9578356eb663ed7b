"""Shared test helpers: run a protocol for both parties over the in-memory channel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from secdfd.common.cli.bench import run_protocol
from secdfd.common.engine.ring import FixedPoint


@pytest.fixture
def fp() -> FixedPoint:
    return FixedPoint(16)


@pytest.fixture
def run2():
    """run2(deal, proto, x_ring) -> (reconstructed ring output, figures)."""
    return run_protocol


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
