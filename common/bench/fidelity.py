"""`secdfd bench fidelity`: secure and plaintext fused fake probabilities on the same images.

The images go through the product path (client -> server_a, server_b as processes, dealer
bundles); the plaintext reference is the same fused, folded module in torch. The bar: every
|p_secure - p_plain| <= 1e-3 and every verdict (p >= 0.5: fake) the same.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import click
import torch

from secdfd.common.bench.e2e import at_size, plaintext, scratch_deployment
from secdfd.common.cli.bench import bench
from secdfd.common.errors import SecDFDError
from secdfd.common.ml.dfdnet import FusedDFDNet
from secdfd.common.service import local

MAX_ABS_ERROR = 1e-3
THRESHOLD = 0.5


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
                         "agree": (r["p_fake"] >= THRESHOLD) == (p_plain >= THRESHOLD),
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


@bench.command("fidelity")
@click.option("--data", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Folder with real/ and fake/ (e.g. the proxy set from `secdfd data synth`).")
@click.option("--split", type=click.Choice(["train", "val", "all"]), default="val", show_default=True)
@click.option("--images", type=int, default=50, show_default=True, help="Images to compare (classes alternate).")
@click.option("--model", "model_path", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Deployable model [default: the embedded model].")
@click.option("--size", type=int, default=None, help="Input size [default: the model's].")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with every image's figures).")
def fidelity_cmd(data: Path, split: str, images: int, model_path: Path | None, size: int | None,
                 as_json: bool) -> None:
    """Secure vs plaintext fused fake probability per image, through dealer and servers as processes.

    Exit status 1 unless every |p_secure - p_plain| <= 1e-3 and every verdict agrees.
    """
    from secdfd.common.ml.export import load_deployable, read_deployable_meta

    if images < 1:
        raise click.BadParameter("compare at least one image", param_hint="--images")
    torch.set_num_threads(1)
    try:
        meta = read_deployable_meta(model_path)
        model = at_size(load_deployable(model_path), meta.arch, size or meta.size)
        res = check_fidelity(model, meta.arch, proxy_images(data, split, images, size or meta.size))
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(res, indent=2))
    else:
        click.echo(f"{res['images']} images ({split} split of {data}), {res['model']} at {res['size']}: "
                   f"max |p_secure - p_plain| {res['max_abs_error']:.2e}, mean {res['mean_abs_error']:.2e}, "
                   f"verdicts agree {res['verdicts_agree']}/{res['images']}, median online "
                   f"{res['online_seconds']:.2f} s: {'PASS' if res['passed'] else 'FAIL'}")
    if not res["passed"]:
        raise SystemExit(1)
