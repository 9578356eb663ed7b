"""Commands of the model area: `data synth`, `train`, `eval`, `detect` (the plaintext reference), `export`.

Without `--model`, commands use the embedded default (common/models/dfdnet-s.pt). User mistakes
(missing folders, bad images, unknown names, corrupt model files) end as one-line click errors,
never as tracebacks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import torch

from secdfd.common import roster
from secdfd.common.errors import SecDFDError
from secdfd.common.ml.analyse import Analyser
from secdfd.common.ml.faces import MARGIN, MIN_FACE, SCORE

PathArg = click.Path(path_type=Path)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn SecDFD's own errors into click errors (a sentence, exit status 1, no traceback)."""
    try:
        yield
    except SecDFDError as e:
        raise click.ClickException(str(e)) from None


def set_threads(threads: int) -> None:
    """Bound torch's CPU threads (the machine may be shared)."""
    if threads < 1:
        raise click.UsageError("--threads must be at least 1")
    torch.set_num_threads(threads)


model_file_option = click.option("--model", "model_path", type=PathArg, default=None,
                                 help="Deployable model file (default: the embedded one).")
threads_option = click.option("--threads", type=int, default=2, show_default=True,
                              help="CPU threads for torch.")


class ProgressLine:
    """One progress line per epoch: a bar, images seen, running loss and accuracy.

    Redrawn in place on a terminal; elsewhere (logs, CI) printed at every tenth of the epoch.
    """

    WIDTH = 30

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last_tenth = -1
        self.open = False

    def step(self, epoch: int, seen: int, total: int, loss: float, acc: float) -> None:
        """Report `seen` of `total` images of 0-based `epoch` done, with running loss/accuracy."""
        filled = self.WIDTH * seen // max(total, 1)
        line = (f"epoch {epoch + 1} [{'#' * filled}{'.' * (self.WIDTH - filled)}] {seen}/{total} "
                f"loss {loss:.4f} acc {acc:.3f}")
        tenth = 10 * seen // max(total, 1)
        if self.tty:
            click.echo("\r" + line, nl=False, err=True)
            self.open = True
        elif tenth != self.last_tenth:
            click.echo(line, err=True)
        self.last_tenth = tenth

    def done(self) -> None:
        """End the epoch's line."""
        if self.open:
            click.echo("", err=True)
        self.open, self.last_tenth = False, -1


@click.group("data")
def data_group() -> None:
    """Datasets in the real/ + fake/ folder layout."""


@data_group.command("synth", short_help="Write the proxy real/fake dataset (not DeepFake faces).")
@click.option("--out", type=PathArg, required=True, help="New folder to write real/ and fake/ into.")
@click.option("--count", type=int, default=4000, show_default=True, help="Total images (half real).")
@click.option("--seed", type=int, default=0, show_default=True, help="A different seed gives a fresh set.")
@click.option("--size", type=int, default=128, show_default=True, help="Side of the square images.")
def synth_cmd(out: Path, count: int, seed: int, size: int) -> None:
    """Write the PROXY dataset: crops of bundled photographs (real) and the same kind of crops
    regenerated through random transposed-conv generators (fake). Not DeepFake faces."""
    from secdfd.common.ml.synth import SynthConfig, prepare, synthesize

    cfg = SynthConfig(count=count, seed=seed, size=size)
    with user_errors():
        photos, source = prepare(out, cfg)  # refuses a non-empty --out before anything is printed
    if source != "scikit-image":
        instead = ("scikit-learn's two sample photographs" if source == "scikit-learn"
                   else "procedural 1/f-noise images")
        click.echo(f"note: scikit-image is not installed, so the 'real' images are crops of {instead}, not the "
                   "model card's set; for that: pip install 'secdfd[data]' (in a checkout: pip install -e '.[data]')",
                   err=True)
    with user_errors(), click.progressbar(length=count, label="synthesizing", file=sys.stderr) as bar:
        manifest = synthesize(out, cfg, bar.update, (photos, source))
    click.echo(f"wrote {count} images to {out} (photos from {manifest['source']})")


@click.command("train")
@click.option("--data", type=PathArg, required=True, help="Folder with real/ and fake/.")
@click.option("--stream", type=click.Choice(["rgb", "ycbcr"]), required=True, help="Colour stream to train.")
@click.option("--model", "arch", default="dfdnet-s", show_default=True, help="dfdnet-s or dfdnet.")
@click.option("--size", type=int, default=128, show_default=True, help="Input size (128 or 256).")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Passes over the training split.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per optimiser step.")
@click.option("--lr", type=float, default=2e-3, show_default=True, help="Peak learning rate (one-cycle).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Held-out share of files.")
@click.option("--seed", type=int, default=0, show_default=True, help="Initialisation and shuffling seed.")
@click.option("--out", type=PathArg, required=True, help="Output stream file (checkpoint: OUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from OUT.ckpt.")
@threads_option
def train_cmd(data: Path, stream: str, arch: str, size: int, epochs: int, batch_size: int, lr: float,
              val_fraction: float, seed: int, out: Path, resume: bool, threads: int) -> None:
    """Train one colour stream of DFDNet on a real/ + fake/ folder."""
    from secdfd.common.ml.train import EpochLog, TrainConfig, train

    set_threads(threads)
    cfg = TrainConfig(data=str(data), stream=stream, out=str(out), model=arch, size=size, epochs=epochs,
                      batch_size=batch_size, lr=lr, val_fraction=val_fraction, seed=seed)
    bar = ProgressLine()

    def on_epoch(e: EpochLog) -> None:
        bar.done()
        click.echo(f"epoch {e.epoch}/{epochs}: loss {e.loss:.4f} train acc {e.accuracy:.4f} "
                   f"val acc {e.val_accuracy:.4f} ({e.seconds:.0f} s)")

    t0 = time.perf_counter()
    with user_errors():
        train(cfg, resume=resume, on_step=bar.step, on_epoch=on_epoch, log=click.echo)
    click.echo(f"wrote {out} in {time.perf_counter() - t0:.0f} s")


@click.command("export", short_help="Write a deployable model file (DFDNet or your own).")
@click.option("--rgb", type=PathArg, default=None, help="Trained RGB stream (from `secdfd train`).")
@click.option("--ycbcr", type=PathArg, default=None, help="Trained YCbCr stream (from `secdfd train`).")
@click.option("--factory", metavar="FILE.py:FACTORY", default=None,
              help="Your own model instead: FACTORY() in FILE.py builds it (run here only, never by the servers).")
@click.option("--weights", type=PathArg, default=None, help="--factory's state_dict or checkpoint.")
@click.option("--size", type=int, default=None, help="--factory's input size (RGB, size x size, values in [0, 1]).")
@click.option("--outputs", type=click.Choice(["logit", "logits", "probability"]), default=None,
              help="What --factory's model returns: one logit of 'fake', two logits (real, fake), or the fake "
                   "probability.")
@click.option("--fake-index", type=int, default=1, show_default=True, help="With two logits: the index of 'fake'.")
@click.option("--name", default=None, help="The architecture's name the servers show [default: FILE's stem].")
@click.option("--calibrate", type=PathArg, default=None,
              help="Folder of face images to measure the comparison range on [default: the shipped set].")
@click.option("--out", type=PathArg, required=True, help="Deployable model file to write.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage precision of the weights (loaded as float32 either way).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (file, checksum, plan, calibration).")
@click.option("--force", is_flag=True,
              help="Allow --out in the installed package's models folder (replaces the embedded model).")
def export_cmd(rgb: Path | None, ycbcr: Path | None, factory: str | None, weights: Path | None, size: int | None,
               outputs: str | None, fake_index: int, name: str | None, calibrate: Path | None, out: Path, dtype: str,
               as_json: bool, force: bool) -> None:
    """Write one checksummed deployable file: DFDNet from two trained streams (--rgb, --ycbcr; BatchNorm
    and the YCbCr map folded, streams fused), or your own model (--factory, --weights, --size,
    --outputs): its secure plan, checked on calibration images, and its folded weights.

    Serve it with `secdfd up --model OUT`. OUT is refused inside the installed package's models folder
    (the embedded model that `secdfd up` serves by default) unless --force.
    """
    _refuse_packaged(out, force)
    if factory is not None:
        if rgb is not None or ycbcr is not None:
            raise click.UsageError("give either --factory (your own model) or --rgb and --ycbcr (DFDNet)")
        if size is None or outputs is None:
            raise click.UsageError("--factory needs --size and --outputs (logit, logits or probability)")
        _export_custom(factory, weights, size, outputs, fake_index, name, calibrate, out, dtype, as_json)
        return
    if rgb is None or ycbcr is None:
        raise click.UsageError("give --rgb and --ycbcr (DFDNet's two trained streams), or --factory FILE.py:FACTORY")
    from secdfd.common.ml.export import fuse, save_deployable
    from secdfd.common.ml.train import load_stream

    with user_errors():
        (m_rgb, meta_rgb), (m_ycc, meta_ycc) = load_stream(rgb), load_stream(ycbcr)
        if (meta_rgb["stream"], meta_ycc["stream"]) != ("rgb", "ycbcr"):
            raise click.UsageError(f"--rgb holds a {meta_rgb['stream']} stream and --ycbcr a "
                                   f"{meta_ycc['stream']} stream; pass each where it belongs")
        if meta_rgb["arch"] != meta_ycc["arch"]:
            raise click.UsageError("the two streams have different architectures")
        extra = {"training": {"rgb": meta_rgb["config"], "ycbcr": meta_ycc["config"]}}
        digest = save_deployable(fuse(m_rgb, m_ycc), out, meta_rgb["arch"], dtype, extra)
    if as_json:
        click.echo(json.dumps({"file": str(out), "arch": meta_rgb["arch"], "size": meta_rgb["size"], "sha256": digest}))
        return
    click.echo(f"wrote {out} ({meta_rgb['arch']}, {meta_rgb['size']}x{meta_rgb['size']}, sha256 {digest})")


def _refuse_packaged(out: Path, force: bool) -> None:
    """Refuse to write into the package's models folder: that would silently replace the embedded model."""
    from secdfd.common.ml.export import MODELS_DIR

    if force or not out.resolve().is_relative_to(MODELS_DIR.resolve()):
        return
    raise click.UsageError(f"{out} is in the installed package's models folder ({MODELS_DIR}), where it would "
                           "replace the embedded model that `secdfd up` serves by default; write it elsewhere "
                           "(e.g. --out runs/model.pt, then `secdfd up --model runs/model.pt`), or add --force to "
                           "replace the embedded model")


def _export_custom(factory: str, weights: Path | None, size: int, outputs: str, fake_index: int, name: str | None,
                   calibrate: Path | None, out: Path, dtype: str, as_json: bool) -> None:
    from secdfd.common.service.custom import UserModel, estimate, export_model

    with user_errors():
        done = export_model(UserModel(factory, weights, size, outputs, fake_index, name), out, calibrate, dtype)
    cal = done.calibration.as_dict()
    if as_json:
        click.echo(json.dumps({"file": str(done.path), "arch": done.arch, "size": done.size, "sha256": done.checksum,
                               "plan": estimate(done.plan), "calibration": cal, "seconds": done.seconds}))
        return
    ops = ", ".join(f"{k} {v}" for k, v in sorted(done.plan.describe().items()) if k not in ("input", "output"))
    click.echo(f"wrote {done.path} ({done.arch}, {size}x{size}, outputs {outputs} -> fake probability, "
               f"sha256 {done.checksum})")
    click.echo(f"plan: {len(done.plan.steps)} steps ({ops})")
    click.echo(f"calibration on {cal['source']}: largest compared value {cal['max_compared']:.4g} at "
               f"{cal['layer']} (exact below {cal['limit']:g}: margin {cal['margin']:.0f}x); plan vs model "
               f"{cal['plan_error']:.2g}")
    click.echo(f"next: secdfd share {done.path} --out DIR")


@click.command("eval", short_help="Accuracy, AUC, confusion matrix on a real/fake folder.")
@click.option("--data", type=PathArg, required=True, help="Folder with real/ and fake/.")
@model_file_option
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which files: the held-out split of the training folder, or all (for a fresh set).")
@click.option("--val-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
              help="Held-out share of files, as given to `secdfd train` (the split is a hash of each path).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (fused accuracy and auc at the top level).")
@threads_option
def eval_cmd(data: Path, model_path: Path | None, split: str, val_fraction: float, as_json: bool,
             threads: int) -> None:
    """Accuracy, AUC and confusion matrix of the fused detector and of each stream."""
    from secdfd.common.ml.data import load_folder
    from secdfd.common.ml.export import load_deployable, read_deployable_meta
    from secdfd.common.ml.train import evaluate

    set_threads(threads)
    with user_errors():
        meta = read_deployable_meta(model_path)
        model = load_deployable(model_path)
        images = load_folder(data, meta.size, split, val_fraction)
        report = evaluate(model, images)
    report = {**report, "split": split, "model": {"arch": meta.arch, "size": meta.size,
                                                  "file": str(model_path or "embedded default")},
              "skipped": images.skipped}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for line in images.skipped:
        click.echo(f"skipped {line}", err=True)
    click.echo(f"{report['n']} images {report['counts']} ({split} split), model {meta.arch} {meta.size}px")
    rows = [("fused", report)] + list(report["streams"].items())
    for name, r in rows:
        (tn, fp), (fn, tp) = r["confusion"]
        click.echo(f"{name:>6}: accuracy {r['accuracy']:.4f}  auc {r['auc']:.4f}  "
                   f"confusion [real->real {tn}, real->fake {fp}; fake->real {fn}, fake->fake {tp}]")


@click.command("detect", short_help="The plaintext reference of `secdfd-client detect` (files, folders).")
@click.argument("paths", metavar="FILE|FOLDER...", nargs=-1, required=True, type=PathArg)
@click.option("--plain", is_flag=True, hidden=True, help="Accepted for older scripts; this command is plaintext.")
@model_file_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per file (JSON Lines), the fields of `secdfd-client detect --json`.")
@click.option("--no-crop", is_flag=True,
              help="Each image is a face crop already: detect the whole image once (no face search).")
@click.option("--margin", type=click.FloatRange(min=1.0), default=MARGIN, show_default=True,
              help="Face crop: a square of MARGIN x the face box's larger side around its centre.")
@click.option("--min-face", type=click.IntRange(min=12), default=MIN_FACE, show_default=True,
              help="Smallest face searched for (pixels); smaller images are refused.")
@click.option("--face-score", type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), default=SCORE,
              show_default=True, help="Face detector probability needed to report a face.")
@click.option("--frames", type=click.IntRange(min=1), default=16, show_default=True,
              help="Frames per video, evenly spaced.")
@threads_option
def detect_cmd(paths: tuple[Path, ...], plain: bool, model_path: Path | None, as_json: bool, no_crop: bool,
               margin: float, min_face: int, face_score: float, frames: int, threads: int) -> None:
    """The plaintext reference of `secdfd-client detect`: the same files, folders, face search, crops
    and output, with the model run here in plaintext (the model file's owner sees the images).

    Results agree with the private detection within its error (1e-3 on the fake probability). The
    secure figures (seconds online, bytes, rounds) are 0: nothing is sent. Private detection, where
    no server sees the image, is `secdfd-client detect`. Exit status 1 if any file failed.
    """
    from secdfd.common.ml.analyse import Settings, collect
    from secdfd.common.ml.report import human
    from secdfd.common.service.custom import load_reference

    del plain  # the command is plaintext either way
    set_threads(threads)
    with user_errors():
        model, _, size = load_reference(model_path)  # DFDNet, or a user's model as its plan
    files, refused = collect(paths)
    analyser = Analyser(_plaintext(model), size, Settings(not no_crop, margin, min_face, face_score, frames))
    failed = 0
    for r in _results(analyser, files, refused):  # printed as each file is done
        if "error" in r:
            failed += 1
            why, name = str(r["error"]), str(r["file"])
            click.echo(f"Error: {why}" if why.startswith(name) else f"Error: {name}: {why}", err=True)
        if as_json:
            click.echo(json.dumps(r))
        elif "error" not in r:
            for line in human(r, figures=False):
                click.echo(line)
    if failed:
        sys.exit(1)


def _results(analyser: Analyser, files: list[Path], refused: list[tuple[Path, str]]) -> Iterator[dict[str, Any]]:
    """The refused paths as {file, error}, then each file's result (or {file, error})."""
    for path, why in refused:
        yield {"file": str(path), "error": why}
    for path in files:
        try:
            yield analyser.file(path)
        except SecDFDError as e:
            yield {"file": str(path), "error": str(e)}


def _plaintext(model: torch.nn.Module) -> Callable[[torch.Tensor, str], dict[str, Any]]:
    """The plaintext model behind the secure step's interface: the same fields as
    `Client.detect_tensor`, its figures 0 (no server, no bytes, no rounds)."""

    def detect(x: torch.Tensor, name: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        with torch.no_grad():
            p_fake = float(model(x).reshape(-1)[0])
        return {"file": name, "verdict": roster.verdict(p_fake), "p_fake": p_fake,
                "seconds": time.perf_counter() - t0, "online_seconds": 0.0, "bytes_per_server": [0, 0], "rounds": 0,
                "offline_seconds": 0.0, "dealer_seconds": 0.0, "prepare_seconds": [0.0, 0.0], "dealer_bytes": 0,
                "request": None}

    return detect
