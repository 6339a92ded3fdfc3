"""The model-file and checkpoint format, and resuming from the newest checkpoint.

    save_model(store, key, model, cfg, fusion, epoch, val_loss)   model.pt: weights + config
    load_model(data, where) -> (model, metadata)                  what evaluation loads
    save_checkpoint(store, layout, cfg, fusion, run, model, optimizer, scaler, state)
    resume(store, layout, mcfg, fusion, run, model, optimizer, scaler) -> TrainState

`checkpoints/epoch-N.pt` holds model, optimizer, grad scaler, epoch, step, batch size, RNG states,
best so far, the epoch and step history and the resolved config: once it lands the epoch is done
and never redone. Every file is a `torch.save` of plain dicts, lists, numbers, strings and
tensors, so `torch.load(..., weights_only=True)` reads it; anything else is refused with
`CheckpointError`.
"""

from __future__ import annotations

import io
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from config.schema import ModelConfig, PipelineConfig
from models import FUSIONS, TRAINING_ONLY, build_model
from models.image import load_resnet_weights, resnet_trunk
from tasks.errors import CheckpointError, ConfigError, ObjectNotFound
from tasks.io.layout import Layout
from tasks.io.storage import Storage
from tasks.train.average import WeightAverage

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # of model.pt and checkpoints/epoch-N.pt (2: emotion heads, agreement input)
CHECKPOINT_NAME = re.compile(r"epoch-(\d+)\.pt")
ARCHITECTURE_KEYS = ("embedding_dim", "late_fusion_rule")  # a checkpoint must match these


@dataclass
class TrainState:
    """Progress that a checkpoint carries from one attempt to the next."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    batch_size: int | None = None  # each epoch's starting batch size (None: not yet estimated)
    best_val_loss: float | None = None  # validation loss of the best epoch
    best_val_auc: float | None = None  # validation ROC-AUC of the best epoch (select_on: auc)
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # epoch-log rows
    steps: list[dict[str, Any]] = field(default_factory=list)  # step-log rows
    resumed_from: int | None = None


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
    emotions: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write `model.pt`: weights, resolved config, format version, the emotion vocabulary its
    emotion heads classify into (empty: no heads) and `extra` metadata (plain JSON types, e.g.
    the validation metrics and the operating point); see `load_model`."""
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
                "emotions": list(emotions),
                **dict(extra or {}),
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
    emotions = obj.get("emotions", [])
    if not isinstance(emotions, list) or not all(isinstance(e, str) for e in emotions):
        raise CheckpointError(f"{where}: its emotion vocabulary is not a list of names")
    model = build_model(fusion, cfg, n_emotions=len(emotions))
    try:
        missing, unexpected = model.load_state_dict(obj["state_dict"], strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit the {fusion} model ({exc})") from exc
    # a model written before the training-only heads existed scores the same without them
    missing = [k for k in missing if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: weights do not fit the {fusion} model "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )
    model.eval()
    return model, {k: v for k, v in obj.items() if k != "state_dict"}


IMAGENET = "imagenet"  # model.pretrained_image_weights: torchvision's ImageNet ResNet18 weights


def imagenet_url() -> str:
    """Where torchvision publishes the ImageNet ResNet18 weights (its own registry says)."""
    from torchvision.models import ResNet18_Weights

    return str(ResNet18_Weights.IMAGENET1K_V1.url)


def read_image_weights(store: Storage, mcfg: ModelConfig) -> dict[str, Tensor] | None:
    """The ResNet18 weights `model.pretrained_image_weights` names: "imagenet" (torchvision's
    ImageNet weights, through torch's own download and cache under TORCH_HOME; needs the
    internet once), a local file, or a key in the bucket; always read with `weights_only=True`."""
    source = mcfg.pretrained_image_weights
    if source is None:
        return None
    if source == IMAGENET:
        return _checked(_download_imagenet(), f"{IMAGENET} ({imagenet_url()})")
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
    return _checked(obj, where)


def _download_imagenet() -> Any:
    """torch.hub's download-and-cache of the ImageNet weights; offline, a `ConfigError` that
    names the setting and the way out (a local file or a bucket key)."""
    url = imagenet_url()
    try:
        return torch.hub.load_state_dict_from_url(
            url, map_location="cpu", progress=False, weights_only=True
        )
    except (OSError, ValueError) as exc:  # URLError is an OSError: no network, DNS, refused
        raise ConfigError(
            f"model.pretrained_image_weights: {IMAGENET!r} needs {url} (or a copy in torch's "
            f"cache, {torch.hub.get_dir()}/checkpoints/), which could not be fetched "
            f"({type(exc).__name__}: {exc}); offline, download the file elsewhere and give its "
            "local path or a bucket key instead"
        ) from exc


def _checked(obj: Any, where: str) -> dict[str, Tensor]:
    """`obj` as a ResNet18 state dict (unwrapped from {"state_dict": ...}), or `CheckpointError`."""
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


def rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the trainer touches, as tensors, lists and numbers (weights_only-safe):
    the model's own `generator` and the global ones."""
    version, mt, gauss = random.getstate()
    np_key, np_mt, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    np_mt = np.asarray(np_mt)
    return {
        "model": generator.get_state() if generator is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(mt), gauss],
        "numpy": [np_key, torch.from_numpy(np_mt.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    if generator is not None and state.get("model") is not None:
        generator.set_state(state["model"])
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
    generator: torch.Generator | None = None,
    average: WeightAverage | None = None,
) -> str:
    """Write `checkpoints/epoch-N.pt` for the epoch just finished; prune old ones if configured.
    `generator`: the model's own random stream (dropout), saved with the other RNGs; `average`:
    the weight average (`training.average_epochs`), saved beside the raw weights."""
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
                "best_val_auc": state.best_val_auc,
                "best_epoch": state.best_epoch,
                "history": state.history,
                "steps": state.steps,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(generator),
                "config": cfg.model_dump(mode="json"),
                "average": None if average is None else average.state_dict(),
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
    mcfg: ModelConfig,
    fusion: str,
    run: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator | None = None,
    average: WeightAverage | None = None,
) -> TrainState:
    """Load the newest readable checkpoint of this fusion and run into the model, optimizer,
    scaler, RNGs (the model's own `generator` too) and weight `average` (one saved without an
    average starts it from the resumed weights); a fresh `TrainState` when there is none.
    An unreadable newest checkpoint (e.g. cut short) falls back to the one before; one saved with
    other `ARCHITECTURE_KEYS` of `mcfg` is refused."""
    found = list_checkpoints(store, layout, fusion, run)
    for epoch, key in found:
        where = store.uri(key)
        try:
            ckpt = _load(store.read_bytes(key), where)
        except CheckpointError as exc:
            log.warning("%s; trying the checkpoint before it", exc)
            continue
        _check_compatible(ckpt, mcfg, fusion, where)
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"{where}: does not fit the {fusion} model ({exc})") from exc
        set_rng_state(ckpt["rng"], generator)
        if average is not None:
            if ckpt.get("average") is None:
                log.warning("%s holds no weight average: starting it from its weights", where)
                average.restart()
            else:
                average.load_state_dict(ckpt["average"], where)
        log.info("resuming %s of run %s from %s (epoch %d done)", fusion, run, where, epoch)
        return TrainState(
            epoch=int(ckpt["epoch"]),
            step=int(ckpt["step"]),
            batch_size=None if ckpt["batch_size"] is None else int(ckpt["batch_size"]),
            best_val_loss=ckpt["best_val_loss"],
            best_val_auc=ckpt.get("best_val_auc"),
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


def _check_compatible(ckpt: dict[str, Any], mcfg: ModelConfig, fusion: str, where: str) -> None:
    if ckpt.get("kind") != "checkpoint" or ckpt.get("fusion") != fusion:
        raise CheckpointError(
            f"{where}: is a {ckpt.get('kind')!r} file of fusion {ckpt.get('fusion')!r}, "
            f"not a {fusion} checkpoint"
        )
    saved = ckpt.get("config", {}).get("model", {})
    now = mcfg.model_dump(mode="json")
    changed = [k for k in ARCHITECTURE_KEYS if saved.get(k) != now[k]]
    if changed:
        raise CheckpointError(
            f"{where}: saved with a different model.{', model.'.join(changed)} "
            f"({', '.join(f'{saved.get(k)!r}' for k in changed)}); resume with the same model "
            "settings or train under a new run id"
        )
