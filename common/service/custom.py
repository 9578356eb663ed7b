"""A user's own model, made deployable by its owner: `secdfd export --factory FILE.py:FACTORY`.

Only the model owner ever runs the user's Python (`load_factory` imports FILE.py here and nowhere
else). What leaves the owner is a deployable file of version 2: the plan (the secure steps as
checked JSON: public, it depends on the architecture and input size only), the output convention
and the weights per plan key with BatchNorm folded. `secdfd share` splits it, and the dealer and the
servers run the plan from the share files; they never see the user's file.

Export, step by step:
1. build the module with FACTORY(), load the state_dict (or a checkpoint holding one under
   "state_dict", "model" or "model_state_dict"; a "module." prefix from DataParallel is dropped);
2. wrap it so that it outputs the fake probability (`FakeProbability`): sigmoid of one logit, sigmoid
   of l_fake - l_real for two logits (a two-class softmax's fake probability), or the probability as
   it is;
3. lower the wrapper for (1, 3, size, size) inputs in [0, 1] (what the client sends);
4. calibrate: evaluate the plan in plaintext on calibration images, check it computes what the module
   computes, and measure the largest magnitude every comparison sees. Comparisons are exact for
   |x| < 2^(cmp_bits - frac) = 65,536 at 32 bits; a model that reaches that on a calibration image
   is refused, naming the layer and the measured maximum. The default calibration set (no
   --calibrate) is deterministic and ships with the package: 12 crops of procedural 1/f-noise
   "photographs" (the proxy data's fallback source), black, white, mid-grey, saturated red, green and
   blue, and a one-pixel checkerboard (the extremes of a [0, 1] input), plus examples/face.png when
   run from a source checkout. Give your own faces with --calibrate DIR for a tighter measurement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secdfd.common.engine.plaintext import PlanModule, run_plain
from secdfd.common.engine.plan import Plan, build_plan, extract_weights
from secdfd.common.errors import DataError, ModelError, PlanError

OUTPUTS = ("logit", "logits", "probability")
FRAC = 16
CMP_BITS = 32
PLAN_TOLERANCE = 1e-4  # |plan - module| on calibration images: more means the lowering is wrong
EXAMPLE_FACE = Path(__file__).resolve().parents[2] / "examples" / "face.png"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class FakeProbability(nn.Module):
    """The user's model with its output turned into the fake probability, shape (1, 1)."""

    def __init__(self, model: nn.Module, outputs: str, fake_index: int = 1) -> None:
        super().__init__()
        if outputs not in OUTPUTS:
            raise ModelError(f"unknown output convention {outputs!r}; one of {', '.join(OUTPUTS)}")
        if fake_index not in (0, 1):
            raise ModelError("--fake-index is 0 or 1 (which of the two logits is 'fake')")
        self.model = model
        self.outputs = outputs
        self.fake = fake_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if self.outputs == "logits":
            y = y.reshape(y.shape[0], 2)
            real = 1 - self.fake
            return torch.sigmoid(y[:, self.fake:self.fake + 1] - y[:, real:real + 1])
        y = y.reshape(y.shape[0], 1)
        return torch.sigmoid(y) if self.outputs == "logit" else y


@dataclass
class Calibration:
    images: int
    source: str
    limit: float  # 2^(cmp_bits - frac): comparisons are exact below it
    max_compared: float  # the largest magnitude any comparison saw
    layer: str  # where
    plan_error: float  # max |plan - module| (plaintext)

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "source": self.source, "limit": self.limit, "max_compared": self.max_compared,
                "layer": self.layer, "margin": self.limit / max(self.max_compared, 1e-9),
                "plan_error": self.plan_error}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from a file: the dict itself or a checkpoint holding one (weights_only: no code runs)."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise ModelError(f"{path}: no such weights file") from None
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"{path}: not a state_dict or checkpoint that torch.load(weights_only=True) reads "
                         f"({type(e).__name__}); save it with torch.save(model.state_dict(), path)") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: holds no state_dict (a dict of tensors, possibly under 'state_dict')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}  # saved from DataParallel
    return obj


def load_user_model(factory: str, weights: Path | None) -> nn.Module:
    """FACTORY() from FILE.py (the owner's own code, run here only) with its weights loaded."""
    from secdfd.common.ml.factory import load_factory

    model = load_factory(factory)
    if weights is not None:
        try:
            model.load_state_dict(load_state(weights), strict=True)
        except RuntimeError as e:
            first = str(e).splitlines()[1:3]
            raise ModelError(f"{weights} does not fit {factory}: {' '.join(s.strip() for s in first)}") from None
    return model.eval()


def calibration_images(size: int, folder: Path | None = None, limit: int = 64) -> tuple[list[torch.Tensor], str]:
    """(1, 3, size, size) images in [0, 1]: a folder's (sorted, at most `limit`), or the default set."""
    from secdfd.common.ml.data import load_image

    if folder is not None:
        if not Path(folder).is_dir():
            raise DataError(f"{folder}: not a folder of calibration images")
        files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not files:
            raise DataError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return [load_image(p, size) for p in files], f"{len(files)} images from {folder}"
    return default_calibration(size)


def default_calibration(size: int) -> tuple[list[torch.Tensor], str]:
    """The shipped calibration set (see the module docstring): deterministic, nothing downloaded."""
    from secdfd.common.ml.data import load_image, resize, to_tensor
    from secdfd.common.ml.synth import procedural_photos, random_crop

    rng = np.random.default_rng(20240607)  # calibration data, not secret
    images = [to_tensor(resize(random_crop(p, size, rng), size)).unsqueeze(0).float() / 255.0
              for p in procedural_photos(12, 256)]
    flat = [(0.0, 0.0, 0.0), (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)]
    images += [torch.tensor(c).view(1, 3, 1, 1).expand(1, 3, size, size).clone() for c in flat]
    ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images.append(((ii + jj) % 2).float().expand(1, 3, size, size).clone())
    source = "the default set (procedural crops, flat colours, a checkerboard)"
    if EXAMPLE_FACE.is_file():
        images.append(load_image(EXAMPLE_FACE, size))
        source += " and examples/face.png"
    return images, source


def calibrate(plan: Plan, module: nn.Module, weights: dict[str, torch.Tensor], images: list[torch.Tensor],
              source: str) -> Calibration:
    """Run the plan in plaintext on every image: its largest compared magnitude, and how far it is from
    the module. Refuses (PlanError) a plan that does not compute the module or leaves the range."""
    probe: dict[int, float] = {}
    plan_error = 0.0
    for x in images:
        y = run_plain(plan, weights, x, probe)
        with torch.no_grad():
            ref = module(x).double()
        if not torch.isfinite(ref).all():
            raise PlanError(f"the model gives {float(ref.reshape(-1)[0])} on a calibration image")
        plan_error = max(plan_error, float((y - ref).abs().max()))
    if plan_error > PLAN_TOLERANCE:
        raise PlanError(f"the lowered plan computes {plan_error:.3g} away from the model on the calibration images; "
                        "this is a lowering bug in SecDFD for one of the model's layers (please report it with the "
                        "model's code); export refused")
    limit = 2.0 ** (plan.cmp_bits - plan.frac)
    idx, worst = max(probe.items(), key=lambda kv: kv[1]) if probe else (0, 0.0)
    layer = plan.steps[idx].name if probe else "-"
    if worst >= limit:
        raise PlanError(f"layer {layer} ({plan.steps[idx].op}) compares values up to {worst:.4g} on the calibration "
                        f"images ({source}); comparisons are exact below {limit:g} only. Export refused: scale the "
                        "model's activations down (normalise the input, add a BatchNorm before that layer, smaller "
                        "weights)")
    return Calibration(len(images), source, limit, worst, layer, plan_error)


@dataclass
class Exported:
    path: Path
    arch: str
    size: int
    checksum: str
    plan: Plan
    calibration: Calibration
    seconds: float


@dataclass(frozen=True)
class UserModel:
    """What the owner says of a model at export: FILE.py:FACTORY, its weights, input size and outputs."""

    factory: str
    weights: Path | None
    size: int
    outputs: str  # logit, logits or probability
    fake_index: int = 1  # with two logits: which one is "fake"
    name: str | None = None  # the architecture's name (default: FILE's stem)


def export_model(user: UserModel, out: Path, calibrate_dir: Path | None = None, dtype: str = "float32") -> Exported:
    """Make a user's model deployable (see the module docstring); PlanError or ModelError say why not."""
    from secdfd.common.ml.dfdnet import MODELS
    from secdfd.common.ml.export import save_plan_deployable

    t0 = time.perf_counter()
    factory, size, outputs = user.factory, user.size, user.outputs
    arch = user.name or Path(factory.rsplit(":", 1)[0]).stem
    if not arch or not set(arch) <= _NAME_OK or len(arch) > 64 or arch in MODELS:
        raise ModelError(f"model name {arch!r}: give --name with letters, digits, '.', '_' or '-' (not a built-in "
                         "model's name)")
    if not 8 <= size <= 1024:
        raise ModelError(f"input size {size} is outside [8, 1024]")
    model = FakeProbability(load_user_model(factory, user.weights), outputs, user.fake_index).eval()
    _check_output(model, size, outputs)
    plan = build_plan(model, (1, 3, size, size), FRAC, CMP_BITS)
    plan = Plan.from_json(plan.to_json())  # exactly what dealer and servers will read
    values = extract_weights(model, plan)
    images, source = calibration_images(size, calibrate_dir)
    stored = {k: v.to(torch.float32 if dtype == "float32" else torch.float16).double() for k, v in values.items()}
    cal = calibrate(plan, model, stored, images, source)
    extra = {"outputs": outputs, "fake_index": user.fake_index, "factory": factory.rsplit(":", 1)[-1],
             "calibration": cal.as_dict()}
    digest = save_plan_deployable(out, arch, size, plan.to_obj(), values, dtype, extra)
    return Exported(Path(out), arch, size, digest, plan, cal, time.perf_counter() - t0)


def _check_output(model: FakeProbability, size: int, outputs: str) -> None:
    with torch.no_grad():
        try:
            raw = model.model(torch.zeros(1, 3, size, size))
        except Exception as e:  # noqa: BLE001 - the user's model failing on its declared input
            raise ModelError(f"the model does not run on a (1, 3, {size}, {size}) input: {e}") from e
    want = 2 if outputs == "logits" else 1
    if not isinstance(raw, torch.Tensor) or raw.numel() != want:
        got = list(raw.shape) if isinstance(raw, torch.Tensor) else type(raw).__name__
        raise ModelError(f"--outputs {outputs} expects {want} number(s) per image, the model gives {got}")


def load_reference(path: Path | None) -> tuple[nn.Module, str, int]:
    """The plaintext model of a deployable file of either kind, its architecture name and input size:
    DFDNet rebuilt from its registry, a user's model as its plan run in float64 (no user code)."""
    from secdfd.common.ml.export import load_deployable, read_deployable_meta, read_plan_weights

    meta = read_deployable_meta(path)
    if meta.plan is None:
        return load_deployable(path), meta.arch, meta.size
    assert path is not None
    meta, values = read_plan_weights(path)
    try:
        plan = Plan.from_json(meta.plan)  # type: ignore[arg-type]
    except PlanError as e:
        raise ModelError(f"{path}: {e}") from None
    return PlanModule(plan, values).eval(), meta.arch, meta.size


def estimate(plan: Plan) -> dict[str, Any]:
    """Counts of the plan's steps by op, and its elements (for the export summary)."""
    return {"steps": len(plan.steps), "ops": plan.describe(),
            "weights": sum(math.prod(s) for s in plan.weights.values())}
