"""Secure vs plaintext on a few proxy images through the three processes (the embedded model at 64 px).

The servers run with --limbs: the float64 limb ring products that CUDA uses, here on CPU."""

from __future__ import annotations

import pytest

from secdfd.common.bench.e2e import at_size
from secdfd.common.bench.fidelity import check_fidelity, proxy_images
from secdfd.common.ml.export import load_deployable, read_deployable_meta
from secdfd.common.ml.synth import SynthConfig, synthesize
from secdfd.common.service.local import Options

pytestmark = pytest.mark.processes

SIZE = 64


def test_secure_matches_plaintext_on_proxy_images(tmp_path):
    synthesize(tmp_path / "proxy", SynthConfig(count=6, seed=11, size=SIZE))
    images = proxy_images(tmp_path / "proxy", "all", 6, SIZE)
    assert len(images) == 6 and {("fake" in n) for n, _ in images} == {True, False}
    model = at_size(load_deployable(), read_deployable_meta().arch, SIZE)
    res = check_fidelity(model, "dfdnet-s", images, options=Options(limbs=True))
    assert res["images"] == 6 and res["passed"]
    assert res["max_abs_error"] <= 1e-3 and res["verdicts_agree"] == 6
    assert all(0.0 <= r["p_secure"] <= 1.0 for r in res["rows"])
