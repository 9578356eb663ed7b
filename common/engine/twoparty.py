"""Two-party evaluation in one process: both servers in two threads over an in-memory channel.

The same `Party` code runs here and in the networked servers; only the channel differs. Used by the
benchmarks and the tests, and by anyone who wants the secure result of a module on an input.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from secdfd.common.engine.channel import pair, run_pair
from secdfd.common.engine.evaluator import Dealer, Party
from secdfd.common.engine.figures import StepFigures, merge
from secdfd.common.engine.plan import Plan, build_plan, extract_weights
from secdfd.common.engine.ring import FixedPoint
from secdfd.common.engine.sharing import share


@dataclass
class EvalReport:
    seconds: float  # online wall time, both parties side by side
    offline_seconds: float  # dealer generation + the parties' preparation
    dealer_seconds: float
    bytes_per_party: list[int]
    rounds: int
    dealer_bytes: int
    steps: list[StepFigures] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "offline_seconds": self.offline_seconds,
            "dealer_seconds": self.dealer_seconds,
            "bytes_per_party": self.bytes_per_party,
            "rounds": self.rounds,
            "dealer_bytes": self.dealer_bytes,
            "steps": [s.to_dict() for s in self.steps],
        }


def share_weights(module: nn.Module, plan: Plan) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The model owner's split of a module's weights (see `share_values`)."""
    return share_values(extract_weights(module, plan), plan)


Shares = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]


def share_values(values: dict[str, torch.Tensor], plan: Plan) -> Shares:
    """The model owner's split: fixed-point weights per plan key (at `Plan.weight_fracs`: weights at f,
    or f - 2 for a layer on a 2f input; biases at their layer's output scale) into two random shares."""
    fracs = plan.weight_fracs()
    w0: dict[str, torch.Tensor] = {}
    w1: dict[str, torch.Tensor] = {}
    for k, v in values.items():
        w0[k], w1[k] = share(FixedPoint(fracs[k]).encode(v))
    return w0, w1


_SILENT = ("input", "output", "reshape", "index", "permute", "expand", "repeat")


class TwoParty:
    """A provisioned pair of parties (with their dealer) for one module and input shape."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], frac: int = 16, cmp_bits: int = 40,
                 device: str = "cpu", limbs: bool | None = None, chain: bool = True) -> None:
        self.plan = build_plan(module, input_shape, frac, cmp_bits, chain)
        self.fp = FixedPoint(frac)
        self.dealer = Dealer(self.plan, secrets.token_hex(16), cmp_bits=cmp_bits)  # a fresh split
        w0, w1 = share_weights(module, self.plan)
        p0, p1 = self.dealer.provision()
        self.ch0, self.ch1 = pair()
        self.parties = (
            Party(0, self.plan, w0, p0, self.ch0, cmp_bits, device, limbs),
            Party(1, self.plan, w1, p1, self.ch1, cmp_bits, device, limbs),
        )
        run_pair(self.parties[0].setup, self.parties[1].setup)
        self._count = 0

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, EvalReport]:
        """Secure evaluation on a float input (its first dimension: inputs evaluated at once, each on its
        own); returns the decoded float64 output and the report."""
        self._count += 1
        t0 = time.perf_counter()
        b0, b1 = self.dealer.bundle(f"local-{self._count}", int(x.shape[0]))
        dealer_s = time.perf_counter() - t0
        dealer_bytes = b0.nbytes() + b1.nbytes()
        x0, x1 = share(self.fp.encode(x))
        t1 = time.perf_counter()
        r0, r1 = run_pair(lambda: self.parties[0].prepare(b0), lambda: self.parties[1].prepare(b1))
        prep_s = time.perf_counter() - t1
        (y0, rep0), (y1, rep1) = run_pair(lambda: self.parties[0].run(x0, r0), lambda: self.parties[1].run(x1, r1))
        y = self.fp.decode(y0 + y1)
        rep = EvalReport(
            seconds=max(rep0.seconds, rep1.seconds),
            offline_seconds=dealer_s + prep_s,
            dealer_seconds=dealer_s,
            bytes_per_party=[rep0.bytes, rep1.bytes],
            rounds=rep0.rounds,
            dealer_bytes=dealer_bytes,
            # every step but the bookkeeping ones (input, output, reshapes) that never communicate
            steps=[f for f in merge(rep0.steps, rep1.steps) if f.rounds or f.op not in _SILENT],
        )
        return y, rep
