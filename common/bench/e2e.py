"""`secdfd bench e2e`: the three parties as separate processes over CURVE sockets, timed per inference.

1. Make a deployment in a scratch folder: keys, the model's weight shares, free loopback ports.
   `dfdnet-s` is the embedded trained model (rebuilt at --size: the weights do not depend on it);
   `dfdnet` is a trained full-width model if one is installed, else freshly initialised weights
   (timing and traffic do not depend on the weights; the output says which). A path is a
   deployable file from `secdfd export`, shared as it is (a user's model runs at its exported size;
   its plaintext reference is its plan evaluated in float64).
2. Start dealer, server_a and server_b (`local.launches` + a `Spawn`: the caller may wrap each
   command line, e.g. with `ip netns exec`, and give other `Endpoints`).
3. Per image: wait until both servers have a bundle prepared and nothing runs in the background,
   then detect through the client; time the same fused model in plaintext torch in this process.

Figures per inference: online_seconds (the servers' online phase), client_seconds (what the client
waited), bytes_per_server, rounds, dealer_bytes, offline_seconds (dealer generation + preparation),
plaintext_seconds, abs_error = |p_secure - p_plain|; `steps` is the per-layer breakdown of the last
inference. Top-level figures are medians over the inferences.

With batches (`--batch 1,4,16`): for each N, `images` requests of N crops, each one secure session
on a batch bundle; `batches` lists per N the medians per session and per crop (online seconds,
bytes per server, rounds), the largest |p_secure - p_plain| and whether every verdict matched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secdfd.common import roster
from secdfd.common.ml.dfdnet import FusedDFDNet
from secdfd.common.service import local
from secdfd.common.service.client import Client, ClientConfig

FIGURES = ("online_seconds", "client_seconds", "bytes_per_server", "rounds", "dealer_bytes", "offline_seconds",
           "dealer_seconds", "plaintext_seconds", "abs_error")


def is_model_file(model: str) -> bool:
    """Does `model` name a deployable file rather than a registered architecture?"""
    return model.endswith(".pt") or Path(model).is_file()


def bench_model(model: str, size: int | None) -> tuple[torch.nn.Module, str]:
    """The plaintext model (`model` a name: the fused, folded DFDNet at `size`; a path: the file's
    model), and where its weights come from."""
    from secdfd.common.ml.dfdnet import build_model, get_spec, init_weights
    from secdfd.common.ml.export import DEFAULT_MODEL, MODELS_DIR, fuse, load_deployable

    if is_model_file(model):
        from secdfd.common.errors import ModelError
        from secdfd.common.service.custom import load_reference

        plain, arch, fsize = load_reference(Path(model))
        if size not in (None, fsize):
            if not isinstance(plain, FusedDFDNet):
                raise ModelError(f"{model} was exported for {fsize}x{fsize} inputs; run it at that size")
            plain = at_size(plain, arch, size)
        return plain, f"{arch} from {model}"
    size = size or 128
    get_spec(model)  # unknown names fail with the list of known ones
    trained = DEFAULT_MODEL if model == "dfdnet-s" else MODELS_DIR / f"{model}.pt"
    if trained.is_file():
        return at_size(load_deployable(trained), model, size), f"trained weights from {trained.name}"
    with torch.random.fork_rng():
        torch.manual_seed(0)  # benchmark weights only, never secret
        rgb, ycc = build_model(model, size), build_model(model, size)
        for m in (rgb, ycc):
            init_weights(m)
    what = f"random weights (no trained {model} model installed; timing and traffic do not depend on weights)"
    return fuse(rgb.eval(), ycc.eval()), what


def at_size(fused: FusedDFDNet, arch: str, size: int) -> FusedDFDNet:
    """The same weights for another input size (no weight depends on it: global pools before the fcs)."""
    from secdfd.common.ml.dfdnet import build_model

    if fused.rgb.input_size == size:
        return fused
    out = FusedDFDNet(build_model(arch, size, folded=True), build_model(arch, size, folded=True))
    out.load_state_dict(fused.state_dict())
    return out.eval()


@dataclass
class Scratch:
    """A running scratch deployment: its folder, processes and a connected client."""

    layout: local.Layout
    started: list[local.Started]
    client: Client
    setup_seconds: float
    startup: float

    def idle(self) -> None:
        """Wait until both servers have a bundle prepared and nothing runs in the background."""
        local.wait_ready(self.started, self.layout.keys, self.startup, prepared=True)


def write_model_file(model: torch.nn.Module | Path, arch: str, dest: Path) -> Path:
    """`dest` holding `model`: a deployable file copied as it is, or a fused DFDNet exported."""
    from secdfd.common.ml.export import save_deployable

    if isinstance(model, Path):
        shutil.copyfile(model, dest)
    else:
        assert isinstance(model, FusedDFDNet)
        save_deployable(model, dest, arch)
    return dest


@contextlib.contextmanager
def scratch_deployment(model: torch.nn.Module | Path, arch: str, work: Path | None = None,
                       launcher: local.Launcher = local.ON_LOOPBACK, options: local.Options | None = None,
                       startup: float = 900.0) -> Iterator[Scratch]:
    """Keys, weight shares of `model` (a fused DFDNet, or a deployable file copied as it is) and the three
    processes in a temporary folder, removed after."""
    from secdfd.common.net.keys import make_keys
    from secdfd.common.service.deployment import share_model

    options = options or local.Options()
    # a signal while the keys and shares are made still removes the folder that holds them
    with local.exit_on_signals(), tempfile.TemporaryDirectory(prefix="secdfd-e2e-", dir=work) as tmp:
        layout = local.Layout(Path(tmp))
        endpoints = launcher.endpoints or local.Endpoints.free()
        t0 = time.perf_counter()
        model_file = write_model_file(model, arch, layout.root / "model.pt")
        make_keys(layout.keys)
        share_model(model_file, layout.shares)
        model_file.unlink()  # the servers get shares only
        with local.running(layout, local.launches(layout, endpoints, options), launcher.spawn) as started:
            local.wait_ready(started, layout.keys, startup, prepared=True)
            client = Client(ClientConfig(layout.keys, endpoints.server_a, endpoints.server_b, options.timeout * 4))
            try:
                yield Scratch(layout, started, client, time.perf_counter() - t0, startup)
            finally:
                client.close()


def bench_images(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` smooth random test images (1, 3, size, size) in [0, 1] (benchmark data, not secret)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        coarse = torch.rand(1, 3, 8, 8, generator=g)
        img = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
        out.append((img + 0.05 * torch.rand(1, 3, size, size, generator=g)).clamp(0, 1))
    return out


def run_e2e(model: str = "dfdnet-s", size: int | None = 128, images: int = 3, work: Path | None = None,  # noqa: PLR0913
            launcher: local.Launcher = local.ON_LOOPBACK, options: local.Options | None = None,
            startup: float = 900.0, echo: Callable[[str], None] = lambda _: None, *,
            batches: tuple[int, ...] = ()) -> dict[str, Any]:
    """Start the three parties, run `images` detections, return the figures (see the module doc).
    With `batches`, also `images` sessions of N crops for each N (`batches` in the result)."""
    if batches:
        options = dataclasses.replace(options or local.Options(), max_batch=max(max(batches), 2))
    plain, weights = bench_model(model, size)
    deployed: torch.nn.Module | Path = plain
    arch = model
    if is_model_file(model):
        from secdfd.common.ml.export import read_deployable_meta

        meta = read_deployable_meta(Path(model))
        arch = meta.arch
        if size in (None, meta.size):
            deployed = Path(model)  # the file as the owner shares it
    runs = []
    with scratch_deployment(deployed, arch, work, launcher, options, startup) as dep:
        size = dep.client.info.size
        echo(f"{model} at {size}x{size}: {weights}")
        echo(f"dealer and servers ready after {dep.setup_seconds:.1f} s; {images} inferences")
        for i, x in enumerate(bench_images(images, size)):
            dep.idle()  # time the online phase alone
            r = dep.client.detect_tensor(x, f"image {i}", breakdown=True)
            p_plain, plain_s = plaintext(plain, x)
            r.update(client_seconds=r.pop("seconds"), plaintext_seconds=plain_s, p_secure=r.pop("p_fake"),
                     p_plain=p_plain)
            r["abs_error"] = abs(r["p_secure"] - p_plain)
            runs.append(r)
            echo(f"image {i}: online {r['online_seconds']:.2f} s, "
                 f"{r['bytes_per_server'][0] / 1e6:.1f} MB per server, {r['rounds']} rounds, "
                 f"|p_secure - p_plain| = {r['abs_error']:.2e}")
        per_batch = [_batch_runs(dep, plain, n, images, size, echo) for n in batches]
        setup_s = dep.setup_seconds
    steps = runs[-1].pop("steps")
    for r in runs[:-1]:
        r.pop("steps")
    return {"model": model, "size": size, "weights": weights, "images": images,
            "threads": (options or local.Options()).threads,
            "setup_seconds": setup_s, **{k: _median([r[k] for r in runs]) for k in FIGURES},
            "inferences": runs, "steps": steps, **({"batches": per_batch} if batches else {})}


BATCH_FIGURES = ("online_seconds", "client_seconds", "bytes_per_server", "rounds", "dealer_bytes",
                 "offline_seconds")


def _batch_runs(dep: Scratch, plain: torch.nn.Module, n: int, sessions: int, size: int,
                echo: Callable[[str], None]) -> dict[str, Any]:
    """`sessions` requests of n crops each (one secure session apiece): medians per session, and per
    crop the online seconds and bytes (a batch bundle is made when the request starts, so the
    client's wait includes the dealer's generation and the servers' preparation: `offline_seconds`)."""
    xs = bench_images(n * sessions, size, seed=n)
    runs = []
    for j in range(sessions):
        dep.idle()
        x = torch.cat(xs[j * n : (j + 1) * n])
        out = dep.client.detect_batch(x, f"batch {n}, session {j}")
        with torch.no_grad():
            p_plain = plain(x).reshape(-1).tolist()
        r = {k: out[0]["seconds" if k == "client_seconds" else k] for k in BATCH_FIGURES}
        r["abs_error"] = max(abs(o["p_fake"] - p) for o, p in zip(out, p_plain, strict=True))
        r["verdicts_equal"] = all(o["verdict"] == roster.verdict(p) for o, p in zip(out, p_plain, strict=True))
        runs.append(r)
        echo(f"batch {n}, session {j}: online {r['online_seconds']:.2f} s ({r['online_seconds'] / n:.2f} s per crop), "
             f"{r['bytes_per_server'][0] / n / 1e6:.1f} MB per crop per server, {r['rounds']} rounds, "
             f"max |p_secure - p_plain| = {r['abs_error']:.2e}")
    med = {k: _median([r[k] for r in runs]) for k in BATCH_FIGURES}
    return {"batch": n, "sessions": sessions, **med,
            "online_seconds_per_crop": med["online_seconds"] / n,
            "bytes_per_crop": [b / n for b in med["bytes_per_server"]],
            "rounds_per_crop": med["rounds"] / n,
            "abs_error": max(r["abs_error"] for r in runs),
            "verdicts_equal": all(r["verdicts_equal"] for r in runs)}


def plaintext(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """The plaintext fused fake probability of x and the seconds it took (after a warm-up)."""
    with torch.no_grad():
        model(x)  # warm-up
        t = time.perf_counter()
        p = float(model(x).reshape(-1)[0])
        return p, time.perf_counter() - t


def _median(values: list[Any]) -> Any:
    """The median (of each position, for lists); integers stay integers (the lower median)."""
    if isinstance(values[0], list):
        return [_median(list(v)) for v in zip(*values, strict=True)]
    if all(isinstance(v, int) for v in values):
        return statistics.median_low(values)
    return statistics.median(values)
