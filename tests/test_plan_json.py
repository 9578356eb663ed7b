"""The plan as JSON: what dealer and servers read instead of the model owner's Python. It round-trips
exactly and anything malformed is refused before it runs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from secdfd.common.engine.plan import Plan, build_plan
from secdfd.common.errors import PlanError
from secdfd.common.service import deployment


@pytest.fixture(scope="module")
def plan() -> Plan:
    info = deployment.ModelInfo("dfdnet-s", 32)
    return deployment.plan_for(info, deployment.architecture(info))  # as `secdfd share` lowers it


def test_round_trip_is_exact(plan):
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan and again.to_json() == text
    assert Plan.from_json(json.loads(text)) == plan and again.cmp_bits == 32


def _step(obj, op):
    return next(s for s in obj["steps"] if s["op"] == op)


def _edits():
    def unknown_op(o):
        _step(o, "relu")["op"] = "exec"

    def extra_field(o):
        _step(o, "relu")["attrs"]["code"] = "import os"

    def missing_field(o):
        del _step(o, "maxpool")["attrs"]["k"]

    def bool_for_int(o):
        _step(o, "relu")["attrs"]["shift"] = True

    def string_for_int(o):
        _step(o, "relu")["scale"] = "16"

    def forward_input(o):
        o["steps"][3]["inputs"] = [len(o["steps"]) - 1]

    def huge_shape(o):
        _step(o, "relu")["shape"] = [1, 1 << 20, 1 << 20]

    def inconsistent_shape(o):
        s = _step(o, "relu")
        s["shape"] = [*s["shape"][:-1], s["shape"][-1] + 1]

    def wrong_weight_shape(o):
        o["weights"][0][1] = [1, 2, 3, 4]

    def unused_weight(o):
        o["weights"].append(["nobody.weight", [3]])

    def big_shift(o):
        _step(o, "relu")["attrs"]["shift"] = 40

    def not_a_permutation(o):
        o["steps"].insert(1, {"op": "permute", "inputs": [0], "shape": o["input_shape"], "scale": 16, "name": "p",
                              "attrs": {"dims": [0, 0, 2, 3]}})

    def two_outputs(o):
        o["output"] = 1

    def version(o):
        o["version"] = 99

    def chained_beyond_the_fuse(o):  # at 40-bit comparisons a 3f - 2 output cannot fuse its truncation
        o["cmp_bits"] = 40

    def remask_into_a_relu(o):  # a truncation by 0 exists for products; a ReLU must not take it
        i = next(n for n, st in enumerate(o["steps"]) if st["op"] == "relu")
        at = o["steps"][i]["inputs"][0]
        src = o["steps"][at]
        o["steps"].insert(at + 1, {"op": "trunc", "inputs": [at], "shape": src["shape"], "scale": src["scale"],
                                   "name": "r", "attrs": {"shift": 0}})
        for st in o["steps"][at + 2:]:
            st["inputs"] = [j + 1 if j > at else j for j in st["inputs"]]
        o["steps"][i + 1]["inputs"] = [at + 1]
        o["output"] += 1

    def chained_scale(o):
        next(s for s in o["steps"] if s["op"] == "linear" and s["scale"] == 46)["scale"] = 47


    return [unknown_op, extra_field, missing_field, bool_for_int, string_for_int, forward_input, huge_shape,
            inconsistent_shape, wrong_weight_shape, unused_weight, big_shift, not_a_permutation, two_outputs,
            version, chained_beyond_the_fuse, chained_scale, remask_into_a_relu]


@pytest.mark.parametrize("edit", _edits(), ids=lambda f: f.__name__)
def test_malformed_plans_are_refused(plan, edit):
    obj = copy.deepcopy(plan.to_obj())
    edit(obj)
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_json(json.dumps(obj))


def test_a_remask_feeds_products_only(plan):
    """A truncation by 0 (a remask) is refused anywhere but as a product's input: it is what a plan
    that `build_plan` makes uses it for, and a consumer that reuses a truncation's opening by its
    shift has no use for a shift of 0."""
    obj = copy.deepcopy(plan.to_obj())
    assert any(st["op"] == "trunc" and st["attrs"]["shift"] == 0 for st in obj["steps"])  # dfdnet-s has some
    (edit,) = (e for e in _edits() if e.__name__ == "remask_into_a_relu")
    edit(obj)
    with pytest.raises(PlanError, match="a truncation by 0 feeds products only"):
        Plan.from_json(json.dumps(obj))


def test_not_json_and_non_finite_numbers_are_refused(plan):
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json("{")
    text = plan.to_json().replace('"frac":16', '"frac":NaN', 1)
    with pytest.raises(PlanError, match="not JSON"):
        Plan.from_json(text)


class _TwoPointwise(nn.Module):
    """A pointwise conv on a depthwise conv's product (chained, weights at f - 1) and one of the same
    shape on a ReLU's result (weights at f)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(self.dw(x)) + self.b(torch.relu(x))


def test_a_weight_at_two_scales_is_refused():
    plan = build_plan(_TwoPointwise(), (1, 4, 8, 8), cmp_bits=32)
    assert plan.weight_fracs() == {"dw.weight": 16, "dw.bias": 32, "a.weight": 14, "a.bias": 46,
                                   "b.weight": 16, "b.bias": 32}
    obj = copy.deepcopy(plan.to_obj())
    a = next(s for s in obj["steps"] if s["name"] == "a")
    a["attrs"]["weight"], a["attrs"]["bias_key"] = "b.weight", "b.bias"  # one key, two encodings
    obj["weights"] = [w for w in obj["weights"] if not w[0].startswith("a.")]
    with pytest.raises(PlanError, match=r"malformed plan.*b.weight is used at 14 and at 16 fractional bits"):
        Plan.from_json(json.dumps(obj))


def test_share_files_without_a_plan_keep_every_weight_at_f_bits(plan):
    # Files split before plans travelled hold every weight at f bits: the plan rebuilt for them has no
    # chained layer, while `secdfd share` lowers a new split with them: a pointwise conv after each
    # depthwise one, a block's skip conv on the previous block's output (a gated map plus a skip), and
    # each stream's second fc on its first.
    info = deployment.ModelInfo("dfdnet-s", 32)
    legacy = deployment.plan_for(info)
    assert set(legacy.weight_fracs()[k] for k in legacy.masked_keys()) == {16}
    chained = [k for k in plan.masked_keys() if plan.weight_fracs()[k] == 14]
    assert len(chained) == 74 and all(".pointwise." in k or ".skip." in k or k.endswith("fc2.weight")
                                      for k in chained)
    assert sum(".skip." in k for k in chained) == 4 and sum("fc2" in k for k in chained) == 2
    assert len(plan.steps) < len(legacy.steps)
