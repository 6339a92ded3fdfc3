"""One epoch of training and one pass of evaluation: tensors and iterables in, statistics out.

    result = train_one_epoch(model, samples, optimizer, scaler, guard, device, tcfg, ...)
    stats, preds = evaluate(model, dataset, device, tcfg, batch_size)

The loop never sees a bucket: `fit` (tasks.train.fit) hands it an iterator of samples and saves
what it returns. The memory guard picks each batch's size; a CUDA out-of-memory error splits the
batch and retries the step. Every `training.log_every` steps (and at every guard event) one
step-log row is logged and returned.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from config.schema import TrainingConfig
from tasks.data.shards import batches
from tasks.errors import DataError
from tasks.evaluate.inference import Predictions, collect, infer
from tasks.train.average import WeightAverage
from tasks.train.memory import MemoryGuard
from tasks.train.objective import Objective

log = logging.getLogger(__name__)


@dataclass
class EpochStats:
    """One split's averages over one epoch."""

    bce: float
    consistency: float
    loss: float
    accuracy: float
    samples: int
    seconds: float
    emotion: float = 0.0
    file: float = 0.0  # the per-modality heads' BCE (0 when training.file_label_weight is 0)

    @classmethod
    def from_sums(cls, sums: np.ndarray, n: int, seconds: float) -> EpochStats:
        """From per-sample sums (bce, consistency, emotion, file, loss, correct); plain floats,
        so that checkpoints holding them still load with `weights_only=True`."""
        bce, consistency, emotion, file, loss, correct = (float(v) / n for v in sums)
        return cls(bce, consistency, loss, correct, n, float(seconds), emotion, file)

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


@dataclass
class EpochResult:
    """What `train_one_epoch` returns: averages, the step-log rows, where the step count ended."""

    stats: EpochStats
    steps: list[dict[str, Any]]
    last_step: int
    batch_size: int  # at the end of the epoch (after any shrink)
    memory_percent: float  # highest reading of the epoch


# --------------------------------------------------------------------------------------------
# one epoch


def learning_rate(tcfg: TrainingConfig, progress: float) -> float:
    """The learning rate at `progress` in [0, 1] of the whole run: linear warm-up over
    `warmup_fraction`, then cosine decay to 0 (`schedule: cosine`) or flat (`constant`). A pure
    function of progress, so a resumed run continues the same curve whatever its batch sizes."""
    peak, warm = tcfg.learning_rate, tcfg.warmup_fraction
    progress = min(max(progress, 0.0), 1.0)
    if warm > 0 and progress < warm:
        return peak * (progress + 1e-3) / (warm + 1e-3)
    if tcfg.schedule == "constant":
        return peak
    decayed = (progress - warm) / max(1.0 - warm, 1e-9)
    return peak * 0.5 * (1.0 + math.cos(math.pi * decayed))


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    objective: Objective,
    grad_clip: float | None = None,
    amp: bool = False,
) -> tuple[float, float, float, float, float, int]:
    """One optimizer step; returns (bce, consistency, emotion, file, loss, correct
    predictions)."""
    audio = batch["audio"].to(device, non_blocking=True)  # (B, 1, M, T)
    image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    label = batch["label"].to(device, non_blocking=True)  # (B,)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        out = model(audio, image)
    parts = objective(out, batch, device)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(parts.total).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    correct = int(((out.logit.detach() >= 0).float() == label).sum())
    return (
        parts.bce.item(),
        parts.consistency.item(),
        parts.emotion.item(),
        0.0 if parts.file is None else parts.file.item(),
        parts.total.item(),
        correct,
    )


def split_batch(batch: dict[str, Any], size: int) -> list[dict[str, Any]]:
    """Cut a batch into batches of `size` (a remainder of one sample joins the last batch)."""
    n = len(batch["label"])
    starts = list(range(0, n, size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    bounds = [*starts, n]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in itertools.pairwise(bounds)]


def train_one_epoch(
    model: nn.Module,
    samples: Iterator[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    guard: MemoryGuard,
    device: torch.device,
    tcfg: TrainingConfig,
    objective: Objective,
    *,
    fusion: str,
    epoch: int,
    step: int = 0,
    amp: bool = False,
    n_train: int | None = None,
    average: WeightAverage | None = None,
) -> EpochResult:
    """Train over `samples` once, in batches whose size the guard picks before each batch; the
    learning rate follows `learning_rate` over the run (`n_train`: samples per epoch); the
    weight `average`, if any, is updated after every step."""
    model.train()
    started = time.perf_counter()
    totals = np.zeros(6)  # bce, consistency, emotion, file, loss (each x n), correct
    n_seen = 0
    rows: list[dict[str, Any]] = []
    window = _Window()
    peak_memory = 0.0
    event = guard.check()  # before the first batch; later checks end each iteration
    fetched = time.perf_counter()
    for batch in batches(samples, lambda: guard.batch_size):
        window.data_s += time.perf_counter() - fetched
        peak_memory = max(peak_memory, guard.reading)
        if len(batch["label"]) < 2:  # the epoch's last sample alone: BatchNorm cannot train on it
            log.debug("%s epoch %d: one trailing sample left out of this epoch", fusion, epoch)
            continue
        pending = [batch]
        while pending:
            part = pending.pop(0)
            n = len(part["label"])
            if n_train:
                done = (epoch - 1 + min(n_seen / n_train, 1.0)) / tcfg.epochs
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(tcfg, done)
            try:
                bce, cons, emo, file, loss, correct = train_step(
                    model, part, optimizer, scaler, device, objective, tcfg.grad_clip, amp
                )
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                smaller = guard.on_oom(n)
                if smaller is None:
                    raise
                pending = split_batch(part, smaller) + pending
                event = "oom"
                continue
            step += 1
            n_seen += n
            if average is not None:
                average.update()
            totals += (bce * n, cons * n, emo * n, file * n, loss * n, correct)
            window.add(n, bce, cons, loss)
            if step % tcfg.log_every == 0 or event is not None:
                row = window.row(fusion, epoch, step, guard, event)
                rows.append(row)
                log_step(row, optimizer)
                window = _Window()
                event = None
        event = guard.check() or event  # before the next batch is assembled
        fetched = time.perf_counter()
    if n_seen == 0:
        raise DataError(f"{fusion} epoch {epoch}: the train split gave no batch of 2 or more")
    stats = EpochStats.from_sums(totals, n_seen, time.perf_counter() - started)
    return EpochResult(stats, rows, step, guard.batch_size, max(peak_memory, guard.reading))


class _Window:
    """Averages since the last step-log row."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.data_s = 0.0
        self.n = 0
        self.sums = np.zeros(3)  # bce, consistency, loss (x n)

    def add(self, n: int, bce: float, cons: float, loss: float) -> None:
        self.n += n
        self.sums += (bce * n, cons * n, loss * n)

    def row(
        self, fusion: str, epoch: int, step: int, guard: MemoryGuard, event: str | None
    ) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        bce, cons, loss = (self.sums / max(self.n, 1)).tolist()
        return {
            "fusion": fusion,
            "epoch": epoch,
            "step": step,
            "time": time.time(),
            "batch_size": guard.batch_size,
            "memory_percent": guard.reading,
            "samples_per_s": self.n / elapsed if elapsed > 0 else 0.0,
            "bce": bce,
            "consistency": cons,
            "loss": loss,
            "event": event,
            "data_s": self.data_s,
        }


def log_step(row: dict[str, Any], optimizer: torch.optim.Optimizer) -> None:
    log.info(
        "%s epoch %d step %d: bce %.4f consistency %.4f lr %.2g batch %d %.1f samples/s "
        "data %.2fs memory %.1f%%%s",
        row["fusion"],
        row["epoch"],
        row["step"],
        row["bce"],
        row["consistency"],
        optimizer.param_groups[0]["lr"],
        row["batch_size"],
        row["samples_per_s"],
        row["data_s"],
        row["memory_percent"],
        f" ({row['event']})" if row["event"] else "",
    )


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    device: torch.device,
    objective: Objective,
    batch_size: int,
    *,
    amp: bool = False,
    expected: int | None = None,
) -> tuple[EpochStats, Predictions]:
    """Losses and accuracy over `dataset` (no gradients), and the per-sample predictions."""
    started = time.perf_counter()
    parts = []
    totals = np.zeros(6)  # bce, consistency, emotion, file, loss (each x n), correct
    for batch, out in infer(model, dataset, device, batch_size, amp):
        label = batch["label"].to(device)
        n = len(label)
        loss = objective(out, batch, device)
        correct = float(((out.logit >= 0).float() == label).sum())
        totals += (
            float(loss.bce) * n,
            float(loss.consistency) * n,
            float(loss.emotion) * n,
            0.0 if loss.file is None else float(loss.file) * n,
            float(loss.total) * n,
            correct,
        )
        parts.append((batch, out))
    preds = collect(parts)
    n = len(preds.label)
    if expected is not None and n != expected:
        log.warning("evaluated %d samples but the split should hold %d", n, expected)
    stats = EpochStats.from_sums(totals, n, time.perf_counter() - started)
    return stats, preds
