"""The party runtime: one server's side of a secure inference, and the scheduler that batches
rounds.

Every step of the plan runs as a protocol generator. The scheduler starts each step as soon as its
inputs exist, advances every running step until it needs to communicate, and sends all their
openings of that round in ONE message. Independent steps (the RGB and YCbCr streams, the two
branches of channel attention) therefore share rounds without any special casing. Both parties run
the same deterministic schedule, so their messages line up.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from secdfd.common.engine.channel import Channel, payload_bytes
from secdfd.common.engine.plan import Plan
from secdfd.common.engine.prng import new_seed
from secdfd.common.engine.protocols.base import Ctx
from secdfd.common.engine.randomness import Bundle, Provision, Source
from secdfd.common.engine.steps import KINDS, Weights, fc_layout
from secdfd.common.errors import ProtocolError, RandomnessError


@dataclass
class StepReport:
    name: str
    op: str
    bytes: int = 0
    rounds: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    """What one party measured for one inference."""

    seconds: float = 0.0  # online wall time
    prepare_seconds: float = 0.0  # expanding this party's randomness ahead of the online phase
    bytes: int = 0
    rounds: int = 0
    steps: list[StepReport] = field(default_factory=list)


class Party:
    """One server's runtime for one plan. `setup` once; `infer` per request."""

    def __init__(
        self,
        role: int,
        plan: Plan,
        weight_shares: dict[str, torch.Tensor],
        provision: Provision,
        channel: Channel,
        cmp_bits: int = 40,
        device: str = "cpu",
        limbs: bool | None = None,
    ) -> None:
        if provision.role != role:
            raise ValueError("provisioning material belongs to the other party")
        missing = set(plan.weights) - set(weight_shares)
        if missing:
            raise ValueError(f"weight shares are missing {len(missing)} tensors, e.g. {sorted(missing)[0]}")
        self.role = role
        self.plan = plan
        self.device = torch.device(device)
        self.ctx = Ctx(role, plan.frac, cmp_bits, self.device.type == "cuda" if limbs is None else limbs)
        self.channel = channel
        self._shares = weight_shares
        self._provision = provision
        self.weights: Weights | None = None

    def setup(self) -> None:
        """Open F = W - B for every weight once (one round); keep F and this party's mask share."""
        masked_keys = _masked_keys(self.plan)
        B = {k: self._provision.source(k).ring("B", self.plan.weights[k]) for k in masked_keys}
        mine = [self._shares[k] - B[k] for k in masked_keys]
        peer = self.channel.exchange("setup/open-weights", mine)
        if len(peer) != len(mine) or any(p.shape != m.shape for p, m in zip(peer, mine, strict=True)):
            raise ProtocolError("the peer server opened weights of another shape; are both on the same model?")
        F = {k: m + p for k, m, p in zip(masked_keys, mine, peer, strict=True)}
        wb = {k: (F[k] + B[k]) if self.role == 0 else B[k] for k in masked_keys}
        bias = {k: self._shares[k] for k in self.plan.weights if k not in F}
        weights = Weights({}, fc_layout(self.plan, wb), fc_layout(self.plan, F), bias)
        self.weights = to_device(weights, self.device)  # setup() may run again after a peer restarts

    def prepare(self, bundle: Bundle) -> list[Any]:
        """Expand this party's randomness for every step and fold in what is input-independent."""
        if self.weights is None:
            raise RuntimeError("setup() must run before inference")
        if bundle.role != self.role:
            raise ValueError("the bundle belongs to the other party")
        bundle.consume()
        rands: list[Any] = []
        for step in self.plan.steps:
            kind = KINDS[step.op]
            src = bundle.source(step.index)
            R = kind.deal(src, step, self.plan, self.ctx, self.weights)
            src.finish()
            R = to_device(R, self.device)
            if kind.prepare is not None:
                R = kind.prepare(R, step, self.weights, self.ctx)
            rands.append(R)
        return rands

    def infer(self, x_share: torch.Tensor, bundle: Bundle) -> tuple[torch.Tensor, Report]:
        """This party's share of the model output for its share of the input (ring, scale f)."""
        if tuple(x_share.shape) != self.plan.input_shape:
            raise ValueError(f"input share has shape {tuple(x_share.shape)}, the plan expects {self.plan.input_shape}")
        t0 = time.perf_counter()
        rands = self.prepare(bundle)
        t1 = time.perf_counter()
        y, report = self.run(x_share, rands)
        report.prepare_seconds = t1 - t0
        return y, report

    def run(self, x_share: torch.Tensor, rands: list[Any]) -> tuple[torch.Tensor, Report]:
        """The online phase (the randomness already prepared)."""
        assert self.weights is not None
        t0 = time.perf_counter()
        b0, r0 = self.channel.stats.bytes, self.channel.stats.rounds
        steps = self.plan.steps
        reports = [StepReport(s.name, s.op) for s in steps]
        values: dict[int, torch.Tensor] = {}
        remaining_users = [0] * len(steps)
        for s in steps:
            for i in s.inputs:
                remaining_users[i] += 1
        waiting = {s.index: len(set(s.inputs)) for s in steps}
        consumers: dict[int, list[int]] = {}
        for s in steps:
            for i in set(s.inputs):
                consumers.setdefault(i, []).append(s.index)
        pending: dict[int, tuple[Any, list[torch.Tensor]]] = {}
        ready = [s.index for s in steps if not s.inputs]

        def finish(idx: int, value: torch.Tensor) -> None:
            values[idx] = value
            for c in consumers.get(idx, []):
                waiting[c] -= 1
                if waiting[c] == 0:
                    ready.append(c)
            for i in steps[idx].inputs:  # free inputs nobody needs any more
                remaining_users[i] -= 1
                if remaining_users[i] == 0 and i != self.plan.output:
                    values.pop(i, None)

        def advance(idx: int, gen: Any, peer: list[torch.Tensor] | None) -> None:
            t = time.perf_counter()
            try:
                out = next(gen) if peer is None else gen.send(peer)
            except StopIteration as stop:
                reports[idx].seconds += time.perf_counter() - t
                finish(idx, stop.value)
                return
            reports[idx].seconds += time.perf_counter() - t
            pending[idx] = (gen, out)

        rnd = 0
        while True:
            while ready:
                ready.sort()
                idx = ready.pop(0)
                step = steps[idx]
                if step.op == "input":
                    finish(idx, x_share.to(self.device))
                    continue
                gen = KINDS[step.op].run(self.ctx, step, [values[i] for i in step.inputs], rands[idx], self.weights)
                advance(idx, gen, None)
            if not pending:
                break
            order = sorted(pending)
            flat = [t for i in order for t in pending[i][1]]
            # One message per round: the openings of every running step.
            if self.device.type != "cpu":
                flat = [t.cpu() for t in flat]
            peer = self.channel.exchange(f"round {rnd}: {steps[order[0]].name}", flat)
            if len(peer) != len(flat) or any(p.shape != m.shape or p.dtype != m.dtype
                                             for p, m in zip(peer, flat, strict=True)):
                raise ProtocolError(f"the peer server sent a message of another layout in round {rnd}")
            rnd += 1
            pos = 0
            current = pending
            pending = {}
            for i in order:
                gen, mine = current[i]
                k = len(mine)
                reports[i].bytes += payload_bytes(mine)
                reports[i].rounds += 1
                advance(i, gen, [t.to(self.device) for t in peer[pos : pos + k]])
                pos += k
        report = Report(
            seconds=time.perf_counter() - t0,
            bytes=self.channel.stats.bytes - b0,
            rounds=self.channel.stats.rounds - r0,
            steps=reports,
        )
        return values[self.plan.output].cpu(), report


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor inside dataclasses, lists, tuples and dicts to `device`."""
    if device.type == "cpu":
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list | tuple):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return type(obj)(**{f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)})
    return obj


def _masked_keys(plan: Plan) -> list[str]:
    """Weight keys that get a fixed mask B (weights proper; biases are only added)."""
    keys = []
    for s in plan.steps:
        if s.op == "linear" and s.attrs["weight"] not in keys:
            keys.append(s.attrs["weight"])
    return keys


class Dealer:
    """The trusted dealer for one plan: fixed weight masks at provisioning, one bundle per inference.

    It never sees an input, a weight or an output: only the plan and the seeds it draws."""

    def __init__(self, plan: Plan, provision_seeds: tuple[bytes, bytes] | None = None, cmp_bits: int = 40) -> None:
        self.plan = plan
        self.ctx = Ctx(0, plan.frac, cmp_bits)
        self._prov_seeds = provision_seeds or (new_seed(), new_seed())
        self._masks: dict[str, torch.Tensor] | None = None
        self._used: set[str] = set()

    @property
    def provision_seeds(self) -> tuple[bytes, bytes]:
        return self._prov_seeds

    def provision(self) -> tuple[Provision, Provision]:
        return Provision(0, self._prov_seeds[0]), Provision(1, self._prov_seeds[1])

    def _weights(self) -> Weights:
        if self._masks is None:
            self._masks = fc_layout(self.plan, {
                k: Source.dealer(self._prov_seeds, f"prov/{k}").ring("B", self.plan.weights[k])
                for k in _masked_keys(self.plan)
            })
        return Weights(self._masks, {}, {}, {})

    def bundle(self, bundle_id: str) -> tuple[Bundle, Bundle]:
        """Fresh correlated randomness for one inference; an id is dealt once."""
        if bundle_id in self._used:
            raise RandomnessError(f"bundle id {bundle_id} was already dealt")
        self._used.add(bundle_id)
        seeds = (new_seed(), new_seed())
        w = self._weights()
        corrections: dict[int, list[torch.Tensor]] = {}
        for step in self.plan.steps:
            src = Source.dealer(seeds, f"bundle/{step.index}")
            KINDS[step.op].deal(src, step, self.plan, self.ctx, w)
            if src.corrections:
                corrections[step.index] = src.corrections
        return Bundle(bundle_id, 0, seeds[0]), Bundle(bundle_id, 1, seeds[1], corrections)
