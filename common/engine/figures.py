"""Figures of one secure inference: one type for per-step costs, one for a party's totals.

`StepFigures` is the only shape per-step figures take, wherever they go: a party's report, the two
parties merged, the reply a server sends a client (`to_dict`/`from_dict`), the benchmark JSON and
its report. A party fills its own slot of `bytes_per_party`; merging two parties' lists adds the
slots and keeps the larger rounds and seconds (the parties run side by side).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from secdfd.common.errors import ProtocolError


@dataclass(frozen=True)
class StepFigures:
    """What one plan step cost: the bytes each party sent for it, the rounds it took part in, and
    its compute seconds (the slower party's, once merged)."""

    index: int
    name: str
    op: str
    bytes_per_party: tuple[int, int] = (0, 0)
    rounds: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "op": self.op,
                "bytes_per_party": list(self.bytes_per_party), "rounds": self.rounds, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StepFigures:
        """Read `to_dict`'s output (e.g. from a server's reply); ProtocolError if it is not that."""
        try:
            b = d["bytes_per_party"]
            if not (isinstance(b, list | tuple) and len(b) == 2):
                raise TypeError("bytes_per_party")
            return cls(int(d["index"]), str(d["name"]), str(d["op"]), (int(b[0]), int(b[1])),
                       int(d["rounds"]), float(d["seconds"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed step figures ({type(e).__name__}: {e})") from None

    def merged(self, other: StepFigures) -> StepFigures:
        """Both parties' figures of the same step."""
        return replace(self, bytes_per_party=(self.bytes_per_party[0] + other.bytes_per_party[0],
                                              self.bytes_per_party[1] + other.bytes_per_party[1]),
                       rounds=max(self.rounds, other.rounds), seconds=max(self.seconds, other.seconds))


def merge(*per_party: Iterable[StepFigures]) -> list[StepFigures]:
    """Several parties' step lists as one list, by step index."""
    out: dict[int, StepFigures] = {}
    for steps in per_party:
        for s in steps:
            out[s.index] = out[s.index].merged(s) if s.index in out else s
    return [out[i] for i in sorted(out)]


@dataclass
class Report:
    """What one party measured for one inference.

    `seconds` is the online phase; `prepare_seconds` the expansion of this party's randomness ahead
    of it (offline). `steps` has one entry per plan step, communicating or not.
    """

    seconds: float = 0.0
    prepare_seconds: float = 0.0
    bytes: int = 0
    rounds: int = 0
    steps: list[StepFigures] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain msgpack-able values; only the steps that communicated are kept."""
        return {"seconds": self.seconds, "prepare_seconds": self.prepare_seconds, "bytes": self.bytes,
                "rounds": self.rounds, "steps": [s.to_dict() for s in self.steps if s.rounds]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """Read `to_dict`'s output; ProtocolError if it is not that."""
        try:
            steps = d["steps"]
            if not isinstance(steps, Sequence):
                raise TypeError("steps")
            return cls(float(d["seconds"]), float(d["prepare_seconds"]), int(d["bytes"]), int(d["rounds"]),
                       [StepFigures.from_dict(s) for s in steps])
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed report ({type(e).__name__}: {e})") from None
