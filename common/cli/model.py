"""Commands of the model area: `data synth`, `train`, `eval`, `detect --plain`, `export`.

Without `--model`, commands use the embedded default (common/models/dfdnet-s.pt). User mistakes
(missing folders, bad images, unknown names, corrupt model files) end as one-line click errors,
never as tracebacks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
import torch

from secdfd.common import roster
from secdfd.common.errors import SecDFDError

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


@data_group.command("synth")
@click.option("--out", type=PathArg, required=True, help="New folder to write real/ and fake/ into.")
@click.option("--count", type=int, default=4000, show_default=True, help="Total images (half real).")
@click.option("--seed", type=int, default=0, show_default=True, help="A different seed gives a fresh set.")
@click.option("--size", type=int, default=128, show_default=True, help="Side of the square images.")
def synth_cmd(out: Path, count: int, seed: int, size: int) -> None:
    """Write the PROXY dataset: crops of bundled photographs (real) and the same kind of crops
    regenerated through random transposed-conv generators (fake). Not DeepFake faces."""
    from secdfd.common.ml.synth import SynthConfig, synthesize

    with user_errors(), click.progressbar(length=count, label="synthesizing") as bar:
        manifest = synthesize(out, SynthConfig(count=count, seed=seed, size=size), bar.update)
    click.echo(f"wrote {count} images to {out} (photos from {manifest['source']})")
    if manifest["source"] == "procedural":
        click.echo("note: scikit-image is not installed, so 'real' images are procedural 1/f noise; "
                   "pip install 'secdfd[data]' for photographs", err=True)


@click.command("train")
@click.option("--data", type=PathArg, required=True, help="Folder with real/ and fake/.")
@click.option("--stream", type=click.Choice(["rgb", "ycbcr"]), required=True, help="Colour stream to train.")
@click.option("--model", "arch", default="dfdnet-s", show_default=True, help="dfdnet-s or dfdnet.")
@click.option("--size", type=int, default=128, show_default=True, help="Input size (128 or 256).")
@click.option("--epochs", type=int, default=8, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
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


@click.command("export")
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
def export_cmd(rgb: Path | None, ycbcr: Path | None, factory: str | None, weights: Path | None, size: int | None,
               outputs: str | None, fake_index: int, name: str | None, calibrate: Path | None, out: Path, dtype: str,
               as_json: bool) -> None:
    """Write one checksummed deployable file: DFDNet from two trained streams (--rgb, --ycbcr; BatchNorm
    and the YCbCr map folded, streams fused), or your own model (--factory, --weights, --size,
    --outputs): its secure plan, checked on calibration images, and its folded weights."""
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


@click.command("eval")
@click.option("--data", type=PathArg, required=True, help="Folder with real/ and fake/.")
@model_file_option
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="Which files: the held-out split of the training folder, or all (for a fresh set).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True)
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


@click.command("detect")
@click.argument("image", type=PathArg)
@click.option("--plain", is_flag=True, help="Run the plaintext fused model locally (the reference).")
@model_file_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON with keys verdict and p_fake.")
@threads_option
def detect_cmd(image: Path, plain: bool, model_path: Path | None, as_json: bool, threads: int) -> None:
    """Fake probability of one face image with the plaintext model (`--plain`).

    Private detection, where no server sees the image, is `secdfd-client detect`.
    """
    from secdfd.common.ml.data import load_image
    from secdfd.common.service.custom import load_reference

    if not plain:
        raise click.UsageError("this command runs the plaintext reference only: add --plain; "
                               "for private detection use `secdfd-client detect`")
    set_threads(threads)
    with user_errors():
        model, _, size = load_reference(model_path)  # DFDNet, or a user's model as its plan
        x = load_image(image, size)
        with torch.no_grad():
            p_fake = float(model(x).reshape(-1)[0])
    verdict = roster.verdict(p_fake)
    if as_json:
        click.echo(json.dumps({"verdict": verdict, "p_fake": p_fake, "image": str(image)}))
    else:
        click.echo(f"{image}: {verdict} (p_fake {p_fake:.4f})")


