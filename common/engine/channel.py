"""The two-party channel: one exchange with the peer per round, counted per named step.

A protocol round is `exchange(step, tensors)`: this party sends its tensors, the peer sends
tensors of the same shapes and dtypes, and each side gets the peer's. All openings that belong to
the same round are passed in one call, so they travel in one message.

`Stats` counts what this party sent (bytes, messages = rounds) per step label; the in-memory
`pair()` joins two parties running in two threads of one process. The ZeroMQ transport implements
the same `Channel` interface.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from secdfd.common.errors import PeerTimeout, ProtocolError

A = TypeVar("A")
B = TypeVar("B")


@dataclass
class StepCount:
    bytes: int = 0
    rounds: int = 0


@dataclass
class Stats:
    """Bytes sent and rounds of this party, in total and per step label."""

    bytes: int = 0
    rounds: int = 0
    steps: dict[str, StepCount] = field(default_factory=dict)

    def add(self, step: str, nbytes: int) -> None:
        self.bytes += nbytes
        self.rounds += 1
        s = self.steps.setdefault(step, StepCount())
        s.bytes += nbytes
        s.rounds += 1


def payload_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class Channel(Protocol):
    """One party's end of the authenticated channel to the other server."""

    stats: Stats

    def exchange(self, step: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Send `tensors` to the peer and return the peer's tensors of the same shapes (one round)."""
        ...


_Mailbox = queue.Queue[tuple[str, list[torch.Tensor]]]


class MemoryChannel:
    """In-process channel end; two of them, made by `pair()`, connect two threads."""

    def __init__(self, inbox: _Mailbox, outbox: _Mailbox, peer: str, timeout: float) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._peer = peer
        self._timeout = timeout
        self.stats = Stats()

    def exchange(self, step: str, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        # Tensors are copied so that a party can never alias the peer's memory.
        self._outbox.put((step, [t.contiguous().clone() for t in tensors]))
        self.stats.add(step, payload_bytes(tensors))
        try:
            peer_step, got = self._inbox.get(timeout=self._timeout)
        except queue.Empty:
            raise PeerTimeout(f"no message from {self._peer} within {self._timeout:.0f} s at step {step}") from None
        if peer_step != step or len(got) != len(tensors):
            raise ProtocolError(f"{self._peer} is out of step: expected {step}, got {peer_step}")
        return got


def pair(timeout: float = 600.0) -> tuple[MemoryChannel, MemoryChannel]:
    """Two connected in-memory channel ends (party 0's, party 1's)."""
    a: _Mailbox = queue.Queue()
    b: _Mailbox = queue.Queue()
    return MemoryChannel(a, b, "party 1", timeout), MemoryChannel(b, a, "party 0", timeout)


def run_pair(fn0: Callable[[], A], fn1: Callable[[], B]) -> tuple[A, B]:
    """Run two party functions in two threads; return both results, re-raising the first error."""
    results: list[Any] = [None, None]
    errors: list[BaseException | None] = [None, None]

    def wrap(i: int, fn: Callable[[], Any]) -> None:
        try:
            results[i] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[i] = e

    t1 = threading.Thread(target=wrap, args=(1, fn1), name="party1", daemon=True)
    t1.start()
    wrap(0, fn0)
    t1.join()
    for e in errors:
        if e is not None:
            raise e
    return results[0], results[1]
