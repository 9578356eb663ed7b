"""Two-party additive sharing over Z_2^64 with CSPRNG masks."""

from __future__ import annotations

import torch

from secdfd.common.engine.prng import Stream, new_seed


def share(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a ring tensor into two uniformly random shares that sum to it (mod 2^64)."""
    r = Stream(new_seed(), "share").ring(tuple(x.shape))
    return r, x - r


def reconstruct(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    return x0 + x1
