"""Model factories for `secdfd bench model`, e.g.
    secdfd bench model examples/models.py:dfdnet --input-shape 1,3,128,128
Weights are freshly initialised (the timing and traffic of a secure inference do not depend on
them); use `secdfd bench e2e` for the trained embedded model."""

from __future__ import annotations

import torch
from torch import nn

from secdfd.common.ml.dfdnet import FusedDFDNet, build_model, init_weights


def _fused(name: str, size: int = 128) -> nn.Module:
    torch.manual_seed(0)
    rgb, ycc = build_model(name, size), build_model(name, size)
    for m in (rgb, ycc):
        init_weights(m)
    return FusedDFDNet(rgb, ycc).eval()


def dfdnet() -> nn.Module:
    """Full-width DFDNet, both streams fused (about 2 x 28.15 M parameters)."""
    return _fused("dfdnet")


def dfdnet_s() -> nn.Module:
    """The reduced-width variant that the embedded default uses."""
    return _fused("dfdnet-s")
