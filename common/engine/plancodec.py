"""The plan as JSON: everything a dealer or server learns of the model is this text, and it is checked
field by field before anything runs (`Plan.from_json` calls `decode_plan`).

Checks: the top level and every step have exactly their fields; ops are OP_ATTRS names; attribute
values have their declared types (integers are integers, numbers finite, names printable and short);
shapes have at most MAX_DIMS dims and MAX_ELEMENTS elements; inputs come before their step; each
step's shape and scale follow from its inputs (`_CHECKS`); every weight is used by a linear step of
its shape. A plan `build_plan` makes passes; anything else raises PlanError.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import torch

from secdfd.common.engine.plan import (
    CHAIN_BITS,
    MEAN_BITS,
    OP_ATTRS,
    AddAttrs,
    AddConstAttrs,
    CatAttrs,
    IndexAttrs,
    LinearAttrs,
    PermuteAttrs,
    PiecewiseAttrs,
    Plan,
    RepeatAttrs,
    ShiftAttrs,
    SplineAttrs,
    Step,
    chain_fuses,
)
from secdfd.common.engine.protocols import spline
from secdfd.common.errors import PlanError

# --- the plan as JSON ----------------------------------------------------------------------------
# Everything a dealer or server learns of the model is this text; it is checked field by field.

PLAN_FORMAT = "secdfd-plan"
PLAN_VERSION = 1
MAX_STEPS = 200_000
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 28  # per step: 2 GiB of ring elements
MAX_LIST = 4096  # attribute lists (cat inputs, breakpoints)
MAX_NAME = 256
MAX_JSON = 256 << 20


def _bad(where: str, what: str) -> PlanError:
    return PlanError(f"malformed plan: {where}: {what}")


def _int(v: Any, where: str, lo: int = -(1 << 62), hi: int = 1 << 62) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"expected an integer in [{lo}, {hi}], got {v!r:.40}")
    return v


def _ints(v: Any, where: str, lo: int = -(1 << 62), hi: int = 1 << 62, most: int = MAX_LIST) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > most:
        raise _bad(where, f"expected a list of at most {most} integers")
    return tuple(_int(x, where, lo, hi) for x in v)


def _float(v: Any, where: str) -> float:
    if type(v) not in (int, float) or not math.isfinite(v) or abs(v) > 2.0**40:
        raise _bad(where, f"expected a finite number, got {v!r:.40}")
    return float(v)


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not 0 < len(v) <= MAX_NAME or not v.isprintable():
        raise _bad(where, f"expected a printable name of at most {MAX_NAME} characters")
    return v


_FIELD_READERS: dict[str, Callable[[Any, str], Any]] = {
    "int": _int,
    "bool": lambda v, w: v if type(v) is bool else (_ for _ in ()).throw(_bad(w, "expected true or false")),
    "float": _float,
    "str": _text,
    "str | None": lambda v, w: None if v is None else _text(v, w),
    "tuple[int, ...]": _ints,
    "tuple[float, ...]": lambda v, w: tuple(_float(x, w) for x in v) if isinstance(v, list) and len(v) <= MAX_LIST
    else (_ for _ in ()).throw(_bad(w, "expected a list of numbers")),
}


def _shape_of(v: Any, where: str) -> tuple[int, ...]:
    shape = _ints(v, where, 1, 1 << 24, MAX_DIMS)
    if math.prod(shape) > MAX_ELEMENTS:
        raise _bad(where, f"{math.prod(shape)} elements is more than {MAX_ELEMENTS}")
    return shape


def _keys(obj: Any, want: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != want:
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _bad(where, f"expected the fields {sorted(want)}, got {got}")
    return obj


def decode_plan(data: str | bytes | dict[str, Any]) -> Plan:
    if isinstance(data, str | bytes):
        if len(data) > MAX_JSON:
            raise _bad("plan", f"more than {MAX_JSON} bytes")
        try:
            data = json.loads(data, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        except ValueError as e:
            raise _bad("plan", f"not JSON ({e})") from None
    top = _keys(data, {"format", "version", "frac", "cmp_bits", "input_shape", "output", "weights", "steps"}, "plan")
    if top["format"] != PLAN_FORMAT or top["version"] != PLAN_VERSION:
        raise _bad("plan", f"not a {PLAN_FORMAT} of version {PLAN_VERSION}")
    frac = _int(top["frac"], "frac", 1, 30)
    cmp_bits = _int(top["cmp_bits"], "cmp_bits", 8, 62 - frac)
    input_shape = _shape_of(top["input_shape"], "input_shape")
    raw_weights = top["weights"]
    if not isinstance(raw_weights, list) or len(raw_weights) > MAX_STEPS:
        raise _bad("weights", "expected a list of [key, shape] pairs")
    weights: dict[str, tuple[int, ...]] = {}
    for i, pair in enumerate(raw_weights):
        if not isinstance(pair, list) or len(pair) != 2:
            raise _bad(f"weights[{i}]", "expected [key, shape]")
        key = _text(pair[0], f"weights[{i}]")
        if key in weights:
            raise _bad(f"weights[{i}]", f"{key} appears twice")
        weights[key] = _shape_of(pair[1], f"weights[{i}]")
    raw_steps = top["steps"]
    if not isinstance(raw_steps, list) or not 2 <= len(raw_steps) <= MAX_STEPS:
        raise _bad("steps", f"expected 2 to {MAX_STEPS} steps")
    steps: list[Step] = []
    for i, raw in enumerate(raw_steps):
        steps.append(_decode_step(i, raw, steps))
    output = _int(top["output"], "output", 0, len(steps) - 1)
    plan = Plan(tuple(steps), input_shape, output, frac, weights, cmp_bits)
    _check_plan(plan)
    return plan


def _decode_step(i: int, raw: Any, earlier: list[Step]) -> Step:
    where = f"steps[{i}]"
    s = _keys(raw, {"op", "inputs", "shape", "scale", "name", "attrs"}, where)
    op = s["op"]
    if op not in OP_ATTRS:
        raise _bad(where, f"unknown op {op!r:.40}")
    inputs = _ints(s["inputs"], where + ".inputs", 0, i - 1)
    shape = _ints(s["shape"], where + ".shape", 1, 1 << 24, MAX_DIMS)
    if math.prod(shape) > MAX_ELEMENTS:
        raise _bad(where, f"{math.prod(shape)} elements is more than {MAX_ELEMENTS}")
    cls = OP_ATTRS[op]
    attrs_raw = _keys(s["attrs"], {f.name for f in fields(cls)}, where + ".attrs")
    values = {}
    for f in fields(cls):
        reader = _FIELD_READERS[str(f.type)]
        values[f.name] = reader(attrs_raw[f.name], f"{where}.attrs.{f.name}")
    return Step(i, op, inputs, shape, _int(s["scale"], where + ".scale", 0, 62), _text(s["name"], where + ".name"),
                cls(**values))


_ARITY: dict[str, tuple[int, int]] = {"input": (0, 0), "mul": (2, 2), "add": (1, MAX_LIST), "cat": (1, MAX_LIST)}


def _check_plan(plan: Plan) -> None:
    """What each step's shape and scale must be given its inputs (a plan `build_plan` makes passes)."""
    steps = plan.steps
    if steps[0].op != "input" or steps[0].shape != plan.input_shape or steps[0].scale != plan.frac:
        raise _bad("steps[0]", "the first step is the input, of the plan's input shape, at scale frac")
    if [s.index for s in steps if s.op in ("input", "output")] != [0, plan.output]:
        raise _bad("steps", "one input step (the first) and one output step (the plan's output)")
    _check_remasks(steps)
    used: set[str] = set()
    for s in steps:
        lo, hi = _ARITY.get(s.op, (1, 1))
        if not lo <= len(s.inputs) <= hi:
            raise _bad(f"steps[{s.index}]", f"{s.op} takes {lo} to {hi} inputs, not {len(s.inputs)}")
        ins = [steps[i] for i in s.inputs]
        try:
            _CHECKS.get(s.op, _check_same)(plan, s, ins)
        except (PlanError, ValueError, IndexError, RuntimeError, ZeroDivisionError) as e:
            raise _bad(f"steps[{s.index}] ({s.op} {s.name})", str(e)) from None
        if s.op == "linear":
            a = s.get(LinearAttrs)
            used.update([a.weight, a.bias_key] if a.bias else [a.weight])
    if used != set(plan.weights):
        raise _bad("weights", "every weight is used by a linear step, and only those")
    try:
        plan.weight_fracs()
    except PlanError as e:
        raise _bad("weights", str(e)) from None
    if steps[plan.output].scale != plan.frac:
        raise _bad("output", "the output is at scale frac")


def _check_remasks(steps: tuple[Step, ...]) -> None:
    """A remask (a truncation by 0) exists for a product to reuse (`arith.kept_mul`): nothing else takes it."""
    for s in steps:
        if s.op != "mul" and any(steps[i].op == "trunc" and steps[i].get(ShiftAttrs).shift == 0 for i in s.inputs):
            raise _bad(f"steps[{s.index}] ({s.op} {s.name})", "a truncation by 0 feeds products only")


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise PlanError(what)


def _check_same(plan: Plan, s: Step, ins: list[Step]) -> None:
    """output, reshape-free ops: same shape as the input (reshape checks the element count)."""
    if s.op in ("output",):
        _need(s.shape == ins[0].shape and s.scale == ins[0].scale, "the output is its input")


def _check_shift(plan: Plan, s: Step, ins: list[Step]) -> None:
    shift = s.get(ShiftAttrs).shift if s.op != "spline" and s.op != "piecewise" else s.attrs.shift  # type: ignore[union-attr]
    limit = 62 if s.op == "trunc" else 64 - plan.cmp_bits - 1
    _need(0 <= shift <= limit, f"shift {shift} outside [0, {limit}]")
    _need(s.shape == ins[0].shape, "the shape of its input")
    _need(ins[0].scale == plan.frac + shift if s.op != "trunc" else ins[0].scale == s.scale + shift,
          "the input's scale is f + shift")
    if s.op in ("relu", "sigmoid", "spline"):
        _need(s.scale == plan.frac, "the output is at scale frac")
    if s.op == "spline":
        _need(s.get(SplineAttrs).fn in spline.SPLINES, f"unknown spline {s.get(SplineAttrs).fn!r:.40}")
    if s.op == "piecewise":
        p = s.get(PiecewiseAttrs).pieces()
        _need(s.scale == plan.frac + p.slope_bits, "the output carries f + slope bits")
        _need(all(abs(v) < 2.0 ** (plan.cmp_bits - plan.frac) for v in (*p.breaks, *p.offsets)),
              "breakpoints and offsets inside the comparison range")


def _check_linear(plan: Plan, s: Step, ins: list[Step]) -> None:
    a = s.get(LinearAttrs)
    x = ins[0].shape
    _need(a.kind in ("conv", "fc") and plan.weights.get(a.weight) == a.wshape, "weights of the plan's shape")
    _need(not a.bias or plan.weights.get(a.bias_key) == (a.wshape[0],), "a bias per output channel")
    f = plan.frac
    _need(ins[0].scale == f and s.scale == 2 * f
          or ins[0].scale == 2 * f and s.scale == 3 * f - CHAIN_BITS and chain_fuses(f, plan.cmp_bits),
          f"input at f and output at 2f, or (where the output's truncation fuses into a comparison) input at 2f "
          f"and output at 3f - {CHAIN_BITS}")
    if a.kind == "fc":
        _need(len(a.wshape) == 2 and x[-1] == a.wshape[1] and s.shape == x[:-1] + (a.wshape[0],), "fc shapes")
        return
    _need(len(x) == 4 and len(a.wshape) == 4 and len(s.shape) == 4, "conv on (N, C, H, W)")
    _need(a.groups >= 1 and x[1] == a.wshape[1] * a.groups and a.wshape[0] % a.groups == 0, "conv channels")
    _need(1 <= a.stride <= 64 and 0 <= a.padding <= 64 and 1 <= a.dilation <= 64, "conv stride, padding, dilation")
    span = [(x[d] + 2 * a.padding - a.dilation * (a.wshape[d] - 1) - 1) // a.stride + 1 for d in (2, 3)]
    _need(s.shape == (x[0], a.wshape[0], *span), "conv output shape")


def _window_out(size: int, k: int, st: int, p: int) -> int:
    return (size + 2 * p - k) // st + 1


def _check_window(plan: Plan, s: Step, ins: list[Step]) -> None:
    k, st, p = (s.attrs.k, s.attrs.s, s.attrs.p)  # type: ignore[union-attr]
    x = ins[0].shape
    _need(1 <= k <= 64 and 1 <= st <= 64 and 0 <= p <= k // 2, "window, stride and padding")
    _need(len(x) == 4 and s.shape == (x[0], x[1], _window_out(x[2], k, st, p), _window_out(x[3], k, st, p)),
          "pool output shape")
    if s.op == "maxpool":
        _need(ins[0].scale == plan.frac == s.scale, "at scale frac")
    else:
        _need(s.scale == ins[0].scale + MEAN_BITS and ins[0].scale == plan.frac, "window sums lift by MEAN_BITS")


def _check_reduce(plan: Plan, s: Step, ins: list[Step]) -> None:
    dims = s.attrs.dims  # type: ignore[union-attr]
    x = ins[0].shape
    _need(len(set(dims)) == len(dims) and all(0 <= d < len(x) for d in dims), "dims of the input")
    _need(math.prod(s.shape) * math.prod(x[d] for d in dims) == math.prod(x), "reduced element count")
    if s.op == "maxreduce":
        _need(ins[0].scale == plan.frac == s.scale, "at scale frac")
    else:
        _need(s.scale in (ins[0].scale, ins[0].scale + MEAN_BITS), "a sum or a mean")


def _broadcasts(small: tuple[int, ...], big: tuple[int, ...]) -> bool:
    if len(small) > len(big):
        return False
    return all(a in (1, b) for a, b in zip(small, big[len(big) - len(small):], strict=True))


def _check_add(plan: Plan, s: Step, ins: list[Step]) -> None:
    a = s.get(AddAttrs)
    _need(len(a.lift) == len(a.signs) == len(ins) and all(g in (1, -1) for g in a.signs), "a lift and sign per input")
    _need(all(i.scale + lift == s.scale and lift >= 0 for i, lift in zip(ins, a.lift, strict=True)), "lifts")
    _need(all(_broadcasts(i.shape, s.shape) for i in ins), "inputs broadcast to the output")


def _check_cat(plan: Plan, s: Step, ins: list[Step]) -> None:
    a = s.get(CatAttrs)
    _need(len(a.lift) == len(ins) and 0 <= a.dim < len(s.shape), "a lift per input and a dim")
    _need(all(i.scale + lift == s.scale and lift >= 0 for i, lift in zip(ins, a.lift, strict=True)), "lifts")
    _need(all(len(i.shape) == len(s.shape) and all(i.shape[d] == s.shape[d] for d in range(len(s.shape))
                                                   if d != a.dim) for i in ins), "shapes off the dim")
    _need(sum(i.shape[a.dim] for i in ins) == s.shape[a.dim], "sizes along the dim")


def _check_mul(plan: Plan, s: Step, ins: list[Step]) -> None:
    _need(all(i.scale == plan.frac for i in ins) and s.scale == 2 * plan.frac, "inputs at f, product at 2f")
    shape = torch.broadcast_shapes(ins[0].shape, ins[1].shape)  # type: ignore[no-untyped-call]
    _need(tuple(shape) == s.shape, "broadcast shape")


def _check_local(plan: Plan, s: Step, ins: list[Step]) -> None:
    """reshape, index, permute, expand, repeat, add_const, scale: shapes and scales of local steps."""
    x = ins[0].shape
    if s.op == "reshape":
        _need(math.prod(x) == math.prod(s.shape), "the same number of elements")
    elif s.op == "index":
        a = s.get(IndexAttrs)
        _need(len(a.starts) == len(a.stops) == len(a.steps) == len(x), "a slice per input dim")
        _need(all(0 <= b < e <= n and c >= 1 for b, e, c, n in zip(a.starts, a.stops, a.steps, x, strict=True)),
              "slices inside the input")
        count = math.prod(len(range(b, e, c)) for b, e, c in zip(a.starts, a.stops, a.steps, strict=True))
        _need(count == math.prod(s.shape), "the slice's element count")
    elif s.op == "permute":
        d = s.get(PermuteAttrs).dims
        _need(sorted(d) == list(range(len(x))) and s.shape == tuple(x[i] for i in d), "a permutation of the dims")
    elif s.op == "expand":
        _need(_broadcasts(x, s.shape), "the input broadcasts to the output")
    elif s.op == "repeat":
        r = s.get(RepeatAttrs).reps
        _need(len(r) >= len(x) and all(v >= 1 for v in r), "a repeat count per dim")
        padded = (1,) * (len(r) - len(x)) + x
        _need(s.shape == tuple(a * b for a, b in zip(padded, r, strict=True)), "the repeated shape")
    elif s.op == "add_const":
        _need(s.get(AddConstAttrs).sign in (1, -1) and s.shape == x, "a sign and the input's shape")
    elif s.op == "scale":
        _need(_broadcasts(x, s.shape) and s.scale in (ins[0].scale, ins[0].scale + plan.frac), "scale")
        return
    _need(s.scale == ins[0].scale or s.op == "add_const" and s.scale == ins[0].scale, "the input's scale")


_CHECKS: dict[str, Callable[[Plan, Step, list[Step]], None]] = {
    "linear": _check_linear, "trunc": _check_shift, "relu": _check_shift, "sigmoid": _check_shift,
    "spline": _check_shift, "piecewise": _check_shift, "maxpool": _check_window, "sumpool": _check_window,
    "maxreduce": _check_reduce, "mean": _check_reduce, "add": _check_add, "cat": _check_cat, "mul": _check_mul,
    "reshape": _check_local, "index": _check_local, "permute": _check_local, "expand": _check_local,
    "repeat": _check_local, "add_const": _check_local, "scale": _check_local,
}
