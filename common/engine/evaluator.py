"""One server's side of a secure inference (`Party`), and the dealer of its randomness (`Dealer`).

Every step of the plan runs as a protocol generator under the driver (`Lockstep`): the scheduler
starts each step as soon as its inputs exist, advances every running step until it needs to
communicate, and sends all their openings of that round in ONE message. Independent steps (the RGB
and YCbCr streams, the two branches of channel attention) therefore share rounds without any special
casing. Both parties run the same deterministic schedule, so their messages line up.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from secdfd.common.engine.channel import Channel, payload_bytes
from secdfd.common.engine.driver import Lockstep
from secdfd.common.engine.figures import Report, StepFigures
from secdfd.common.engine.plan import Plan
from secdfd.common.engine.prng import new_seed
from secdfd.common.engine.protocols.base import Ctx
from secdfd.common.engine.randomness import Bundle, Provision, Source, mask_purpose
from secdfd.common.engine.steps import (
    STEP_KINDS,
    Weights,
    fc_layout,
    kept_inputs,
    kept_randomness,
    kept_until,
    shares_of,
    split_weights,
)
from secdfd.common.errors import ProtocolError, RandomnessError


class Party:
    """One server's runtime for one plan: `setup` once, `prepare` a bundle ahead, `run` per request."""

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
        _check_cmp_bits(plan, cmp_bits)
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
        self._plans = {1: plan}

    def plan_at(self, batch: int) -> Plan:
        """The plan widened to `batch` inputs at once (kept: both `prepare` and `run` need it)."""
        return _widened(self._plans, batch)

    def setup(self) -> None:
        """Open F = W - B for every weight once (one round); keep F and this party's mask share."""
        masked_keys = self.plan.masked_keys()
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
        split_weights(self.plan, self.ctx, self.weights)

    def prepare(self, bundle: Bundle) -> Rands:
        """Expand this party's randomness for every step and fold in what is input-independent."""
        if self.weights is None:
            raise RuntimeError("setup() must run before inference")
        if bundle.role != self.role:
            raise ValueError("the bundle belongs to the other party")
        plan = self.plan_at(bundle.batch)
        bundle.consume()
        rands = Rands(bundle.batch)
        dealt: dict[int, Any] = {}
        kept = kept_until(plan)
        for step in plan.steps:
            kind = STEP_KINDS[step.op]
            src = bundle.source(step.index)
            R = kind.deal(src, step, plan, self.ctx, self.weights, dealt)
            src.finish()
            R = to_device(R, self.device)
            if step.index in kept:
                dealt[step.index] = kept_randomness(step, R)
            if kind.prepare is not None:
                R = kind.prepare(R, step, self.weights, self.ctx)
            rands.append(R)
        return rands

    def run(self, x_share: torch.Tensor, rands: Rands) -> tuple[torch.Tensor, Report]:
        """The online phase (the randomness already prepared): this party's share of the output. The
        input holds `rands.batch` inputs along its first dimension, each evaluated on its own."""
        if self.weights is None:
            raise RuntimeError("setup() must run before inference")
        plan = self.plan_at(rands.batch)
        if tuple(x_share.shape) != plan.input_shape:
            raise ValueError(f"input share has shape {tuple(x_share.shape)}, the bundle is for {plan.input_shape}")
        weights = self.weights
        t0 = time.perf_counter()
        b0, r0 = self.channel.stats.bytes, self.channel.stats.rounds
        steps = plan.steps
        role = self.role
        figures = [StepFigures(s.index, s.name, s.op) for s in steps]
        flow = _Dataflow(plan)

        def timed(idx: int, seconds: float) -> None:
            figures[idx] = dataclasses.replace(figures[idx], seconds=figures[idx].seconds + seconds)

        def sent(idx: int, mine: list[torch.Tensor]) -> None:
            f = figures[idx]
            b = list(f.bytes_per_party)
            b[role] += payload_bytes(mine)
            figures[idx] = dataclasses.replace(f, bytes_per_party=(b[0], b[1]), rounds=f.rounds + 1)

        running = Lockstep(flow.finish, timed, sent)
        rnd = 0
        while True:
            while flow.ready:
                idx = flow.next_ready()
                step = steps[idx]
                if step.op == "input":
                    flow.finish(idx, x_share.to(self.device))
                    continue
                kept = kept_inputs(plan, step)  # the inputs passed as a truncation's full result
                ins = [flow.values[i] if pos in kept else shares_of(flow.values[i])
                       for pos, i in enumerate(step.inputs)]
                running.add(idx, STEP_KINDS[step.op].run(self.ctx, step, ins, rands[idx], weights))
            if not running:
                break
            flat = running.openings()
            # One message per round: the openings of every running step.
            if self.device.type != "cpu":
                flat = [t.cpu() for t in flat]
            peer = self.channel.exchange(f"round {rnd}: {steps[running.keys()[0]].name}", flat)
            if len(peer) != len(flat) or any(p.shape != m.shape or p.dtype != m.dtype
                                             for p, m in zip(peer, flat, strict=True)):
                raise ProtocolError(f"the peer server sent a message of another layout in round {rnd}")
            rnd += 1
            running.deliver([t.to(self.device) for t in peer])
        report = Report(
            seconds=time.perf_counter() - t0,
            bytes=self.channel.stats.bytes - b0,
            rounds=self.channel.stats.rounds - r0,
            steps=figures,
        )
        return shares_of(flow.values[plan.output]).cpu(), report


def _widened(plans: dict[int, Plan], batch: int) -> Plan:
    """plans[batch], widened from plans[1] the first time it is asked for."""
    if batch not in plans:
        plans[batch] = plans[1].batched(batch)
    return plans[batch]


class Rands(list[Any]):
    """One party's prepared randomness, per plan step, for an inference of `batch` inputs."""

    def __init__(self, batch: int = 1) -> None:
        super().__init__()
        self.batch = batch


class _Dataflow:
    """Which steps can run: a step is ready once every input exists; a value is freed once its last
    consumer finished (the output is kept)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.values: dict[int, Any] = {}  # share tensors, a truncation's `Truncated`, or a ReLU's `AffineForm`
        self._users = [0] * len(plan.steps)
        self._waiting = {s.index: len(set(s.inputs)) for s in plan.steps}
        self._consumers: dict[int, list[int]] = {}
        for s in plan.steps:
            for i in s.inputs:
                self._users[i] += 1
            for i in set(s.inputs):
                self._consumers.setdefault(i, []).append(s.index)
        self.ready = [s.index for s in plan.steps if not s.inputs]

    def next_ready(self) -> int:
        """The lowest-numbered ready step (both parties start steps in the same order)."""
        self.ready.sort()
        return self.ready.pop(0)

    def finish(self, idx: int, value: Any) -> None:
        self.values[idx] = value
        for c in self._consumers.get(idx, []):
            self._waiting[c] -= 1
            if self._waiting[c] == 0:
                self.ready.append(c)
        for i in self.plan.steps[idx].inputs:  # free inputs nobody needs any more
            self._users[i] -= 1
            if self._users[i] == 0 and i != self.plan.output:
                self.values.pop(i, None)


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


def _check_cmp_bits(plan: Plan, cmp_bits: int) -> None:
    """Comparisons wider than the plan was lowered for would overflow its fused truncations (and the
    maxima that reuse a truncation's opening): refuse them."""
    if cmp_bits > plan.cmp_bits:
        raise ValueError(f"comparisons of {cmp_bits} bits on a plan lowered for {plan.cmp_bits}")


class Dealer:
    """The trusted dealer for one plan: fixed weight masks at provisioning, one bundle per inference.

    It never sees an input, a weight or an output: only the plan and the seeds it draws."""

    def __init__(self, plan: Plan, split: str, provision_seeds: tuple[bytes, bytes] | None = None,
                 cmp_bits: int = 40) -> None:
        _check_cmp_bits(plan, cmp_bits)
        self.plan = plan
        self.split = split  # the split of the model's weights this dealer's masks belong to
        self.ctx = Ctx(0, plan.frac, cmp_bits)
        self._prov_seeds = provision_seeds or (new_seed(), new_seed())
        self._w: Weights | None = None
        self._used: set[str] = set()
        self._plans = {1: plan}

    @property
    def provision_seeds(self) -> tuple[bytes, bytes]:
        return self._prov_seeds

    def provision(self) -> tuple[Provision, Provision]:
        return Provision(0, self._prov_seeds[0], self.split), Provision(1, self._prov_seeds[1], self.split)

    def _weights(self) -> Weights:
        if self._w is None:
            masks = fc_layout(self.plan, {
                k: Source.dealer(self._prov_seeds, mask_purpose(self.split, k)).ring("B", self.plan.weights[k])
                for k in self.plan.masked_keys()
            })
            self._w = Weights(masks, {}, {}, {})  # with limbs (CUDA), B is split on first use and kept
        return self._w

    def bundle(self, bundle_id: str, batch: int = 1) -> tuple[Bundle, Bundle]:
        """Fresh correlated randomness for one inference of `batch` inputs; an id is dealt once."""
        if bundle_id in self._used:
            raise RandomnessError(f"bundle id {bundle_id} was already dealt")
        plan = _widened(self._plans, batch)
        self._used.add(bundle_id)
        seeds = (new_seed(), new_seed())
        w = self._weights()
        corrections: dict[int, list[torch.Tensor]] = {}
        dealt: dict[int, Any] = {}
        kept = kept_until(plan)
        last: dict[int, list[int]] = {}
        for t, user in kept.items():
            last.setdefault(user, []).append(t)
        for step in plan.steps:
            src = Source.dealer(seeds, f"bundle/{step.index}")
            R = STEP_KINDS[step.op].deal(src, step, plan, self.ctx, w, dealt)
            if step.index in kept:
                dealt[step.index] = kept_randomness(step, R)
            for t in last.get(step.index, ()):  # full values of a whole plan would not fit a batch
                del dealt[t]
            if src.corrections:
                corrections[step.index] = src.corrections
        return Bundle(bundle_id, 0, seeds[0], batch=batch), Bundle(bundle_id, 1, seeds[1], corrections, batch)
