"""The deployed model as the service sees it: the one place where processes call the secure engine.

- Architecture and plan: the model owner lowers the model once; the plan (typed steps, shapes,
  scales, weight shapes: public, it depends on the architecture and input size only) travels as
  strictly checked JSON in model.json and in both share files, and dealer and servers run what it
  says (`plan_for`). They never import or execute the owner's Python. Files from before the plan
  travelled fall back to tracing the registered DFDNet architecture.
- Weight shares (`secdfd share`): the model owner encodes the exported model's weights in fixed
  point and splits them with the CSPRNG; one file per server, holding only that server's share and
  the architecture, plus `model.json`, the public model info (what the dealer is given). Every run
  draws a fresh split id, written into all three. Files are read with
  `torch.load(weights_only=True)`, never unpickled freely.
- Dealer: the provisioning seeds (which fix the weight masks B) are drawn fresh for each split id
  and kept in the dealer's state folder (mode 0600) under that id, so a restarted dealer deals
  bundles that still match the servers' opened F = W - B, and a second model shared into the same
  state never meets the first one's masks (F' - F would be W' - W).
- Client: fixed-point encoding and sharing of the image, reconstruction of the fused probability.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from secdfd.common import roster
from secdfd.common.engine.channel import Channel
from secdfd.common.engine.evaluator import Dealer, Party
from secdfd.common.engine.plan import Plan, build_plan
from secdfd.common.engine.randomness import Bundle, Provision
from secdfd.common.engine.ring import FixedPoint
from secdfd.common.engine.sharing import reconstruct, share
from secdfd.common.errors import ModelError, PlanError, RandomnessError, RangeError
from secdfd.common.net import sealed
from secdfd.common.net.keys import KeyFileError, PartyKeys, read_public

SHARE_FORMAT = "secdfd-weight-share"
SHARE_VERSION = 2  # 2: the split id and the architecture digest
INFO_FILE = "model.json"  # public model info, written next to the weight shares


@dataclass(frozen=True)
class ModelInfo:
    """What every party may know about the model: architecture, input size, number format.

    cmp_bits: comparisons are exact for |x| < 2^cmp_bits ring units, 2^(cmp_bits - frac) = 65,536 in
    real terms at 32 and 16. The values DFDNet compares (ReLU and sigmoid inputs, max-pool and max
    differences) stay below 120 on the proxy set, a margin of more than 500x; 32 bits instead of the
    engine's generic 40 make every comparison tree a quarter smaller (8 leaf groups instead of 10).
    """

    arch: str
    size: int
    frac: int = 16
    cmp_bits: int = 32
    split: str = ""  # the id of the `secdfd share` run whose shares are served ("" before sharing)
    plan: Plan | None = field(default=None, compare=False, repr=False)  # from the share files; public

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.size, self.size)

    def describe(self) -> str:
        split = f", split {self.split}" if self.split else ""
        return f"{self.arch} at {self.size}x{self.size} ({self.frac} fractional bits{split})"


def new_split_id() -> str:
    """A fresh split id (128 bits from the CSPRNG), one per `secdfd share` run."""
    return secrets.token_hex(16)


def architecture_digest(info: ModelInfo, plan: Plan) -> str:
    """A digest of what the parties know of the model (architecture, input size, number format, the
    plan with the shape of every weight): two servers with the same digest run the same plan. It says
    nothing of the weights' values."""
    public = {"arch": info.arch, "size": info.size, "frac": info.frac, "cmp_bits": info.cmp_bits,
              "weights": sorted((k, list(v)) for k, v in plan.weights.items()), "plan": plan.to_obj()}
    return hashlib.sha256(json.dumps(public, sort_keys=True).encode()).hexdigest()[:32]


def info_fields(info: ModelInfo) -> dict[str, Any]:
    """The model info's scalar fields (what `ModelInfo(**...)` takes back), without the plan."""
    return {"arch": info.arch, "size": info.size, "frac": info.frac, "cmp_bits": info.cmp_bits, "split": info.split}


def write_info(info: ModelInfo, digest: str, path: Path) -> None:
    """Write the public model info (architecture, input size, number format, split, digest, plan) as JSON."""
    data: dict[str, Any] = {**info_fields(info), "digest": digest}
    if info.plan is not None:
        data["plan"] = info.plan.to_obj()
    Path(path).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")


def with_plan(info: ModelInfo, plan_json: Any, where: Path | str) -> ModelInfo:
    """`info` with the plan read from `plan_json` (text or JSON values), checked against the info."""
    try:
        plan = Plan.from_json(plan_json)
    except PlanError as e:
        raise ModelError(f"{where}: {e}") from None
    if (plan.input_shape, plan.frac, plan.cmp_bits) != (info.input_shape, info.frac, info.cmp_bits):
        raise ModelError(f"{where}: the plan is for input {list(plan.input_shape)}, {plan.frac} fractional bits and "
                         f"{plan.cmp_bits}-bit comparisons, the model info says {info.describe()}, "
                         f"{info.cmp_bits}-bit comparisons")
    return replace(info, plan=plan)


def read_info(path: Path) -> ModelInfo:
    """The model info written by `secdfd share` (OUT/model.json), with its plan (checked, and checked
    against the digest written beside it)."""
    try:
        data = json.loads(Path(path).read_text())
        info = ModelInfo(str(data["arch"]), int(data["size"]), int(data["frac"]), int(data["cmp_bits"]),
                         str(data.get("split", "")))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model info; `secdfd share [MODEL] --out DIR` writes DIR/{INFO_FILE}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path}: not a model info file from `secdfd share` ({type(e).__name__})") from None
    if not _SPLIT_ID.fullmatch(info.split):
        raise ModelError(f"{path} names no split id (made by an older release?); run `secdfd share` again and "
                         "give the dealer and both servers the new files")
    if "plan" in data:
        info = with_plan(info, data["plan"], path)
        assert info.plan is not None
        if architecture_digest(info, info.plan) != data.get("digest"):
            raise ModelError(f"{path}: the plan does not match the digest beside it; the file was modified. Run "
                             "`secdfd share` again and give the dealer and both servers the new files")
    return info


_SPLIT_ID = re.compile(r"[0-9a-f]{32}")


def architecture(info: ModelInfo) -> nn.Module:
    """The fused two-stream detector with the right shapes and no meaningful weights."""
    from secdfd.common.ml.dfdnet import FusedDFDNet, build_model

    return FusedDFDNet(build_model(info.arch, info.size, folded=True),
                       build_model(info.arch, info.size, folded=True)).eval()


def plan_for(info: ModelInfo, module: nn.Module | None = None) -> Plan:
    """The plan every party runs: the one the share files carry, or (the model owner, or files from
    before plans travelled) the one lowered from `module` or from the registered DFDNet architecture."""
    if module is None and info.plan is not None:
        return info.plan
    with torch.no_grad():
        # share files without a plan were split with every weight at f bits: no chained layers
        return build_plan(module if module is not None else architecture(info), info.input_shape,
                          info.frac, info.cmp_bits, chain=module is not None)


# --- the model owner's split ----------------------------------------------------------------


def share_model(model_path: Path | None, out: Path, frac: int = 16, cmp_bits: int = 32,
                seal: Mapping[str, Path] | None = None) -> dict[str, Path]:
    """Split an exported model (None: the embedded default) into one weight-share file per server.

    Each file holds one server's share only. With `seal` (server name -> that server's public key
    file), the server's file is sealed to its key: only that server can read it, and it may travel
    by any channel. Returns the paths by name: server_a, server_b (the share files) and info
    (OUT/model.json).
    """
    seal = dict(seal or {})
    unknown = set(seal) - set(roster.SERVERS)
    if unknown:
        raise ModelError(f"shares are sealed to servers only ({', '.join(roster.SERVERS)}), not {sorted(unknown)}")
    recipients = {server: read_public(path) for server, path in seal.items()}
    info, plan, values = _owner_model(model_path, frac, cmp_bits)
    digest = architecture_digest(info, plan)
    from secdfd.common.engine.twoparty import share_values

    shares = share_values(values, plan)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for role, server in enumerate(roster.SERVERS):
        path = out / f"{server}.weights"
        tmp = path.with_name(path.name + ".tmp")
        buf = io.BytesIO()
        torch.save({"format": SHARE_FORMAT, "version": SHARE_VERSION, "party": server, "info": info_fields(info),
                    "plan": plan.to_json(), "digest": digest, "weights": shares[role]}, buf)
        data = buf.getvalue() if server not in recipients else sealed.seal(buf.getvalue(), recipients[server])
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        paths[server] = path
    paths["info"] = out / INFO_FILE
    write_info(info, digest, paths["info"])
    return paths


def _owner_model(model_path: Path | None, frac: int, cmp_bits: int) -> tuple[ModelInfo, Plan, dict[str, torch.Tensor]]:
    """The model owner's side: the public info with its plan, and the float64 weights per plan key.

    A DFDNet file is lowered here; a user's model file (`secdfd export --factory`) brings its plan,
    which is checked as strictly as the servers check it."""
    from secdfd.common.engine.plan import extract_weights
    from secdfd.common.ml.export import load_deployable, read_deployable_meta, read_plan_weights

    meta = read_deployable_meta(model_path)
    split = new_split_id()
    if meta.plan is None:
        module = load_deployable(model_path)
        info = ModelInfo(meta.arch, meta.size, frac, cmp_bits, split)
        plan = Plan.from_json(plan_for(info, module).to_json())  # as the parties will read it
        return replace(info, plan=plan), plan, extract_weights(module, plan)
    assert model_path is not None  # the embedded default is a DFDNet file
    meta, values = read_plan_weights(model_path)
    assert meta.plan is not None
    info = ModelInfo(meta.arch, meta.size, int(meta.plan["frac"]), int(meta.plan["cmp_bits"]), split)
    if (info.frac, info.cmp_bits) != (frac, cmp_bits):
        raise ModelError(f"{model_path} was exported for {info.frac} fractional bits and {info.cmp_bits}-bit "
                         f"comparisons, not {frac} and {cmp_bits}; export it again")
    info = with_plan(info, meta.plan, str(model_path))
    assert info.plan is not None
    want = info.plan.weights
    if set(values) != set(want) or any(tuple(values[k].shape) != want[k] for k in want):
        raise ModelError(f"{model_path}: the weights do not match the plan; export the model again")
    return info, info.plan, values


@dataclass(frozen=True)
class WeightShare:
    """One server's share of one split: the public model info, the digest the split was made with,
    and this server's additive shares of the fixed-point weights."""

    info: ModelInfo
    digest: str
    weights: dict[str, torch.Tensor]


def load_weight_share(path: Path, server: str, keys: PartyKeys | None = None) -> WeightShare:
    """A server's weight share and the model info it was made for; a share sealed to the server is
    opened with its keys."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ModelError(f"{path}: no weight share file; make them with `secdfd share [MODEL] --out DIR`") from None
    except OSError as e:
        raise ModelError(f"{path}: cannot read the weight share ({e.strerror})") from None
    if sealed.is_sealed(data):
        if keys is None:
            raise ModelError(f"{path} is sealed; it can only be opened with {server}'s keys")
        try:
            data = sealed.open_sealed(data, keys.public, keys.secret)
        except KeyFileError as e:
            raise ModelError(f"{path}: {e} (it must be sealed to {server}'s public key)") from None
    try:
        payload = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise ModelError(f"{path}: not a weight share from `secdfd share` ({type(e).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != SHARE_FORMAT:
        raise ModelError(f"{path}: not a weight share from `secdfd share`")
    if payload.get("version") != SHARE_VERSION:
        raise ModelError(f"{path} is a weight share of format {payload.get('version')!r}, this release reads "
                         f"{SHARE_VERSION}; run `secdfd share` again")
    try:
        info = ModelInfo(**payload["info"])
        plan_json = payload.get("plan")
        share = WeightShare(info, str(payload["digest"]), dict(payload["weights"]))
        party = payload["party"]
    except Exception as e:  # noqa: BLE001 - any malformed field is the same user error
        raise ModelError(f"{path}: not a weight share from `secdfd share` ({type(e).__name__})") from None
    if plan_json is not None:
        share = replace(share, info=with_plan(info, plan_json, path))
    if party != server:
        raise ModelError(f"{path} is {party}'s weight share, not {server}'s; give each server its own file")
    if not _SPLIT_ID.fullmatch(info.split):
        raise ModelError(f"{path} names no valid split id; run `secdfd share` again")
    return share


# --- dealer -----------------------------------------------------------------------------------


def make_dealer(info: ModelInfo, state: Path) -> Dealer:
    """The dealer for `info`'s split, with that split's provisioning seeds kept in `state`.

    Seeds are drawn fresh the first time a split is seen and kept under its id (STATE/splits/ID.seeds),
    so a restarted dealer deals bundles that still match the servers' opened F = W - B, and no two
    splits (two models, or two shares of one model) ever derive their masks from the same seeds.
    """
    if not _SPLIT_ID.fullmatch(info.split):
        raise ModelError("the model info names no split id; run `secdfd share` again and start the dealer with "
                         "its model.json")
    seeds_file = Path(state) / "splits" / f"{info.split}.seeds"
    if seeds_file.exists():
        data = seeds_file.read_bytes()
        if len(data) != 64:
            raise RandomnessError(f"{seeds_file} is corrupt; run `secdfd share` again (a new split) and restart the "
                                  "dealer and both servers with the new files")
        seeds = (data[:32], data[32:])
        dealer = Dealer(plan_for(info), info.split, seeds, info.cmp_bits)
    else:
        dealer = Dealer(plan_for(info), info.split, cmp_bits=info.cmp_bits)
        seeds_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = seeds_file.with_name(seeds_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(dealer.provision_seeds[0] + dealer.provision_seeds[1])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, seeds_file)
    return dealer


def provision_bytes(dealer: Dealer) -> tuple[bytes, bytes]:
    p0, p1 = dealer.provision()
    return p0.to_bytes(), p1.to_bytes()


def bundle_name(bundle_id: int, batch: int = 1) -> str:
    """What a bundle is called inside: one-input bundles by their id, batch bundles (ids of their own
    ledger) as batch-ID."""
    return str(bundle_id) if batch == 1 else f"batch-{bundle_id}"


def bundle_bytes(dealer: Dealer, bundle_id: int, batch: int = 1) -> tuple[bytearray, bytearray]:
    b0, b1 = dealer.bundle(bundle_name(bundle_id, batch), batch)
    return b0.to_bytes(), b1.to_bytes()


# --- server -----------------------------------------------------------------------------------


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, with a sentence that says what to do."""
    kind = torch.device(device).type
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but CUDA is not available here (torch "
                         f"{torch.__version__}); run on a machine with a GPU and a CUDA build of torch, "
                         "or use --device cpu")
    if kind not in ("cpu", "cuda"):
        raise ModelError(f"device {device!r} is not supported; use cpu or cuda")


def make_party(role: int, info: ModelInfo, weights: dict[str, torch.Tensor], provision: bytes,
               channel: Channel, device: str = "cpu", limbs: bool | None = None, plan: Plan | None = None) -> Party:
    """A server's engine party; `limbs` forces (or forbids) the float64 limb path, None: on CUDA only."""
    return Party(role, plan if plan is not None else plan_for(info), weights, Provision.from_bytes(provision),
                 channel, info.cmp_bits, device, limbs)


def load_bundle(data: bytes | bytearray, role: int, bundle_id: int, batch: int = 1) -> Bundle:
    """Decode a bundle and check it is the one announced, for this party and batch size."""
    bundle = Bundle.from_bytes(data)
    want = bundle_name(bundle_id, batch)
    if bundle.role != role or bundle.bundle_id != want or bundle.batch != batch:
        raise RandomnessError(f"the dealer sent bundle {bundle.bundle_id} (batch {bundle.batch}) for party "
                              f"{bundle.role}, expected {want} (batch {batch}) for party {role}")
    return bundle


# --- client -----------------------------------------------------------------------------------


def share_image(x: torch.Tensor, info: ModelInfo) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, size, size) floats in [0, 1] (n crops) -> two ring shares of their fixed-point encoding."""
    return share(FixedPoint(info.frac).encode(x))


# A probability computed securely lies within the sigmoid's fit error and a few fixed-point units
# of [0, 1]; anything further out means a compared value left the comparison range somewhere in the
# network (the comparison wrapped around), and the result is garbage, not a probability.
P_TOLERANCE = 1e-3


def fake_probability(y0: torch.Tensor, y1: torch.Tensor, info: ModelInfo) -> float:
    """The fused fake probability from the servers' two output shares, clamped to [0, 1]; RangeError
    if it is further than P_TOLERANCE outside (never a verdict from such a value)."""
    return fake_probabilities(y0, y1, info)[0]


def fake_probabilities(y0: torch.Tensor, y1: torch.Tensor, info: ModelInfo) -> list[float]:
    """`fake_probability` of each crop of a batch (one output element per crop, in order)."""
    ps = [float(p) for p in FixedPoint(info.frac).decode(reconstruct(y0, y1)).reshape(-1)]
    for i, p in enumerate(ps):
        if not -P_TOLERANCE <= p <= 1.0 + P_TOLERANCE:
            which = f"crop {i + 1} of {len(ps)}" if len(ps) > 1 else "this input"
            limit = 2 ** (info.cmp_bits - info.frac)
            raise RangeError(f"the secure result is out of range ({p:.4g} is not a probability): a value inside "
                             f"the model left the comparison range of +-{limit:g} on {which}, so no verdict can "
                             "be given; check that the image is a face crop like the model's training data")
    return [min(1.0, max(0.0, p)) for p in ps]
