"""Shared pieces of the protocols: the party context, the generator type and the plain opening.

Protocols that run side by side use `secdfd.common.engine.driver.gather`."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import TypeAlias, TypeVar

import torch

T = TypeVar("T")
# A protocol: yields this party's tensors for a round, receives the peer's, returns its result.
Proto: TypeAlias = Generator[list[torch.Tensor], list[torch.Tensor], T]


@dataclass(frozen=True)
class Ctx:
    """What every protocol needs to know about the party it runs for.

    frac: fractional bits of fixed-point values; cmp_bits: comparisons are exact for values with
    |x| < 2^cmp_bits ring units (2^(cmp_bits - frac) in real terms).
    """

    party: int
    frac: int = 16
    cmp_bits: int = 40
    limbs: bool = False  # ring products of linear layers via float64 limbs (CUDA)

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise ValueError("party must be 0 or 1")
        if not 8 <= self.cmp_bits <= 62 - self.frac:
            raise ValueError(f"cmp_bits must be in [8, {62 - self.frac}]")


def open_sum(x: torch.Tensor) -> Proto[torch.Tensor]:
    """Open an additively shared ring tensor (one round, 8 bytes per element)."""
    (peer,) = yield [x]
    return x + peer
