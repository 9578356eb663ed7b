"""The ring Z_2^64 on torch.int64 and fixed-point encoding.

torch's int64 add, sub and mul wrap modulo 2^64 (two's complement), which is exactly arithmetic in
Z_2^64; every share is an int64 tensor. A real value v is encoded as round(v * 2^f) with f
fractional bits (16 by default). Right shifts of ring elements are done on the unsigned view via
`lshr` because torch's `>>` on int64 is arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE = torch.int64


@dataclass(frozen=True)
class FixedPoint:
    """Fixed-point format: `frac_bits` fractional bits in Z_2^64."""

    frac_bits: int = 16

    def __post_init__(self) -> None:
        if not 0 <= self.frac_bits <= 61:  # 3f - 2 for the biases of chained layers
            raise ValueError(f"frac_bits must be in [0, 61], got {self.frac_bits}")

    @property
    def scale(self) -> int:
        return 1 << self.frac_bits

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Real tensor -> ring tensor (round to nearest). Magnitudes must stay below 2^(62 - f)."""
        x = x.to(torch.float64)
        limit = float(2 ** (62 - self.frac_bits))
        if x.numel() and float(x.abs().max()) >= limit:
            raise ValueError(f"value too large for fixed point with {self.frac_bits} fractional bits")
        return torch.round(x * self.scale).to(DTYPE)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Ring tensor (signed view) -> float64 real tensor."""
        return x.to(torch.float64) / self.scale


def lshr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ring elements by k bits (0 <= k < 64)."""
    if k == 0:
        return x
    return (x >> k) & ((1 << (64 - k)) - 1)


def msb(x: torch.Tensor) -> torch.Tensor:
    """Most significant bit (0 or 1) of each ring element, as int64."""
    return lshr(x, 63)

