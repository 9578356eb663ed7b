"""A plan evaluated in plaintext float64: what the secure steps compute, with the real functions.

Used by the model owner only (the weights are in the clear here): at export, to check that the plan
computes what the module computes and to measure, on calibration images, the largest magnitude every
comparison sees (`run_plain(..., probe=...)`); and as the plaintext reference of a deployable file
that holds a plan and its weights instead of a module (`PlanModule`).

Scales are not simulated: a step's real multiplier is its integer `mult` times 2^(in_scale -
out_scale), exactly what the fixed-point value means. Activations use the real functions
(torch.sigmoid, tanh, silu, gelu, hardswish), not their piecewise fits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from secdfd.common.engine.plan import (
    AddAttrs,
    AddConstAttrs,
    CatAttrs,
    LinearAttrs,
    MeanAttrs,
    PermuteAttrs,
    PiecewiseAttrs,
    Plan,
    ReduceAttrs,
    RepeatAttrs,
    ScaleAttrs,
    SplineAttrs,
    Step,
    SumPoolAttrs,
    WindowAttrs,
)
from secdfd.common.engine.protocols import piecewise, spline
from secdfd.common.engine.steps import index, pool_multipliers, window_sums

Tensors = list[torch.Tensor]
Weights = Mapping[str, torch.Tensor]


def _factor(plan: Plan, step: Step, mult: int) -> float:
    """The real multiplier of an integer `mult` that moves a value from its input's scale to the step's."""
    return mult * 2.0 ** (plan.steps[step.inputs[0]].scale - step.scale)


def _linear(plan: Plan, s: Step, ins: Tensors, w: Weights) -> torch.Tensor:
    a = s.get(LinearAttrs)
    b = w[a.bias_key] if a.bias else None
    if a.kind == "fc":
        return F.linear(ins[0], w[a.weight], b)
    return F.conv2d(ins[0], w[a.weight], b, a.stride, a.padding, a.dilation, a.groups)


def _add(plan: Plan, s: Step, ins: Tensors, w: Weights) -> torch.Tensor:
    out = sum(sign * x for sign, x in zip(s.get(AddAttrs).signs, ins, strict=True))
    assert isinstance(out, torch.Tensor)
    return torch.broadcast_to(out, s.shape)


def _mean(plan: Plan, s: Step, ins: Tensors, w: Weights) -> torch.Tensor:
    a = s.get(MeanAttrs)
    return (ins[0].sum(dim=a.dims) * _factor(plan, s, a.mult)).reshape(s.shape)


def _sumpool(plan: Plan, s: Step, ins: Tensors, w: Weights) -> torch.Tensor:
    a = s.get(SumPoolAttrs)
    mult = pool_multipliers(a, tuple(ins[0].shape))
    return window_sums(ins[0], a) * _factor(plan, s, 1) * (mult.double() if isinstance(mult, torch.Tensor) else mult)


def _maxpool(plan: Plan, s: Step, ins: Tensors, w: Weights) -> torch.Tensor:
    a = s.get(WindowAttrs)
    return F.max_pool2d(ins[0], a.k, a.s, a.p)


PLAIN: dict[str, Callable[[Plan, Step, Tensors, Weights], torch.Tensor]] = {
    "output": lambda plan, s, ins, w: ins[0],
    "reshape": lambda plan, s, ins, w: ins[0].reshape(s.shape),
    "index": lambda plan, s, ins, w: index(ins[0], s),
    "permute": lambda plan, s, ins, w: ins[0].permute(s.get(PermuteAttrs).dims),
    "expand": lambda plan, s, ins, w: torch.broadcast_to(ins[0], s.shape),
    "repeat": lambda plan, s, ins, w: ins[0].repeat(s.get(RepeatAttrs).reps),
    "linear": _linear,
    "trunc": lambda plan, s, ins, w: ins[0],
    "relu": lambda plan, s, ins, w: torch.relu(ins[0]),
    "sigmoid": lambda plan, s, ins, w: torch.sigmoid(ins[0]),
    "spline": lambda plan, s, ins, w: spline.FUNCTIONS[s.get(SplineAttrs).fn](ins[0]),
    "piecewise": lambda plan, s, ins, w: piecewise.reference(s.get(PiecewiseAttrs).pieces(), ins[0]),
    "maxpool": _maxpool,
    "maxreduce": lambda plan, s, ins, w: ins[0].amax(dim=s.get(ReduceAttrs).dims).reshape(s.shape),
    "add": _add,
    "add_const": lambda plan, s, ins, w: s.get(AddConstAttrs).sign * ins[0] + s.get(AddConstAttrs).value,
    "scale": lambda plan, s, ins, w: ins[0] * _factor(plan, s, s.get(ScaleAttrs).mult),
    "cat": lambda plan, s, ins, w: torch.cat(ins, s.get(CatAttrs).dim),
    "mean": _mean,
    "sumpool": _sumpool,
    "mul": lambda plan, s, ins, w: ins[0] * ins[1],
}


def compared_magnitude(step: Step, x: torch.Tensor) -> float:
    """The largest |value| a comparison of `step` sees on input x, in real terms: x itself (ReLU),
    x - t for its breakpoints t (sigmoid, splines, pieces), differences within windows (maxima; the
    input's range bounds them). 0 for steps that compare nothing."""
    if x.numel() == 0 or step.op not in COMPARING:
        return 0.0
    if step.op in ("maxpool", "maxreduce"):
        return float(x.max() - x.min())
    breaks: tuple[float, ...] = (0.0,)
    if step.op == "sigmoid":
        breaks = (10.0,)
    elif step.op == "spline":
        breaks = spline.get(step.get(SplineAttrs).fn).breaks
    elif step.op == "piecewise":
        breaks = step.get(PiecewiseAttrs).breaks
    return float(x.abs().max()) + max(abs(t) for t in breaks)


COMPARING = ("relu", "sigmoid", "spline", "piecewise", "maxpool", "maxreduce")


def run_plain(plan: Plan, weights: Weights, x: torch.Tensor, probe: dict[int, float] | None = None) -> torch.Tensor:
    """The plan's output on x in float64; `probe` (step index -> max) collects compared magnitudes."""
    values: dict[int, torch.Tensor] = {0: x.to(torch.float64).reshape(plan.input_shape)}
    w = {k: v.to(torch.float64) for k, v in weights.items()}
    last_use = {i: s.index for s in plan.steps for i in s.inputs}
    for s in plan.steps[1:]:
        ins = [values[i] for i in s.inputs]
        if probe is not None and s.op in COMPARING:
            probe[s.index] = max(probe.get(s.index, 0.0), compared_magnitude(s, ins[0]))
        values[s.index] = PLAIN[s.op](plan, s, ins, w)
        for i in set(s.inputs):
            if last_use[i] == s.index and i != plan.output:
                values.pop(i)
    return values[plan.output]


class PlanModule(nn.Module):
    """A plan and its weights as a plaintext torch module (float64 inside, float32 out)."""

    def __init__(self, plan: Plan, weights: Weights) -> None:
        super().__init__()
        self.plan = plan
        self.plan_weights = {k: v.detach().to(torch.float64) for k, v in weights.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_plain(self.plan, self.plan_weights, x).float()
