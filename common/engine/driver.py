"""The one driver of protocol generators: many protocols advanced in lockstep, one message a round.

A protocol is a generator (`Proto`): it yields the tensors this party opens in a round and receives
the peer's tensors of the same shapes; its return value is its result. `Lockstep` holds any number
of running protocols under keys, gives the openings of all of them in key order as one list (one
message), and hands each its slice of the peer's list. Three things are built on it:

- `gather` (inside a protocol): run sub-protocols side by side, sharing rounds;
- `drive` (a whole protocol against a channel): what benchmarks and tests run;
- the party evaluator's scheduler (`secdfd.common.engine.evaluator`), which adds steps as their
  inputs become ready and keeps per-step figures through the hooks.

Both parties run the same deterministic schedule, so their messages line up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import torch

from secdfd.common.engine.protocols.base import Proto

T = TypeVar("T")


class Exchange(Protocol):
    """Anything that runs one round with the peer (a channel)."""

    def exchange(self, step: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]: ...


class Lockstep:
    """Running protocols under keys; each round's openings of all of them travel together.

    Keys are integers (plan step indices, positions). `done(key, result)` is called when a protocol
    returns. The optional `timed(key, seconds)` gets the compute time of every advance of a protocol,
    and `sent(key, tensors)` what it opened in a round, so a caller can keep per-key figures.
    """

    def __init__(self, done: Callable[[int, Any], None],
                 timed: Callable[[int, float], None] | None = None,
                 sent: Callable[[int, list[torch.Tensor]], None] | None = None) -> None:
        self._done = done
        self._timed = timed
        self._sent = sent
        self._pending: dict[int, tuple[Proto[Any], list[torch.Tensor]]] = {}

    def __bool__(self) -> bool:
        return bool(self._pending)

    def add(self, key: int, gen: Proto[Any]) -> None:
        """Start a protocol: run it to its first opening (or to its end, if it needs none)."""
        self._advance(key, gen, None)

    def keys(self) -> list[int]:
        """The protocols waiting for this round, in message order."""
        return sorted(self._pending)

    def openings(self) -> list[torch.Tensor]:
        """This round's message: the openings of every waiting protocol, in key order."""
        return [t for k in self.keys() for t in self._pending[k][1]]

    def deliver(self, peer: Sequence[torch.Tensor]) -> None:
        """Hand each waiting protocol its slice of the peer's message and advance it."""
        current, self._pending = self._pending, {}
        pos = 0
        for key in sorted(current):
            gen, mine = current[key]
            if self._sent is not None:
                self._sent(key, mine)
            self._advance(key, gen, list(peer[pos : pos + len(mine)]))
            pos += len(mine)

    def _advance(self, key: int, gen: Proto[Any], peer: list[torch.Tensor] | None) -> None:
        t0 = time.perf_counter()
        try:
            out = next(gen) if peer is None else gen.send(peer)
        except StopIteration as stop:
            self._clock(key, t0)
            self._done(key, stop.value)
            return
        self._clock(key, t0)
        self._pending[key] = (gen, out)

    def _clock(self, key: int, t0: float) -> None:
        if self._timed is not None:
            self._timed(key, time.perf_counter() - t0)


def gather(gens: Sequence[Proto[Any]]) -> Proto[list[Any]]:
    """Run several protocols side by side: the openings of each round travel in one message."""
    results: list[Any] = [None] * len(gens)
    running: Lockstep = Lockstep(results.__setitem__)
    for i, g in enumerate(gens):
        running.add(i, g)
    while running:
        running.deliver((yield running.openings()))
    return results


def drive(channel: Exchange, gen: Proto[T], step: str = "run") -> T:
    """Run one protocol to its end against `channel`, one exchange per round."""
    out: list[T] = []
    running: Lockstep = Lockstep(lambda _, value: out.append(value))
    running.add(0, gen)
    while running:
        running.deliver(channel.exchange(step, running.openings()))
    return out[0]
