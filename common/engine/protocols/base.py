"""Shared pieces of the protocols: the party context, the generator type, and `gather`."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")
# A protocol: yields this party's tensors for a round, receives the peer's, returns its result.
Proto = Generator[list[torch.Tensor], list[torch.Tensor], T]


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


def exchange(mine: list[torch.Tensor]) -> Proto[list[torch.Tensor]]:
    """One round: send `mine`, receive the peer's."""
    peer = yield mine
    return peer


def open_sum(x: torch.Tensor) -> Proto[torch.Tensor]:
    """Open an additively shared ring tensor (one round, 8 bytes per element)."""
    (peer,) = yield [x]
    return x + peer


def gather(gens: Sequence[Proto[Any]]) -> Proto[list[Any]]:
    """Run several protocols side by side: the openings of each round travel in one message."""
    results: list[Any] = [None] * len(gens)
    pending: dict[int, list[torch.Tensor]] = {}
    for i, g in enumerate(gens):
        try:
            pending[i] = next(g)
        except StopIteration as stop:
            results[i] = stop.value
    while pending:
        order = sorted(pending)
        flat = [t for i in order for t in pending[i]]
        peer = yield flat
        pos = 0
        nxt: dict[int, list[torch.Tensor]] = {}
        for i in order:
            k = len(pending[i])
            try:
                nxt[i] = gens[i].send(peer[pos : pos + k])
            except StopIteration as stop:
                results[i] = stop.value
            pos += k
        pending = nxt
    return results


def run_local(g: Proto[T]) -> T:
    """Run a protocol that must not communicate."""
    try:
        next(g)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("protocol tried to communicate where no round was expected")
