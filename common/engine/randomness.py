"""Correlated randomness: one piece of code that the dealer and both parties run.

Each protocol states what it needs once, as a function of a `Source`. The same function runs in
three roles:
- the dealer (`Source.dealer`): holds both parties' seeds, sees full values, and records
  corrections for derived values;
- party 0 (`Source.party(0, ...)`): regenerates its shares from its seed;
- party 1 (`Source.party(1, ...)`): regenerates its free shares from its seed and reads derived
  values from the corrections the dealer sent.

Seed compression: a "free" value (uniform in the ring, or uniform bits) has both shares drawn from
the two seeds, so nothing travels; a "derived" value (a product, the bits of a mask) has party 0's
share drawn from its seed and party 1's share = value - share_0 (or XOR), which is all the dealer
sends. Streams are separated by purpose (scope/step/name), so each step's randomness is independent
of the order in which steps are prepared.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from secdfd.common.engine.prng import Stream
from secdfd.common.errors import RandomnessError

Shape = tuple[int, ...]
MAX_BATCH = 64  # the most inputs one inference ever runs at once (`Plan.batched`): bounds a bundle's size
# The layout of what a dealer deals: servers refuse a dealer of another layout, whose bundles would
# read as other values. 2: a comparison's leaf and node monomials in the order their tables hold them.
RANDOMNESS_LAYOUT = 2


_DTYPES = {"i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64}
_NAMES = {v: k for k, v in _DTYPES.items()}
_NP = {"i8": np.int8, "i16": np.int16, "i32": np.int32, "i64": np.int64}


def _compact_dtype(bits: int) -> torch.dtype:
    for dt, width in ((torch.int8, 8), (torch.int16, 16), (torch.int32, 32)):
        if bits <= width:
            return dt
    return torch.int64


@dataclass
class _Tape:
    """The corrections of one step, read in order (party 1) or recorded in order (dealer)."""

    items: list[torch.Tensor]
    pos: int = 0


class Source:
    """Where a protocol's correlated randomness comes from, for one step in one role."""

    def __init__(self, role: int | None, seeds: Sequence[bytes], scope: str, tape: _Tape | None = None) -> None:
        self.role = role  # None: dealer; 0 or 1: party
        self._seeds = seeds
        self._scope = scope
        self._tape = tape if tape is not None else _Tape([])

    @classmethod
    def dealer(cls, seeds: Sequence[bytes], scope: str) -> Source:
        return cls(None, seeds, scope)

    @classmethod
    def party(cls, role: int, seed: bytes, scope: str, corrections: list[torch.Tensor] | None = None) -> Source:
        seeds = [b"", b""]
        seeds[role] = seed
        return cls(role, seeds, scope, _Tape(corrections if role == 1 and corrections is not None else []))

    def child(self, name: str) -> Source:
        """A sub-scope for a nested protocol, sharing this source's corrections in order."""
        return Source(self.role, self._seeds, f"{self._scope}/{name}", self._tape)

    @property
    def is_dealer(self) -> bool:
        return self.role is None

    @property
    def corrections(self) -> list[torch.Tensor]:
        """Dealer: the corrections recorded so far (what party 1 receives)."""
        return self._tape.items

    def _stream(self, who: int, name: str) -> Stream:
        return Stream(self._seeds[who], f"{self._scope}/{name}")

    def ring(self, name: str, shape: Shape) -> torch.Tensor:
        """A uniform ring element, additively shared, both shares from the seeds (nothing sent)."""
        if self.role is None:
            return self._stream(0, name).ring(shape) + self._stream(1, name).ring(shape)
        return self._stream(self.role, name).ring(shape)

    def bits(self, name: str, shape: Shape) -> torch.Tensor:
        """Uniform words (bit-sliced bits), XOR-shared, both shares from the seeds."""
        if self.role is None:
            return self._stream(0, name).ring(shape) ^ self._stream(1, name).ring(shape)
        return self._stream(self.role, name).ring(shape)

    def ring_from(self, name: str, shape: Shape, value: Callable[[], torch.Tensor], bits: int = 64) -> torch.Tensor:
        """Additive shares of a value the dealer computes; party 1's share is a correction.

        bits < 64: the shares are only ever multiplied by a multiple of 2^(64 - bits), so they matter
        mod 2^bits and the correction travels in the smallest integer type that holds them."""
        return self._derived(name, shape, value, xor=False, bits=bits)

    def bits_from(self, name: str, shape: Shape, value: Callable[[], torch.Tensor]) -> torch.Tensor:
        """XOR shares of words the dealer computes; party 1's share is a correction."""
        return self._derived(name, shape, value, xor=True)

    def _derived(self, name: str, shape: Shape, value: Callable[[], torch.Tensor], xor: bool,
                 bits: int = 64) -> torch.Tensor:
        if self.role == 0:
            return self._stream(0, name).ring(shape)
        if self.role == 1:
            tape = self._tape
            if tape.pos >= len(tape.items):
                raise RandomnessError(f"bundle has too few corrections at {self._scope}/{name}")
            c = tape.items[tape.pos]
            tape.pos += 1
            if tuple(c.shape) != tuple(shape) or c.dtype != _compact_dtype(bits):
                raise RandomnessError(f"correction for {self._scope}/{name} has the wrong shape or type")
            return c.to(torch.int64)
        v = value().reshape(shape).to(torch.int64)
        s0 = self._stream(0, name).ring(shape)
        corr = v ^ s0 if xor else v - s0
        self._tape.items.append(corr.to(_compact_dtype(bits)))  # keeps the low bits (two's complement)
        return v

    def finish(self) -> None:
        """Party 1: every correction for this scope must have been used."""
        if self.role == 1 and self._tape.pos != len(self._tape.items):
            raise RandomnessError(f"bundle has unused corrections at {self._scope}")


@dataclass
class Bundle:
    """One party's correlated randomness for one inference: a seed, and for party 1 the corrections
    per step. A bundle can be consumed once; a second use raises (reusing a Beaver triple leaks)."""

    bundle_id: str
    role: int
    seed: bytes
    corrections: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    batch: int = 1  # the number of inputs the inference it serves runs at once (`Plan.batched`)
    _consumed: bool = False

    def consume(self) -> Bundle:
        if self._consumed:
            raise RandomnessError(f"bundle {self.bundle_id} was already used; correlated randomness is single-use")
        self._consumed = True
        return self

    def source(self, step: int) -> Source:
        return Source.party(self.role, self.seed, f"bundle/{step}", self.corrections.get(step, []))

    def nbytes(self) -> int:
        return len(self.seed) + sum(t.numel() * t.element_size() for ts in self.corrections.values() for t in ts)

    def to_bytes(self) -> bytearray:
        """msgpack header (id, role, seed, per step the correction shapes) + the corrections' raw data,
        written into one buffer (a batch bundle runs to gigabytes: no intermediate copies)."""
        steps = [[k, [[_NAMES[t.dtype], list(t.shape)] for t in ts]] for k, ts in sorted(self.corrections.items())]
        head = msgpack.packb({"v": 2, "id": self.bundle_id, "role": self.role, "seed": self.seed, "steps": steps,
                              "batch": self.batch})
        tensors = [t for _, ts in sorted(self.corrections.items()) for t in ts]
        pos = 4 + len(head)
        out = bytearray(pos + sum(t.numel() * t.element_size() for t in tensors))
        struct.pack_into("<I", out, 0, len(head))
        out[4:pos] = head
        view = np.frombuffer(out, dtype=np.uint8)
        for t in tensors:
            raw = t.contiguous().numpy().reshape(-1).view(np.uint8)
            view[pos : pos + raw.size] = raw
            pos += raw.size
        return out

    @classmethod
    def from_bytes(cls, data: bytes | bytearray) -> Bundle:
        try:
            (n,) = struct.unpack_from("<I", data, 0)
            head = msgpack.unpackb(data[4 : 4 + n])
            batch = head.get("batch", 1)
            if (head["v"] != 2 or head["role"] not in (0, 1) or len(head["seed"]) != 32 or type(batch) is not int
                    or not 1 <= batch <= MAX_BATCH):
                raise ValueError("header")
            pos = 4 + n
            corr: dict[int, list[torch.Tensor]] = {}
            buf = memoryview(data)
            for step, shapes in head["steps"]:
                ts = []
                for dt, shape in shapes:
                    cnt = 1
                    for d in shape:
                        cnt *= int(d)
                    npdt = np.dtype(_NP[dt]).newbyteorder("<")
                    size = npdt.itemsize * cnt
                    arr = np.frombuffer(buf[pos : pos + size], dtype=npdt)
                    if arr.size != cnt:
                        raise ValueError("truncated")
                    ts.append(torch.from_numpy(arr.astype(npdt.newbyteorder("="))).reshape(shape))
                    pos += size
                corr[int(step)] = ts
            if pos != len(data):
                raise ValueError("trailing data")
            return cls(str(head["id"]), int(head["role"]), bytes(head["seed"]), corr, batch)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed bundle
            raise RandomnessError(f"malformed bundle ({type(e).__name__})") from None


@dataclass(frozen=True)
class Provision:
    """One party's provisioning material for one split of one model: the seed of its share of the
    fixed weight masks B. The masks' streams are named by the split (`split`) and the weight key, and
    every split has its own fresh seeds, so no two splits ever share a mask (see `mask_purpose`)."""

    role: int
    seed: bytes
    split: str

    def source(self, key: str) -> Source:
        return Source.party(self.role, self.seed, mask_purpose(self.split, key))

    def to_bytes(self) -> bytes:
        return bytes([self.role]) + self.seed + self.split.encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Provision:
        if len(data) < 34 or len(data) > 33 + 64 or data[0] not in (0, 1):
            raise RandomnessError("malformed provisioning material")
        try:
            split = data[33:].decode("ascii")
        except UnicodeDecodeError:
            raise RandomnessError("malformed provisioning material") from None
        return cls(data[0], data[1:33], split)


def mask_purpose(split: str, key: str) -> str:
    """The stream of weight key `key`'s mask B in split `split`.

    F = W - B is opened once per split; if two models W and W' ever met the same B, each server alone
    could compute F' - F = W' - W. The split id in the purpose and fresh seeds per split rule that out.
    """
    if not split:
        raise RandomnessError("a weight mask needs the split it belongs to")
    return f"prov/{split}/{key}"

