"""`secdfd bench fidelity`: secure and plaintext fused fake probabilities on the same images.

The images go through the product path (client -> server_a, server_b as processes, dealer
bundles); the plaintext reference is the same fused, folded module in torch. The bar: every
|p_secure - p_plain| <= 1e-3 and every verdict (p >= 0.5: fake) the same.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from secdfd.common import roster
from secdfd.common.bench.e2e import plaintext, scratch_deployment
from secdfd.common.ml.dfdnet import FusedDFDNet
from secdfd.common.service import local

MAX_ABS_ERROR = 1e-3


def proxy_images(data: Path, split: str, count: int, size: int) -> list[tuple[str, torch.Tensor]]:
    """`count` images of a split of a real/ + fake/ folder, alternating classes, as (name, (1,3,s,s))."""
    from secdfd.common.ml.data import load_folder

    found = load_folder(data, size, split)
    by_class = [[i for i in range(len(found)) if int(found.labels[i]) == c] for c in (0, 1)]
    order = [i for pair in zip(*by_class, strict=False) for i in pair]
    order += [i for i in range(len(found)) if i not in set(order)]
    return [(str(found.paths[i]), found.images[i : i + 1].float() / 255.0) for i in order[:count]]


def check_fidelity(model: FusedDFDNet, arch: str, images: list[tuple[str, torch.Tensor]],
                   options: local.Options | None = None, work: Path | None = None) -> dict[str, Any]:
    """Detect every image through a scratch deployment of `model`; compare with plaintext."""
    rows = []
    with scratch_deployment(model, arch, work, options=options) as dep:
        for name, x in images:
            r = dep.client.detect_tensor(x, name)
            p_plain, _ = plaintext(model, x)
            rows.append({"file": name, "p_secure": r["p_fake"], "p_plain": p_plain,
                         "abs_error": abs(r["p_fake"] - p_plain),
                         "agree": roster.verdict(r["p_fake"]) == roster.verdict(p_plain),
                         "online_seconds": r["online_seconds"]})
    errors = [r["abs_error"] for r in rows]
    return {
        "model": arch, "size": model.rgb.input_size, "images": len(rows),
        "max_abs_error": max(errors), "mean_abs_error": statistics.fmean(errors),
        "verdicts_agree": sum(r["agree"] for r in rows),
        "passed": max(errors) <= MAX_ABS_ERROR and all(r["agree"] for r in rows),
        "online_seconds": statistics.median(r["online_seconds"] for r in rows),
        "rows": rows,
    }
