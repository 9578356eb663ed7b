"""Export for the secure side: fold BatchNorm and the YCbCr map, write one checksummed file.

Folds (both exact up to float rounding, done in float64):
- BatchNorm after a conv: y = g*(conv(x) - mu)/sqrt(var + eps) + b, so W' = W*s, b' = (b0 - mu)*s + b
  with s = g/sqrt(var + eps) per output channel.
- YCbCr map before the YCbCr stream's first conv: ycc = M rgb + t, and the first conv has no padding,
  so conv(M rgb + t) = conv'(rgb) with W'[o, c] = sum_k W[o, k] M[k, c] and
  b' = b + sum_k t_k sum_ij W[o, k, i, j]. (With padding, border outputs would see a zero YCbCr
  border that is not M*0 + t, and the fold would not be exact.)
The streams take RGB in [0, 1] with no mean/std normalisation (the first BN absorbs any affine
input scaling), so there is no further normalisation to fold.

File format (torch.save of plain containers, loaded with weights_only=True, never a pickled module):
``{"format": "secdfd-deployable", "version": 1, "meta": {...}, "state_dict": {name: tensor},
"sha256": hex}``, where meta holds the architecture name, width, input size and storage dtype, and
sha256 covers the canonical JSON of meta and every tensor's name, dtype, shape and bytes.

Version 2 is a user's own model (`secdfd export --factory FILE.py:FACTORY`): no module is ever
rebuilt from it. meta holds the architecture's name, the input size, the plan (the secure steps as
JSON, see secdfd.common.engine.plancodec; public: it depends on the architecture and input size
only), the output convention declared at export and the calibration figures; state_dict holds the
weights per plan key with BatchNorm folded. Reading it executes no code of the user's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secdfd.common.errors import ModelError
from secdfd.common.ml.dfdnet import (
    YCBCR_MATRIX,
    YCBCR_OFFSET,
    ConvNorm,
    DFDNet,
    FusedDFDNet,
    build_model,
    get_spec,
)

DEPLOYABLE_FORMAT = "secdfd-deployable"
FORMAT_VERSION = 1
PLAN_FORMAT_VERSION = 2  # a plan and its weights, for a user's own model
MODELS_DIR = Path(__file__).parent / "models"
DEFAULT_MODEL = MODELS_DIR / "dfdnet-s.pt"
DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class DeployableMeta:
    """What a server may know about a deployable model: architecture and input size."""

    arch: str
    width: float
    size: int
    dtype: str
    extra: dict[str, Any]
    plan: dict[str, Any] | None = None  # version 2: the plan as JSON values; None: a DFDNet module


# --- folds ----------------------------------------------------------------------------------


def fold_conv_bn(unit: ConvNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one conv equal to conv followed by BN (in eval mode), in float64."""
    conv, bn = unit.conv, unit.bn
    if bn is None:
        raise ModelError("this conv has no BatchNorm to fold")
    w = conv.weight.detach().double()
    b0 = torch.zeros(w.shape[0], dtype=torch.float64) if conv.bias is None else conv.bias.detach().double()
    var = bn.running_var.double()  # type: ignore[union-attr]
    mu = bn.running_mean.double()  # type: ignore[union-attr]
    s = bn.weight.detach().double() / torch.sqrt(var + bn.eps)
    return w * s.view(-1, 1, 1, 1), (b0 - mu) * s + bn.bias.detach().double()


def fold_colour_map(weight: torch.Tensor, bias: torch.Tensor, matrix: torch.Tensor,
                    offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv(matrix @ x + offset) as a conv on x; exact for an unpadded conv."""
    w = weight.double()
    w_folded = torch.einsum("okij,kc->ocij", w, matrix.double())
    return w_folded, bias.double() + torch.einsum("okij,k->o", w, offset.double())


def fold_stream(model: DFDNet, stream: str) -> DFDNet:
    """A folded copy of a trained stream: no BatchNorm, and for 'ycbcr' an RGB input."""
    src = model.state_dict()
    folded = DFDNet(model.width, model.input_size, folded=True).double()
    state: dict[str, torch.Tensor] = {}
    units = {name for name, m in model.named_modules() if isinstance(m, ConvNorm)}
    for name, m in model.named_modules():
        if isinstance(m, ConvNorm):
            w, b = fold_conv_bn(m)
            if stream == "ycbcr" and name == "stem1":
                if m.conv.padding != (0, 0):
                    raise ModelError("the colour map can only be folded into an unpadded first conv")
                w, b = fold_colour_map(w, b, YCBCR_MATRIX, YCBCR_OFFSET)
            state[f"{name}.conv.weight"], state[f"{name}.conv.bias"] = w, b
    for key, value in src.items():
        if not any(key.startswith(f"{u}.") for u in units):
            state[key] = value.double()
    folded.load_state_dict(state, strict=True)
    return folded.float().eval()


def fuse(rgb: DFDNet, ycbcr: DFDNet) -> FusedDFDNet:
    """The deployable module: both streams folded, reading one RGB tensor in [0, 1]."""
    if (rgb.width, rgb.input_size) != (ycbcr.width, ycbcr.input_size):
        raise ModelError("the two streams must share width and input size")
    return FusedDFDNet(fold_stream(rgb, "rgb"), fold_stream(ycbcr, "ycbcr")).eval()


# --- files ----------------------------------------------------------------------------------


def checksum(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """sha256 over canonical JSON of meta, then each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_deployable(model: FusedDFDNet, path: str | Path, arch: str, dtype: str = "float32",
                    extra: dict[str, Any] | None = None) -> str:
    """Write a fused, folded model; returns its checksum. `extra` is free JSON-able metadata."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown storage dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if not (model.rgb.folded and model.ycbcr.folded):
        raise ModelError("only folded models can be exported; build one with `fuse`")
    if get_spec(arch).width != model.rgb.width:
        raise ModelError(f"{arch} has width {get_spec(arch).width}, the model has {model.rgb.width}")
    state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise ModelError(f"{k} does not fit in {dtype}; export as float32")
    meta = {"arch": arch, "width": model.rgb.width, "size": model.rgb.input_size, "dtype": dtype,
            "extra": extra or {}}
    digest = checksum(meta, state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": DEPLOYABLE_FORMAT, "version": FORMAT_VERSION, "meta": meta, "state_dict": state,
                "sha256": digest}, path)
    return digest


def save_plan_deployable(path: str | Path, arch: str, size: int, plan: dict[str, Any],
                         weights: dict[str, torch.Tensor], dtype: str = "float32",
                         extra: dict[str, Any] | None = None) -> str:
    """Write a user's model as its plan (JSON values) and folded weights per plan key; returns the
    checksum. The caller (secdfd.common.service.custom) has checked the plan and the weights."""
    if dtype not in DTYPES:
        raise ModelError(f"unknown storage dtype {dtype!r}; known: {', '.join(DTYPES)}")
    state = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in weights.items()}
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise ModelError(f"{k} does not fit in {dtype}; export as float32")
    meta = {"arch": arch, "width": 0.0, "size": size, "dtype": dtype, "plan": plan, "extra": extra or {}}
    digest = checksum(meta, state)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": DEPLOYABLE_FORMAT, "version": PLAN_FORMAT_VERSION, "meta": meta, "state_dict": state,
                "sha256": digest}, path)
    return digest


def _read(path: str | Path | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = DEFAULT_MODEL if path is None else Path(path)
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
        if payload.get("format") != DEPLOYABLE_FORMAT:
            raise KeyError("format")
        if payload.get("version") not in (FORMAT_VERSION, PLAN_FORMAT_VERSION):
            raise ModelError(f"{path}: format version {payload.get('version')} is not supported")
        meta, state, digest = payload["meta"], payload["state_dict"], payload["sha256"]
    except FileNotFoundError:
        raise ModelError(f"{path}: no such model file") from None
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        kind = e.__class__.__name__
        raise ModelError(f"{path}: not a deployable model from `secdfd export` ({kind})") from None
    if checksum(meta, state) != digest:
        raise ModelError(f"{path}: checksum mismatch; the file is corrupt or was modified")
    if ("plan" in meta) != (payload["version"] == PLAN_FORMAT_VERSION):
        raise ModelError(f"{path}: not a deployable model from `secdfd export` (version and contents disagree)")
    return meta, state


def read_deployable_meta(path: str | Path | None = None) -> DeployableMeta:
    """Architecture name, width, input size and storage dtype of a deployable file (verified)."""
    meta, _ = _read(path)
    return _meta(meta)


def _meta(meta: dict[str, Any]) -> DeployableMeta:
    return DeployableMeta(meta["arch"], meta["width"], meta["size"], meta["dtype"], meta.get("extra", {}),
                          meta.get("plan"))


def read_plan_weights(path: str | Path) -> tuple[DeployableMeta, dict[str, torch.Tensor]]:
    """A user's model file (version 2): its meta (with the plan's JSON values) and weights per plan key."""
    meta, state = _read(path)
    if "plan" not in meta:
        raise ModelError(f"{path} holds a DFDNet module, not a plan")
    return _meta(meta), {k: v.to(torch.float64) for k, v in state.items()}


def load_deployable(path: str | Path | None = None) -> FusedDFDNet:
    """The fused, folded detector from a deployable file (None: the embedded default).

    Verifies the checksum; returns a float32 module in eval mode: RGB (N, 3, size, size) in [0, 1]
    -> fused fake probability (N, 1).
    """
    meta, state = _read(path)
    if "plan" in meta:
        raise ModelError(f"{path} is a user's model ({meta['arch']}) exported as a plan, not DFDNet; this command "
                         "takes DFDNet files, `secdfd detect --plain` and `secdfd share` take both")
    streams = [build_model(meta["arch"], meta["size"], folded=True) for _ in range(2)]
    model = FusedDFDNet(*streams)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError:
        arch, size = meta["arch"], meta["size"]
        raise ModelError(f"{path}: weights do not match {arch} at size {size}") from None
    return model.float().eval()


def load_plain_streams(path: str | Path | None = None) -> tuple[DFDNet, DFDNet]:
    """The two folded stream networks (RGB, YCbCr), both reading RGB in [0, 1] and giving logits."""
    model = load_deployable(path)
    return model.rgb, model.ycbcr
