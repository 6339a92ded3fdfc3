"""Training one fusion model, resumable, with everything it produces written to the bucket.

`fit` reads top to bottom: data -> model -> resume from the newest checkpoint in the bucket ->
per epoch `train_one_epoch`, `evaluate` on the validation split, save -> the best model.

Per epoch, in this order (a crash anywhere loses at most the epoch in progress):
1. when validation loss improved: `model.pt` and the emotion vectors of the validation split;
2. `checkpoints/epoch-N.pt` (model, optimizer, grad scaler, epoch, batch size, RNG states, best so
   far, the epoch and step history): once it lands the epoch is done and never redone;
3. the epoch log, step log and losses.csv, rewritten from the history (a resume rewrites them too).

Every file is a `torch.save` of plain dicts, lists, numbers, strings and tensors, so
`torch.load(..., weights_only=True)` reads it; anything else is refused with `CheckpointError`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import Tensor, nn

from config.schema import PipelineConfig
from models import FUSIONS, FusionOutput, build_model, consistency_loss
from models.image import load_resnet_weights, resnet_trunk
from tasks.data.shards import DeepfakeDataset, batches
from tasks.errors import CheckpointError, ConfigError, DataError, ObjectNotFound
from tasks.evaluate.inference import Predictions, collect, infer, pick_device
from tasks.io.layout import Layout
from tasks.io.storage import Storage, open_storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.train.memory import (
    MemoryGuard,
    MemoryReader,
    estimate_batch_size,
    estimate_sample_bytes,
    monitor_memory,
    total_memory_bytes,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of model.pt and checkpoints/epoch-N.pt
CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.pt")
LOSSES_COLUMNS = ("fusion", "epoch", "split", "bce", "consistency", "total", "accuracy")
ARCHITECTURE_KEYS = ("embedding_dim", "late_fusion_rule")  # a checkpoint must match these
_losses_lock = threading.Lock()  # fusions trained in threads of one process share losses.csv


@dataclass
class EpochStats:
    """One split's averages over one epoch."""

    bce: float
    consistency: float
    loss: float
    accuracy: float
    samples: int
    seconds: float

    @classmethod
    def from_sums(cls, sums: np.ndarray, n: int, seconds: float) -> EpochStats:
        """From per-sample sums (bce, consistency, loss, correct); plain floats, so that
        checkpoints holding them still load with `weights_only=True`."""
        bce, consistency, loss, correct = (float(v) / n for v in sums)
        return cls(bce, consistency, loss, correct, n, float(seconds))

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


@dataclass
class TrainState:
    """Progress that a checkpoint carries from one attempt to the next."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_size: int | None = None  # each epoch's starting batch size (None: not yet estimated)
    best_val_loss: float | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch-log rows
    steps: list[dict[str, Any]] = field(default_factory=list)  # step-log rows
    resumed_from: int | None = None


# --------------------------------------------------------------------------------------------
# fit


def fit(
    cfg: PipelineConfig,
    features: FeatureRef,
    fusion: str,
    run: str,
    *,
    read_memory: MemoryReader = monitor_memory,
) -> TrainedRef:
    """Train `fusion` on `features` for `training.epochs`, resuming from the newest checkpoint of
    this fusion and run; returns where the best model is. `read_memory` feeds the memory guard."""
    tcfg = cfg.training
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    if tcfg.batch_size < cfg.memory.min_batch_size:
        raise ConfigError(
            f"training.batch_size ({tcfg.batch_size}) is below memory.min_batch_size "
            f"({cfg.memory.min_batch_size})"
        )
    store = open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    device = pick_device(tcfg.device, "training.device")
    amp = device.type == "cuda" and tcfg.mixed_precision
    train_data, val_data = make_datasets(cfg, features)

    seed_everything(cfg.run.seed)
    model = build_model(fusion, cfg, read_image_weights(cfg, store)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    state = resume(store, layout, cfg, fusion, run, model, optimizer, scaler)
    guard = make_guard(cfg, model, state, read_memory)
    state.batch_size = guard.initial
    if state.epoch:
        write_logs(store, layout, fusion, run, state)  # in case the crash came before they landed
    log.info(
        "training %s on %s (%d train / %d val pairs), epochs %d-%d, batch %d, %s%s",
        fusion,
        device,
        len(train_data),
        len(val_data),
        state.epoch + 1,
        tcfg.epochs,
        guard.initial,
        "mixed precision" if amp else "float32",
        f", resumed after epoch {state.epoch}" if state.epoch else "",
    )

    for epoch in range(state.epoch + 1, tcfg.epochs + 1):
        started = time.perf_counter()
        guard.start_epoch()
        train_data.set_epoch(epoch)
        result = train_one_epoch(
            model,
            iter(train_data),
            optimizer,
            scaler,
            guard,
            device,
            tcfg,
            fusion=fusion,
            epoch=epoch,
            step=state.step,
            amp=amp,
        )
        val, preds = evaluate(
            model, val_data, device, tcfg, guard.batch_size, amp=amp, expected=len(val_data)
        )
        record = epoch_record(fusion, epoch, result, val, time.perf_counter() - started)
        state.epoch, state.step = epoch, result.last_step
        state.history.append(record)
        state.steps.extend(result.steps)
        if state.best_val_loss is None or val.loss < state.best_val_loss:
            state.best_val_loss, state.best_epoch = val.loss, epoch
            save_model(store, layout.model(fusion, run), model, cfg, fusion, epoch, val.loss)
            save_emotion_vectors(store, layout.emotion_vectors(fusion, run), preds, epoch)
        save_checkpoint(store, layout, cfg, fusion, run, model, optimizer, scaler, state)
        write_logs(store, layout, fusion, run, state)
        log_epoch(record, tcfg.epochs, best=state.best_epoch == epoch)

    if state.best_val_loss is None or not store.exists(layout.model(fusion, run)):
        raise CheckpointError(
            f"{store.uri(layout.model(fusion, run))}: best model of epoch {state.best_epoch} is "
            "missing although its checkpoint exists; train again under a new run id"
        )
    return TrainedRef(
        fusion=fusion,
        run=run,
        model_key=layout.model(fusion, run),
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        resumed_from=state.resumed_from,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def make_datasets(
    cfg: PipelineConfig, features: FeatureRef
) -> tuple[DeepfakeDataset, DeepfakeDataset]:
    """Train (shuffled per epoch) and validation datasets; refuses splits that cannot train."""
    sizes = {}
    for split in ("train", "val"):
        counts = features.counts.get(split, {})
        sizes[split] = sum(counts.values())
        if not features.shards.get(split) or sizes[split] == 0:
            raise DataError(f"{features.prefix}: the {split} split has no feature shards or pairs")
    train_counts = features.counts["train"]
    if not (train_counts.get("real", 0) and train_counts.get("fake", 0)):
        raise DataError(
            f"{features.prefix}: the train split needs real and fake pairs, has {train_counts}"
        )
    train = DeepfakeDataset(
        cfg.storage,
        features.shards["train"],
        shuffle=True,
        seed=cfg.run.seed,
        n_samples=sizes["train"],
    )
    val = DeepfakeDataset(cfg.storage, features.shards["val"], n_samples=sizes["val"])
    return train, val


def make_guard(
    cfg: PipelineConfig, model: nn.Module, state: TrainState, read_memory: MemoryReader
) -> MemoryGuard:
    """The memory guard; a fresh run estimates its batch size, a resumed one keeps its own."""
    sample_bytes = estimate_sample_bytes(model, cfg.data)
    total = total_memory_bytes()
    batch = state.batch_size
    if batch is None:
        reading = read_memory()
        batch = estimate_batch_size(
            cfg.training.batch_size, sample_bytes, reading, total, cfg.memory
        )
        if batch < cfg.training.batch_size:
            log.warning(
                "memory %.1f%% in use, %.1f MB per sample: starting at batch size %d instead of %d",
                reading,
                sample_bytes / 2**20,
                batch,
                cfg.training.batch_size,
            )
    return MemoryGuard(
        cfg.memory, batch, sample_bytes=sample_bytes, read_memory=read_memory, total_bytes=total
    )


# --------------------------------------------------------------------------------------------
# one epoch


def compute_loss(out: FusionOutput, label: Tensor, tcfg: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(bce, consistency, total) with total = bce + consistency_weight x consistency."""
    bce = F.binary_cross_entropy_with_logits(out.logit.float(), label)
    consistency = consistency_loss(out.audio_emb, out.image_emb, label, tcfg.consistency_margin)
    if tcfg.consistency_weight == 0:
        return bce, consistency, bce
    return bce, consistency, bce + tcfg.consistency_weight * consistency


def train_step(
    model: nn.Module,
    batch: dict[str, Any],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    tcfg: Any,
    amp: bool = False,
) -> tuple[float, float, float, int]:
    """One optimizer step; returns (bce, consistency, loss, correct predictions)."""
    audio = batch["audio"].to(device, non_blocking=True)  # (B, 1, M, T)
    image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
    label = batch["label"].to(device, non_blocking=True)  # (B,)
    with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
        out = model(audio, image)
    bce, consistency, loss = compute_loss(out, label, tcfg)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    correct = int(((out.logit.detach() >= 0).float() == label).sum())
    return bce.item(), consistency.item(), loss.item(), correct


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
    tcfg: Any,
    *,
    fusion: str,
    epoch: int,
    step: int = 0,
    amp: bool = False,
) -> EpochResult:
    """Train over `samples` once, in batches whose size the guard picks before each batch."""
    model.train()
    started = time.perf_counter()
    totals = np.zeros(4)  # bce x n, consistency x n, loss x n, correct
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
            try:
                bce, cons, loss, correct = train_step(
                    model, part, optimizer, scaler, device, tcfg, amp
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
            totals += (bce * n, cons * n, loss * n, correct)
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
# evaluation and prediction


def evaluate(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    device: torch.device,
    tcfg: Any,
    batch_size: int,
    *,
    amp: bool = False,
    expected: int | None = None,
) -> tuple[EpochStats, Predictions]:
    """Losses and accuracy over `dataset` (no gradients), and the per-sample predictions."""
    started = time.perf_counter()
    parts = []
    totals = np.zeros(4)  # bce x n, consistency x n, loss x n, correct
    for batch, out in infer(model, dataset, device, batch_size, amp):
        label = batch["label"].to(device)
        n = len(label)
        bce, cons, loss = compute_loss(out, label, tcfg)
        correct = float(((out.logit >= 0).float() == label).sum())
        totals += (float(bce) * n, float(cons) * n, float(loss) * n, correct)
        parts.append((batch, out))
    preds = collect(parts)
    n = len(preds.label)
    if expected is not None and n != expected:
        log.warning("evaluated %d samples but the split should hold %d", n, expected)
    stats = EpochStats.from_sums(totals, n, time.perf_counter() - started)
    return stats, preds


# --------------------------------------------------------------------------------------------
# logs and intermediates


def epoch_record(
    fusion: str, epoch: int, result: EpochResult, val: EpochStats, seconds: float
) -> dict[str, Any]:
    """One epoch-log row (the contract the evaluation plots read)."""
    train = result.stats
    return {
        "fusion": fusion,
        "epoch": epoch,
        "train_loss": train.loss,
        "train_bce": train.bce,
        "train_consistency": train.consistency,
        "train_acc": train.accuracy,
        "val_loss": val.loss,
        "val_bce": val.bce,
        "val_consistency": val.consistency,
        "val_acc": val.accuracy,
        "samples_per_s": train.samples_per_s,
        "batch_size": result.batch_size,
        "memory_percent": result.memory_percent,
        "seconds": seconds,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def log_epoch(record: dict[str, Any], epochs: int, best: bool) -> None:
    log.info(
        "%s epoch %d/%d: train loss %.4f (bce %.4f, consistency %.4f) acc %.3f | val loss %.4f "
        "(bce %.4f, consistency %.4f) acc %.3f | %.1f samples/s, batch %d, memory %.1f%%, "
        "%.1f s%s",
        record["fusion"],
        record["epoch"],
        epochs,
        record["train_loss"],
        record["train_bce"],
        record["train_consistency"],
        record["train_acc"],
        record["val_loss"],
        record["val_bce"],
        record["val_consistency"],
        record["val_acc"],
        record["samples_per_s"],
        record["batch_size"],
        record["memory_percent"],
        record["seconds"],
        " (best so far)" if best else "",
    )


def _json_lines(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def write_logs(store: Storage, layout: Layout, fusion: str, run: str, state: TrainState) -> None:
    """Rewrite the epoch log, the step log and this fusion's rows of losses.csv."""
    store.write_bytes(
        layout.epoch_log(fusion, run), _json_lines(state.history), "application/jsonl"
    )
    store.write_bytes(
        layout.step_log(fusion, run),
        _json_lines({k: v for k, v in row.items() if k != "data_s"} for row in state.steps),
        "application/jsonl",
    )
    update_losses(store, layout.losses(run), fusion, state.history)


def update_losses(store: Storage, key: str, fusion: str, history: list[dict[str, Any]]) -> None:
    """Replace `fusion`'s rows of the run's losses.csv (one CSV for every fusion) by `history`."""
    with _losses_lock:
        try:
            text = store.read_bytes(key).decode()
            kept = [r for r in csv.DictReader(io.StringIO(text)) if r["fusion"] != fusion]
        except ObjectNotFound:
            kept = []
        rows: list[dict[str, Any]] = list(kept)
        for rec in history:
            for split in ("train", "val"):
                rows.append(
                    {
                        "fusion": fusion,
                        "epoch": rec["epoch"],
                        "split": split,
                        "bce": rec[f"{split}_bce"],
                        "consistency": rec[f"{split}_consistency"],
                        "total": rec[f"{split}_loss"],
                        "accuracy": rec[f"{split}_acc"],
                    }
                )
        rows.sort(key=lambda r: (str(r["fusion"]), int(r["epoch"]), str(r["split"])))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=LOSSES_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        store.write_bytes(key, out.getvalue().encode(), "text/csv")


def rebuild_losses(store: Storage, layout: Layout, run: str, fusions: Iterable[str]) -> str:
    """Rewrite the run's losses.csv from every fusion's epoch log, in one writer.

    Fusions trained in separate processes (fan-out) update losses.csv concurrently, and a
    read-modify-write can drop another fusion's rows; the epoch logs are per fusion and complete.
    """
    key = layout.losses(run)
    for fusion in fusions:
        text = store.read_bytes(layout.epoch_log(fusion, run)).decode()
        history = [json.loads(line) for line in text.splitlines() if line.strip()]
        update_losses(store, key, fusion, history)
    return key


def save_emotion_vectors(store: Storage, key: str, preds: Predictions, epoch: int) -> str:
    """The validation split's emotion embeddings of the best epoch, as an .npz."""
    buf = io.BytesIO()
    np.savez(
        buf,
        audio_emb=preds.audio_emb.astype(np.float32),
        image_emb=preds.image_emb.astype(np.float32),
        label=preds.label.astype(np.int64),
        epoch=np.asarray(epoch, dtype=np.int64),
    )
    return store.write_bytes(key, buf.getvalue())


# --------------------------------------------------------------------------------------------
# model files and checkpoints


def _to_bytes(obj: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _load(data: bytes, where: str) -> dict[str, Any]:
    """`torch.load(weights_only=True)`: plain containers and tensors only, never code."""
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike
        raise CheckpointError(
            f"{where}: not a safe torch file ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format_version") != FORMAT_VERSION:
        version = obj.get("format_version") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{where}: not a format-{FORMAT_VERSION} file (found {version!r})")
    return obj


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_model(
    store: Storage,
    key: str,
    model: nn.Module,
    cfg: PipelineConfig,
    fusion: str,
    epoch: int,
    val_loss: float,
) -> str:
    """Write `model.pt`: weights, resolved config and format version (see `load_model`)."""
    return store.write_bytes(
        key,
        _to_bytes(
            {
                "format_version": FORMAT_VERSION,
                "fusion": fusion,
                "state_dict": _cpu_state(model),
                "config": cfg.model_dump(mode="json"),
                "epoch": epoch,
                "val_loss": float(val_loss),
            }
        ),
    )


def load_model(data: bytes, where: str) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from `model.pt` bytes; returns (model in eval mode, metadata without the
    weights). `where` names the file in errors."""
    obj = _load(data, where)
    fusion = obj.get("fusion")
    if fusion not in FUSIONS or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{where}: not a model file (fusion {fusion!r}, no state_dict)")
    try:
        cfg = PipelineConfig.model_validate(obj.get("config"))
    except ValidationError as exc:
        raise CheckpointError(f"{where}: its config does not fit this version ({exc})") from exc
    model = build_model(fusion, cfg)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit the {fusion} model ({exc})") from exc
    model.eval()
    return model, {k: v for k, v in obj.items() if k != "state_dict"}


def read_image_weights(cfg: PipelineConfig, store: Storage) -> dict[str, Tensor] | None:
    """The ResNet18 weights `model.pretrained_image_weights` names: a local file, else a key in
    the bucket; read with `weights_only=True`, never downloaded from the internet."""
    source = cfg.model.pretrained_image_weights
    if source is None:
        return None
    path = Path(source).expanduser()
    if path.is_file():
        data, where = path.read_bytes(), str(path)
    else:
        try:
            data, where = store.read_bytes(source), store.uri(source)
        except ObjectNotFound as exc:
            raise ConfigError(
                f"model.pretrained_image_weights: {source!r} is neither a local file nor an "
                f"object in {store.root_uri}"
            ) from exc
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and runtime errors alike
        raise CheckpointError(f"{where}: not a safe torch weights file ({exc})") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{where}: not a ResNet18 state dict")
    try:  # check that the weights fit now, naming the file if they do not
        load_resnet_weights(resnet_trunk(), obj)
    except ValueError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return obj


def rng_state() -> dict[str, Any]:
    """Every RNG the trainer touches, as tensors, lists and numbers (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    np_key, np_mt, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    np_mt = np.asarray(np_mt)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [np_key, torch.from_numpy(np_mt.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    key, mt_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((key, mt_np.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    fusion: str,
    run: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
) -> str:
    """Write `checkpoints/epoch-N.pt` for the epoch just finished; prune old ones if configured."""
    key = layout.checkpoint(fusion, run, state.epoch)
    uri = store.write_bytes(
        key,
        _to_bytes(
            {
                "format_version": FORMAT_VERSION,
                "kind": "checkpoint",
                "fusion": fusion,
                "epoch": state.epoch,
                "step": state.step,
                "batch_size": state.batch_size,
                "best_val_loss": state.best_val_loss,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "steps": state.steps,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "config": cfg.model_dump(mode="json"),
            }
        ),
    )
    keep = cfg.training.keep_checkpoints
    if keep is not None:
        for _, old in list_checkpoints(store, layout, fusion, run)[keep:]:
            store.delete(old)
    return uri


def list_checkpoints(
    store: Storage, layout: Layout, fusion: str, run: str
) -> list[tuple[int, str]]:
    """(epoch, key) of this fusion and run's checkpoints, newest first."""
    prefix = layout.checkpoints(fusion, run)
    found = []
    for info in store.list(prefix):
        match = CHECKPOINT_NAME.fullmatch(info.key[len(prefix) :])
        if match:
            found.append((int(match.group(1)), info.key))
    return sorted(found, reverse=True)


def resume(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    fusion: str,
    run: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> TrainState:
    """Load the newest readable checkpoint of this fusion and run into the model, optimizer,
    scaler and RNGs; a fresh `TrainState` when there is none. An unreadable newest checkpoint
    (e.g. cut short) falls back to the one before; one from another architecture is refused."""
    found = list_checkpoints(store, layout, fusion, run)
    for epoch, key in found:
        where = store.uri(key)
        try:
            ckpt = _load(store.read_bytes(key), where)
        except CheckpointError as exc:
            log.warning("%s; trying the checkpoint before it", exc)
            continue
        _check_compatible(ckpt, cfg, fusion, where)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: does not fit the {fusion} model ({exc})") from exc
        set_rng_state(ckpt["rng"])
        log.info("resuming %s of run %s from %s (epoch %d done)", fusion, run, where, epoch)
        return TrainState(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            batch_size=None if ckpt["batch_size"] is None else int(ckpt["batch_size"]),
            best_val_loss=ckpt["best_val_loss"],
            best_epoch=int(ckpt["best_epoch"]),
            history=list(ckpt["history"]),
            steps=list(ckpt["steps"]),
            resumed_from=int(ckpt["epoch"]),
        )
    if found:
        raise CheckpointError(
            f"{store.uri(layout.checkpoints(fusion, run))}: no checkpoint can be read; "
            "refusing to start over on top of them (use a new run id)"
        )
    return TrainState()


def _check_compatible(ckpt: dict[str, Any], cfg: PipelineConfig, fusion: str, where: str) -> None:
    if ckpt.get("kind") != "checkpoint" or ckpt.get("fusion") != fusion:
        raise CheckpointError(
            f"{where}: is a {ckpt.get('kind')!r} file of fusion {ckpt.get('fusion')!r}, "
            f"not a {fusion} checkpoint"
        )
    saved = ckpt.get("config", {}).get("model", {})
    now = cfg.model.model_dump(mode="json")
    changed = [k for k in ARCHITECTURE_KEYS if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(
            f"{where}: saved with a different model.{', model.'.join(changed)} "
            f"({', '.join(f'{saved.get(k)!r}' for k in changed)}); resume with the same model "
            "settings or train under a new run id"
        )
