"""Inference: a model's scores and emotion embeddings over a dataset, on the one device rule.

    pick_device(name, setting)     "auto" = CUDA when present, else the CPU; "cuda" without a GPU
                                   is a `ConfigError` naming the setting (training.device or
                                   evaluation.device): the same rule for training and evaluation
    infer(model, data, device, batch_size, amp)   (batch, outputs) pairs, eval mode, no gradients
    predict(model, data, device)   every sample's `Predictions`, in dataset order
    load_fusion_model(store, key)  a trained model from the bucket (weights only, never code)

Used by the trainer's validation pass, by the evaluation of the test split and by champion
re-scoring, so all three score a model the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from models import FusionOutput
from tasks.data.shards import batches
from tasks.errors import ConfigError, DataError
from tasks.io.storage import Storage

DEVICE_CHOICES = ("auto", "cpu", "cuda")


@dataclass
class Predictions:
    """Per-sample outputs of a model over a dataset (numpy, in dataset order)."""

    score: np.ndarray  # (N,) float32 in [0, 1], probability of fake: sigmoid(logit)
    logit: np.ndarray  # (N,) float32 raw logit (temperature scaling works on it)
    label: np.ndarray  # (N,) int64, 1 = fake
    audio_emb: np.ndarray  # (N, D) float32
    image_emb: np.ndarray  # (N, D) float32
    family: np.ndarray  # (N,) str
    pair_id: np.ndarray  # (N,) str


def pick_device(name: str, setting: str = "evaluation.device") -> torch.device:
    """The device a `*.device` setting names: auto = CUDA when present, else the CPU."""
    if name not in DEVICE_CHOICES:
        raise ConfigError(f"{setting}: {name!r} is not one of {', '.join(DEVICE_CHOICES)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}: cuda requested but no CUDA device is available")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def infer(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    device: torch.device,
    batch_size: int,
    amp: bool = False,
) -> Iterator[tuple[dict[str, Any], FusionOutput]]:
    """(batch, outputs) over `dataset` in eval mode, without gradients."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in batches(iter(dataset), batch_size):
                audio = batch["audio"].to(device, non_blocking=True)  # (B, 1, M, T)
                image = batch["image"].to(device, non_blocking=True)  # (B, 3, S, S)
                with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                    out = model(audio, image)
                yield batch, FusionOutput(*(t.float() for t in out))
    finally:
        model.train(was_training)


def collect(parts: list[tuple[dict[str, Any], FusionOutput]]) -> Predictions:
    """One `Predictions` from the (batch, outputs) pairs of `infer`."""
    if not parts:
        raise DataError("no samples to predict on")
    return Predictions(
        score=torch.cat([o.score for _, o in parts]).cpu().numpy(),
        logit=torch.cat([o.logit for _, o in parts]).cpu().numpy(),
        label=torch.cat([b["label"] for b, _ in parts]).numpy().astype(np.int64),
        audio_emb=torch.cat([o.audio_emb for _, o in parts]).cpu().numpy(),
        image_emb=torch.cat([o.image_emb for _, o in parts]).cpu().numpy(),
        family=np.asarray([f for b, _ in parts for f in b["family"]], dtype=str),
        pair_id=np.asarray([p for b, _ in parts for p in b["pair_id"]], dtype=str),
    )


def predict(
    model: nn.Module,
    dataset: Iterable[dict[str, Any]],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> Predictions:
    """Scores and embeddings of every sample of `dataset`, in order."""
    device = torch.device(device)
    return collect(list(infer(model.to(device), dataset, device, batch_size)))


def load_fusion_model(store: Storage, key: str) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) of the `model.pt` at `key`; refuses anything but weights."""
    from tasks.train.checkpoint import load_model  # the model-file format lives with training

    return load_model(store.read_bytes(key), store.uri(key))
