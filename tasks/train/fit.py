"""Training one fusion model, resumable, with everything it produces written to the bucket.

`fit` reads top to bottom: build (data, model, optimizer) -> resume from the newest checkpoint
in the bucket -> per epoch `train_one_epoch`, `evaluate` on the validation split and one
`save_epoch` call -> the `TrainedRef` of the best model, also left in the bucket as `trained.json`.

`save_epoch` writes, in this order (a crash anywhere loses at most the epoch in progress):
1. when the epoch is the best so far (`training.select_on`: validation ROC-AUC, or loss):
   `model.pt`, with the operating point (threshold, temperature) fitted on that epoch's
   validation predictions, and the emotion vectors of the validation split;
2. `checkpoints/epoch-N.pt` (tasks.train.checkpoint): once it lands the epoch is done;
3. the epoch log and the step log, rewritten from the history (a resume rewrites them too).

The run's losses.csv is derived from every fusion's epoch log by `write_losses`, once, after all
fusions trained (the `collect-losses` step): one writer for a file every fusion contributes to.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from torch import nn

from config.schema import PipelineConfig, TrainingConfig
from models import FUSIONS, build_model, seeded_init, use_generator
from tasks import progress
from tasks.data.shards import DeepfakeDataset, read_ahead
from tasks.errors import CheckpointError, ConfigError, DataError
from tasks.evaluate.calibration import fit_operating_point
from tasks.evaluate.inference import Predictions, pick_device
from tasks.evaluate.metrics import calculate_metrics
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.refs import FeatureRef, TrainedRef
from tasks.train.average import WeightAverage, decay_for, steps_per_epoch
from tasks.train.checkpoint import (
    TrainState,
    load_model,
    read_image_weights,
    resume,
    save_checkpoint,
    save_model,
)
from tasks.train.loop import EpochResult, EpochStats, evaluate, train_one_epoch
from tasks.train.memory import (
    MemoryGuard,
    MemoryReader,
    estimate_batch_size,
    estimate_sample_bytes,
    monitor_memory,
    total_memory_bytes,
)
from tasks.train.objective import Objective

__all__ = [
    "LOSSES_COLUMNS",
    "epoch_record",
    "fit",
    "load_model",
    "make_average",  # re-exported for tasks.evaluate.inference; its home is tasks.train.checkpoint
    "log_epoch",
    "make_datasets",
    "make_guard",
    "save_emotion_vectors",
    "save_epoch",
    "fusion_seed",
    "write_logs",
    "write_losses",
]

log = logging.getLogger(__name__)

LOSSES_COLUMNS = ("fusion", "epoch", "split", "bce", "consistency", "total", "accuracy")


def fit(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    features: FeatureRef,
    fusion: str,
    run: str,
    *,
    read_memory: MemoryReader = monitor_memory,
    on_epoch: Callable[[int, int], None] | None = None,
) -> TrainedRef:
    """Train `fusion` on `features` for `training.epochs`, resuming from the newest checkpoint of
    this fusion and run; returns where the best model is. `read_memory` feeds the memory guard;
    `on_epoch(done, epochs)` hears of the epochs done: after the resume, after each saved epoch
    and, when training stops early, once more with (epochs, epochs)."""
    tcfg = cfg.training
    if fusion not in FUSIONS:
        raise ConfigError(f"fusion {fusion!r}: expected one of {', '.join(FUSIONS)}")
    if tcfg.batch_size < cfg.memory.min_batch_size:
        raise ConfigError(
            f"training.batch_size ({tcfg.batch_size}) is below memory.min_batch_size "
            f"({cfg.memory.min_batch_size})"
        )
    device = pick_device(tcfg.device, "training.device")
    amp = device.type == "cuda" and tcfg.mixed_precision
    train_data, val_data = make_datasets(cfg, features)
    objective = Objective.build(tcfg, features.emotions, features.counts["train"])

    # The fusion's own seed and random stream: fusions trained at once in threads of one process
    # give the same models as trained one after another (models.rng).
    seed = fusion_seed(cfg.run.seed, fusion)
    generator = torch.Generator().manual_seed(seed)
    with seeded_init(seed):
        model = build_model(
            fusion, cfg, read_image_weights(store, cfg.model), n_emotions=objective.n_emotions
        )
    use_generator(model, generator)
    model = model.to(device)
    optimizer = make_optimizer(model, tcfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    average = make_average(model, tcfg, len(train_data))
    chosen = model if average is None else average.module  # what is validated, selected, saved
    state = resume(
        store, layout, cfg.model, fusion, run, model, optimizer, scaler, generator, average
    )
    guard = make_guard(cfg, model, state, read_memory)
    state.batch_size = guard.initial
    if state.epoch:
        write_logs(store, layout, fusion, run, state)  # in case the crash came before they landed
    report = on_epoch or _no_report
    report(min(state.epoch, tcfg.epochs), tcfg.epochs)
    log.info(
        "training %s on %s (%d train / %d val pairs), epochs %d-%d, batch %d, %s, %s%s%s",
        fusion,
        device,
        len(train_data),
        len(val_data),
        state.epoch + 1,
        tcfg.epochs,
        guard.initial,
        "mixed precision" if amp else "float32",
        f"emotion heads over {', '.join(objective.emotions)}"
        if objective.n_emotions
        else "no emotion labels (contrastive consistency)",
        f", selecting on validation {tcfg.select_on}"
        + (f" of a weight average over {tcfg.average_epochs:g} epochs" if average else ""),
        f", resumed after epoch {state.epoch}" if state.epoch else "",
    )

    ahead = read_ahead_depth(tcfg)
    for epoch in range(state.epoch + 1, tcfg.epochs + 1):
        if stop_early(state, tcfg):
            log.info(
                "%s: no improvement for %d epochs since epoch %d: stopping early",
                fusion,
                tcfg.patience,
                state.best_epoch,
            )
            break
        started = time.perf_counter()
        guard.start_epoch()
        train_data.set_epoch(epoch)
        result = train_one_epoch(
            model,
            progress.track(
                read_ahead(train_data, ahead),
                len(train_data),
                f"{fusion} epoch {epoch}/{tcfg.epochs}",
            ),
            optimizer,
            scaler,
            guard,
            device,
            tcfg,
            objective,
            fusion=fusion,
            epoch=epoch,
            step=state.step,
            amp=amp,
            n_train=len(train_data),
            average=average,
        )
        val, preds = evaluate(
            chosen,
            progress.track(
                read_ahead(val_data, ahead), len(val_data), f"{fusion} validation {epoch}"
            ),
            device,
            objective,
            guard.batch_size,
            amp=amp,
            expected=len(val_data),
        )
        auc = validation_auc(preds)
        record = epoch_record(fusion, epoch, result, val, time.perf_counter() - started, auc)
        improved = is_improvement(state, val.loss, auc, tcfg)
        state.epoch, state.step = epoch, result.last_step
        state.history.append(record)
        state.steps.extend(result.steps)
        if improved:
            state.best_val_loss, state.best_val_auc, state.best_epoch = val.loss, auc, epoch
        save_epoch(
            store,
            layout,
            cfg,
            fusion,
            run,
            model,
            optimizer,
            scaler,
            state,
            preds,
            improved,
            emotions=objective.emotions if objective.n_emotions else (),
            generator=generator,
            average=average,
        )
        log_epoch(record, tcfg.epochs, best=improved)
        report(epoch, tcfg.epochs)
    if state.epoch < tcfg.epochs:  # stopped early: training is over all the same
        report(tcfg.epochs, tcfg.epochs)

    if state.best_val_loss is None or not store.exists(layout.model(fusion, run)):
        raise CheckpointError(
            f"{store.uri(layout.model(fusion, run))}: best model of epoch {state.best_epoch} is "
            "missing although its checkpoint exists; train again under a new run id"
        )
    ref = TrainedRef(
        fusion=fusion,
        run=run,
        model_key=layout.model(fusion, run),
        epochs=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=state.best_val_loss,
        best_val_auc=state.best_val_auc,
        resumed_from=state.resumed_from,
    )
    records.write_json(store, layout.trained(fusion, run), ref.model_dump(mode="json"))
    return ref


def _no_report(done: int, epochs: int) -> None:
    """`fit`'s default `on_epoch`: nobody listens."""


def fusion_seed(seed: int, fusion: str) -> int:
    """Each fusion's own seed, derived from `run.seed`: independent streams, reproducible."""
    return seed * 1009 + FUSIONS.index(fusion) + 1


def make_average(model: nn.Module, tcfg: TrainingConfig, n_train: int) -> WeightAverage | None:
    """The weight average of `training.average_epochs` (None: off), its per-step decay set from
    the steps an epoch of `n_train` samples takes at the configured batch size."""
    if tcfg.average_epochs is None:
        return None
    steps = steps_per_epoch(n_train, tcfg.batch_size)
    return WeightAverage(model, decay_for(tcfg.average_epochs, steps))


FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


READ_AHEAD_BATCHES = 2  # samples made ready in the background while the step runs


def read_ahead_depth(tcfg: TrainingConfig) -> int:
    """How many samples `read_ahead` keeps ready: two batches of the configured size (bounded
    memory: 2 x 16 samples of 224 px images and 128 x 128 log-mels are ~40 MB)."""
    return READ_AHEAD_BATCHES * tcfg.batch_size


def make_optimizer(model: nn.Module, tcfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW (weight decay on weights, not on biases and norms) or Adam, at the peak rate; torch's
    fused kernel where the model's device has one (CPU and CUDA): one pass over all parameters
    instead of a dozen operations per parameter tensor, which was 15% of a demo step on the CPU."""
    fused = next(model.parameters()).device.type in FUSED_OPTIMIZER_DEVICES or None
    if tcfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=tcfg.learning_rate, fused=fused)
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": tcfg.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, fused=fused)


def validation_auc(preds: Predictions) -> float | None:
    """ROC-AUC of the validation predictions; None when the split lacks a class."""
    label = np.asarray(preds.label).astype(np.int64)
    if np.unique(label).size < 2:
        return None
    return float(calculate_metrics(label, np.asarray(preds.score, dtype=np.float64))["roc_auc"])


def is_improvement(
    state: TrainState, val_loss: float, auc: float | None, tcfg: TrainingConfig
) -> bool:
    """Is this epoch the best so far? By validation AUC (ties: lower loss) with select_on auc
    and an AUC to go by, else by validation loss."""
    if state.best_val_loss is None:
        return True
    if tcfg.select_on == "auc" and auc is not None:
        best = state.best_val_auc if state.best_val_auc is not None else -1.0
        return auc > best or (auc == best and val_loss < state.best_val_loss)
    return val_loss < state.best_val_loss


def stop_early(state: TrainState, tcfg: TrainingConfig) -> bool:
    """`training.patience` epochs have passed without improvement."""
    return tcfg.patience is not None and state.epoch - state.best_epoch >= tcfg.patience


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
        augment=cfg.training.augment,
        pseudo_fake_rate=cfg.training.pseudo_fake_rate,
        audio_pseudo_fake_rate=cfg.training.audio_pseudo_fake_rate,
        image_degrade_rate=cfg.training.image_degrade_rate,
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
# what one epoch leaves in the bucket


def save_epoch(
    store: Storage,
    layout: Layout,
    cfg: PipelineConfig,
    fusion: str,
    run: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    state: TrainState,
    preds: Predictions,
    improved: bool,
    *,
    emotions: Sequence[str] = (),
    generator: torch.Generator | None = None,
    average: WeightAverage | None = None,
) -> None:
    """Save the epoch `state` just recorded: best model (with the operating point fitted on this
    epoch's validation predictions) and emotion vectors when it `improved`, then its checkpoint,
    then the logs (the order the module docstring gives). With a weight `average`, the model
    saved is the average (what was validated); the checkpoint holds both."""
    if improved:
        ecfg = cfg.evaluation
        point = fit_operating_point(
            preds.logit, preds.label, ecfg.operating_point, ecfg.target_fpr, ecfg.threshold
        )
        extra = {"operating_point": point.as_metadata(), "val_auc": state.best_val_auc}
        val_loss = state.history[-1]["val_loss"]
        save_model(
            store,
            layout.model(fusion, run),
            model if average is None else average.module,
            cfg,
            fusion,
            state.epoch,
            val_loss,
            emotions=emotions,
            extra=extra,
        )
        save_emotion_vectors(store, layout.emotion_vectors(fusion, run), preds, state.epoch)
    save_checkpoint(
        store, layout, cfg, fusion, run, model, optimizer, scaler, state, generator, average
    )
    write_logs(store, layout, fusion, run, state)


def epoch_record(
    fusion: str,
    epoch: int,
    result: EpochResult,
    val: EpochStats,
    seconds: float,
    val_auc: float | None = None,
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
        "train_emotion": train.emotion,
        "val_emotion": val.emotion,
        "train_file_bce": train.file,
        "val_file_bce": val.file,
        "val_auc": val_auc,
        "samples_per_s": train.samples_per_s,
        "batch_size": result.batch_size,
        "memory_percent": result.memory_percent,
        "seconds": seconds,
        "time": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def log_epoch(record: dict[str, Any], epochs: int, best: bool) -> None:
    def terms(split: str) -> str:  # the loss's terms; emotion and file only where they count
        out = f"bce {record[f'{split}_bce']:.4f}, consistency {record[f'{split}_consistency']:.4f}"
        for name in ("emotion", "file_bce"):
            value = record.get(f"{split}_{name}", 0.0)
            if value:
                out += f", {name.removesuffix('_bce')} {value:.4f}"
        return out

    log.info(
        "%s epoch %d/%d: train loss %.4f (%s) acc %.3f | val loss %.4f (%s) acc %.3f, AUC %s | "
        "%.1f samples/s, batch %d, memory %.1f%%, %.1f s%s",
        record["fusion"],
        record["epoch"],
        epochs,
        record["train_loss"],
        terms("train"),
        record["train_acc"],
        record["val_loss"],
        terms("val"),
        record["val_acc"],
        "n/a" if record["val_auc"] is None else f"{record['val_auc']:.4f}",
        record["samples_per_s"],
        record["batch_size"],
        record["memory_percent"],
        record["seconds"],
        " (best so far)" if best else "",
    )


def write_logs(store: Storage, layout: Layout, fusion: str, run: str, state: TrainState) -> None:
    """Rewrite this fusion's epoch log and step log from the history."""
    records.write_jsonl(store, layout.epoch_log(fusion, run), state.history)
    records.write_jsonl(
        store,
        layout.step_log(fusion, run),
        ({k: v for k, v in row.items() if k != "data_s"} for row in state.steps),
    )


def write_losses(store: Storage, layout: Layout, run: str, fusions: Iterable[str]) -> str:
    """Write the run's losses.csv (one table for every fusion, a train and a val row per epoch,
    sorted by fusion, epoch, split) from the fusions' epoch logs; returns its key.

    The only writer of losses.csv, called once after every fusion trained: fusions trained in
    threads or on other workers each write only their own epoch log.
    """
    rows: list[dict[str, Any]] = []
    for fusion in fusions:
        for rec in records.read_jsonl(store, layout.epoch_log(fusion, run)):
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
    key = layout.losses(run)
    store.write_bytes(key, out.getvalue().encode(), "text/csv")
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
