"""Training one colour stream of DFDNet, and evaluating the fused detector.

Training: AdamW with a one-cycle learning rate, cross-entropy on the two logits, augmentations from
`secdfd.common.ml.data.Augment`, the YCbCr stream fed `rgb_to_ycbcr` of the RGB batch. After every
epoch a checkpoint (model, optimizer, schedule, epoch) goes to OUT.ckpt so `--resume` continues
where a run stopped; at the end OUT holds the stream's weights and metadata (plain tensors and
JSON-able values, loadable with weights_only=True).

Evaluation: accuracy, ROC AUC and the confusion matrix at threshold 0.5, for the fused probability
and for each stream's own fake probability.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from secdfd.common.errors import ModelError
from secdfd.common.ml.data import Augment, ImageSet, batches, load_folder
from secdfd.common.ml.dfdnet import STREAMS, DFDNet, FusedDFDNet, build_model, get_spec, stream_input

STREAM_FORMAT = "secdfd-stream"
FORMAT_VERSION = 1

StepHook = Callable[[int, int, int, float, float], None]  # (epoch, seen, total, loss, accuracy)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (parsed once at the command line)."""

    data: str
    stream: str
    out: str
    model: str = "dfdnet-s"
    size: int = 128
    epochs: int = 8
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0
    augment: Augment = field(default_factory=Augment)

    def validate(self) -> None:
        """Raise ModelError for values no run can use."""
        if self.stream not in STREAMS:
            raise ModelError(f"unknown stream {self.stream!r}; known: {', '.join(STREAMS)}")
        get_spec(self.model)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ModelError("epochs, batch size and learning rate must be positive")


@dataclass
class EpochLog:
    """One epoch's training loss/accuracy and validation accuracy."""

    epoch: int
    loss: float
    accuracy: float
    val_accuracy: float
    seconds: float


def checkpoint_path(out: str | Path) -> Path:
    """Where a run's resumable checkpoint lives."""
    return Path(str(out) + ".ckpt")


def train(cfg: TrainConfig, resume: bool = False, on_step: StepHook | None = None,
          on_epoch: Callable[[EpochLog], None] | None = None, log: Callable[[str], None] = print) -> DFDNet:
    """Train one stream; write OUT.ckpt after each epoch and OUT at the end. Returns the model."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    train_set = load_folder(cfg.data, cfg.size, "train", cfg.val_fraction, cfg.split_seed)
    val_set = load_folder(cfg.data, cfg.size, "val", cfg.val_fraction, cfg.split_seed)
    for line in train_set.skipped:
        log(f"skipped {line}")
    log(f"train {len(train_set)} {train_set.counts()}, val {len(val_set)} {val_set.counts()}")
    model = build_model(cfg.model, cfg.size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = math.ceil(len(train_set) / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.lr, total_steps=cfg.epochs * steps,
                                                   pct_start=0.15)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = checkpoint_path(cfg.out)
    if resume:
        if not ckpt.exists():
            raise ModelError(f"{ckpt}: no checkpoint to resume from; run without --resume")
        state = torch.load(ckpt, weights_only=True)
        if state["config"] != _config_dict(cfg):
            raise ModelError(f"{ckpt} was written with different options; use the same ones to resume")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start, history = state["epoch"], state["history"]
        log(f"resuming after epoch {start}")
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start, cfg.epochs):
        t0 = time.perf_counter()
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        seen, loss_sum, correct = 0, 0.0, 0
        for x, y in batches(train_set, cfg.batch_size, rng, cfg.augment, drop_lone=True):
            logits = model(stream_input(x, cfg.stream))
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            n = len(y)
            batch_correct = int((logits.argmax(1) == y).sum())
            seen, loss_sum, correct = seen + n, loss_sum + loss.item() * n, correct + batch_correct
            if on_step is not None:
                on_step(epoch, seen, len(train_set), loss_sum / seen, correct / seen)
        probs = stream_probs(model, cfg.stream, val_set)
        entry = EpochLog(epoch + 1, loss_sum / seen, correct / seen,
                         accuracy(probs, val_set.labels), time.perf_counter() - t0)
        history.append(asdict(entry))
        torch.save({"config": _config_dict(cfg), "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "epoch": epoch + 1, "history": history}, ckpt)
        if on_epoch is not None:
            on_epoch(entry)
    save_stream(model, cfg, history)
    return model


def _config_dict(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["augment"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["augment"].items()}
    d.pop("out")
    return d


def save_stream(model: DFDNet, cfg: TrainConfig, history: list[dict[str, float]]) -> None:
    """Write a trained stream: state dict plus architecture, stream and training metadata."""
    meta = {"format": STREAM_FORMAT, "version": FORMAT_VERSION, "arch": cfg.model,
            "width": model.width, "size": model.input_size, "stream": cfg.stream,
            "config": _config_dict(cfg), "history": history}
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"meta": meta, "state_dict": model.state_dict()}, cfg.out)


def load_stream(path: str | Path) -> tuple[DFDNet, dict[str, Any]]:
    """A stream written by `train` (unfolded, eval mode) and its metadata."""
    try:
        payload = torch.load(path, weights_only=True)
        meta = payload["meta"]
        if meta.get("format") != STREAM_FORMAT:
            raise KeyError("format")
    except FileNotFoundError:
        raise ModelError(f"{path}: no such file") from None
    except (KeyError, TypeError, RuntimeError, OSError, EOFError) as e:
        raise ModelError(f"{path}: not a trained stream file from `secdfd train` ({e})") from None
    model = build_model(meta["arch"], meta["size"])
    model.load_state_dict(payload["state_dict"])
    return model.eval(), meta


# --- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def stream_probs(model: DFDNet, stream: str, data: ImageSet, batch_size: int = 64) -> torch.Tensor:
    """Fake probabilities (N,) of one unfolded stream on an image set (softmax of its logits)."""
    was_training = model.training
    model.eval()
    out = [torch.softmax(model(stream_input(x, stream)), 1)[:, 1] for x, _ in batches(data, batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def fused_probs(model: FusedDFDNet, data: ImageSet, batch_size: int = 64) -> torch.Tensor:
    """(N, 3) fake probabilities: fused, RGB stream, YCbCr stream."""
    rows = []
    for x, _ in batches(data, batch_size):
        streams = model.stream_probs(x)
        rows.append(torch.cat([model.fuse_probs(streams), streams], dim=1))
    return torch.cat(rows)


def accuracy(p_fake: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of correct verdicts at threshold 0.5 (fake if p >= 0.5)."""
    return float(((p_fake >= 0.5).long() == labels).double().mean())


def roc_auc(scores: Iterable[float], labels: Iterable[int]) -> float:
    """Area under the ROC curve: P(score of a fake > score of a real), ties counting one half."""
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(labels), dtype=np.int64)
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return float((ranks[y == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def confusion(p_fake: torch.Tensor, labels: torch.Tensor) -> list[list[int]]:
    """[[real as real, real as fake], [fake as real, fake as fake]] at threshold 0.5."""
    pred = (p_fake >= 0.5).long()
    return [[int(((labels == t) & (pred == p)).sum()) for p in (0, 1)] for t in (0, 1)]


def metrics(p_fake: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """Accuracy, AUC and confusion matrix of one set of fake probabilities."""
    return {"accuracy": accuracy(p_fake, labels), "auc": roc_auc(p_fake.tolist(), labels.tolist()),
            "confusion": confusion(p_fake, labels)}


def evaluate(model: FusedDFDNet, data: ImageSet) -> dict[str, Any]:
    """Fused metrics at the top level (accuracy, auc, confusion), per-stream ones under `streams`."""
    probs = fused_probs(model, data)
    report = metrics(probs[:, 0], data.labels)
    report["n"] = len(data)
    report["counts"] = data.counts()
    report["streams"] = {name: metrics(probs[:, i + 1], data.labels) for i, name in enumerate(STREAMS)}
    return report
