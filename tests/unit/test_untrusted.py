"""Untrusted files in the bucket: a crafted pickle planted as a model, a checkpoint, a champion's
model or pretrained weights is refused by every loader that reads it, and its code never runs;
an image whose header claims more pixels than `data.max_image_pixels` is refused before any
pixel is decoded. Everything crosses HTTP to moto's S3 server."""

from __future__ import annotations

import io
import logging
import pickle
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from config.load import validate_config
from config.schema import PipelineConfig
from models import build_model
from tasks.data.decode import preprocess_image
from tasks.errors import CheckpointError, CorruptSample
from tasks.evaluate import detect, inference
from tasks.io import records
from tasks.io.layout import Layout
from tasks.io.storage import Storage, open_storage
from tasks.refs import FeatureRef
from tasks.runs import champions
from tasks.train import checkpoint

RUN = "20260101T000000Z"


class Payload:
    """Unpickling this runs code: it writes its marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "code ran"))


def cfg_for(bucket: str, endpoint: str, **model: Any) -> PipelineConfig:
    return validate_config(
        {
            "storage": {"uri": f"s3://{bucket}", "endpoint_url": endpoint},
            "data": {"n_mels": 16, "spec_frames": 16, "image_size": 32},
            "model": {"embedding_dim": 16, **model},
            "training": {"fusions": ["mid"], "device": "cpu"},
            "evaluation": {"device": "cpu"},
        }
    )


def torch_file(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


def crafted(kind: str, cfg: PipelineConfig, marker: Path) -> bytes:
    """A file that looks like a `kind` ('model', 'checkpoint', 'weights'), carrying `Payload`;
    checked to be live: loading it unsafely runs the code."""
    model = build_model("mid", cfg)
    good = {
        "format_version": checkpoint.FORMAT_VERSION,
        "fusion": "mid",
        "config": cfg.model_dump(mode="json"),
        "epoch": 2,
    }
    if kind == "model":
        blob = torch_file({**good, "state_dict": model.state_dict(), "extra": Payload(marker)})
    elif kind == "checkpoint":
        blob = torch_file(
            {**good, "kind": "checkpoint", "model": model.state_dict(), "rng": Payload(marker)}
        )
    elif kind == "legacy":  # torch's pre-1.6 format: a bare pickle stream after a magic number
        blob = torch_file({**good, "state_dict": model.state_dict(), "x": Payload(marker)}, True)
    else:  # a bare pickle, no torch container at all
        blob = pickle.dumps({"conv1.weight": torch.zeros(1), "x": Payload(marker)})
    loader = (
        pickle.loads
        if kind == "pickle"
        else (lambda b: torch.load(io.BytesIO(b), weights_only=False))
    )
    loader(blob)
    assert marker.read_text() == "code ran", (
        "the payload must be live for the test to mean anything"
    )
    marker.unlink()
    return blob


@pytest.fixture
def bucket(s3_server, s3_bucket) -> tuple[PipelineConfig, Storage]:
    cfg = cfg_for(s3_bucket, s3_server.endpoint_url)
    return cfg, open_storage(cfg.storage)


KINDS = ["model", "legacy", "pickle"]


def _plant_model(store: Storage, blob: bytes) -> str:
    key = Layout().model("mid", RUN)
    store.write_bytes(key, blob)
    return key


def evaluate_loads(cfg: PipelineConfig, store: Storage, blob: bytes) -> None:
    """The evaluate path: `inference.load_fusion_model` of outputs/models/mid/<run>/model.pt."""
    inference.load_fusion_model(store, _plant_model(store, blob))


def detect_loads(cfg: PipelineConfig, store: Storage, blob: bytes) -> None:
    """The detect path: the champion record names the planted model."""
    key = _plant_model(store, blob)
    champion = champions.Champion(
        fusion="mid", run=RUN, auc=0.9, model_key=key, split_hash="x",
        promoted_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    records.write_json(store, Layout().champion("mid"), champion.model_dump(mode="json"))
    detect.load_detectors(store, Layout(), cfg)


def detect_run_loads(cfg: PipelineConfig, store: Storage, blob: bytes) -> None:
    """detect --run RUN: the run's model.pt."""
    _plant_model(store, blob)
    detect.load_detectors(store, Layout(), cfg, run=RUN)


def champion_rescore_loads(cfg: PipelineConfig, store: Storage, blob: bytes) -> None:
    """Champion promotion on a grown split re-scores the current champion from its model file."""
    key = _plant_model(store, blob)
    current = champions.Champion(
        fusion="mid", run=RUN, auc=0.9, model_key=key, split_hash="old",
        promoted_at="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    features = FeatureRef(
        run="20260102T000000Z", feature_hash="h", prefix="outputs/cache/features/h/",
        shards={"test": ["outputs/cache/features/h/test/shard-0000.npz"]},
        counts={"test": {"real": 1, "fake": 1}},
    )  # fmt: skip
    champions.rescore(store, cfg, current, features)


def weights_load(cfg: PipelineConfig, store: Storage, blob: bytes) -> None:
    """model.pretrained_image_weights naming a bucket key."""
    store.write_bytes("weights/resnet18.pt", blob)
    checkpoint.read_image_weights(
        store, cfg.model.model_copy(update={"pretrained_image_weights": "weights/resnet18.pt"})
    )


LOADERS: dict[str, Callable[[PipelineConfig, Storage, bytes], None]] = {
    "evaluate": evaluate_loads,
    "detect-champion": detect_loads,
    "detect-run": detect_run_loads,
    "champion-rescore": champion_rescore_loads,
    "pretrained-weights": weights_load,
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", list(LOADERS))
def test_a_planted_pickle_is_refused_by_every_model_loader_and_never_runs(
    path: str, kind: str, bucket, tmp_path: Path
) -> None:
    cfg, store = bucket
    marker = tmp_path / "ran"
    blob = crafted(kind, cfg, marker)
    with pytest.raises(CheckpointError, match=r"s3://[^:]+/[^ ]+\.pt: not a safe torch"):
        LOADERS[path](cfg, store, blob)
    assert not marker.exists()


def test_load_model_refuses_the_bytes_naming_the_file(bucket, tmp_path: Path) -> None:
    cfg, _ = bucket
    marker = tmp_path / "ran"
    for kind in KINDS:
        with pytest.raises(CheckpointError, match=r"^planted\.pt: not a safe torch file \("):
            checkpoint.load_model(crafted(kind, cfg, marker), "planted.pt")
        assert not marker.exists()


def _train_state(cfg: PipelineConfig) -> tuple[torch.nn.Module, Any, Any]:
    model = build_model("mid", cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer, torch.amp.GradScaler("cpu", enabled=False)


@pytest.mark.parametrize("kind", ["checkpoint", "legacy", "pickle"])
def test_a_planted_checkpoint_is_refused_on_resume_and_never_runs(
    kind: str, bucket, tmp_path: Path, caplog
) -> None:
    """Alone, it is refused (no start-over on top of it); newest above a real epoch-1
    checkpoint, it is passed over with a warning naming it, and epoch 1 resumes."""
    cfg, store = bucket
    layout, marker = Layout(), tmp_path / "ran"
    planted = layout.checkpoint("mid", RUN, 2)
    store.write_bytes(planted, crafted(kind, cfg, marker))
    model, optimizer, scaler = _train_state(cfg)
    with pytest.raises(CheckpointError, match="no checkpoint can be read; refusing to start over"):
        checkpoint.resume(store, layout, cfg.model, "mid", RUN, model, optimizer, scaler)
    assert not marker.exists()

    state = checkpoint.TrainState(epoch=1, step=4, batch_size=8, best_val_loss=0.7, best_epoch=1)
    checkpoint.save_checkpoint(store, layout, cfg, "mid", RUN, model, optimizer, scaler, state)
    with caplog.at_level(logging.WARNING, logger="tasks.train.checkpoint"):
        resumed = checkpoint.resume(store, layout, cfg.model, "mid", RUN, *_train_state(cfg))
    assert resumed.resumed_from == 1 and resumed.step == 4
    assert f"{store.uri(planted)}: not a safe torch file" in caplog.text
    assert not marker.exists()


# --- decompression bombs -------------------------------------------------------------------------


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + tag + body + zlib.crc32(tag + body).to_bytes(4, "big")


def real_png_bomb(side: int) -> bytes:
    """A valid greyscale PNG of side x side black pixels: a few KB that decode to side² bytes."""
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    raw = zlib.compress(b"\x00" * (side + 1) * side, 9)  # filter byte + row, every row
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", raw)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_header(width: int, height: int) -> bytes:
    """A small JPEG whose SOF0 header is rewritten to claim width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def webp_or_gif(fmt: str, side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (side, side)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "data", "pixels"),
    [
        ("valid 6000x6000 PNG (36 MP in a few KB)", real_png_bomb(6000), 36_000_000),
        ("JPEG header claiming 65000x65000", jpeg_header(65000, 65000), 65000 * 65000),
        ("JPEG header claiming 3000x3000", jpeg_header(3000, 3000), 9_000_000),
        ("valid 2500x2500 GIF", webp_or_gif("GIF", 2500), 6_250_000),
    ],
)
def test_images_over_the_pixel_limit_are_refused_from_the_header(
    name: str, data: bytes, pixels: int
) -> None:
    cfg = validate_config({"data": {"max_image_pixels": 4_000_000}}).data
    assert len(data) < 200_000, name  # the bomb is small; decoding it would not be
    with pytest.raises(CorruptSample, match=r"^bomb.png: .*decompression bomb") as exc:
        preprocess_image(data, cfg, "bomb.png")
    assert f"{pixels} pixels" in str(exc.value)  # counted from the header (PIL's own limit
    # refuses the largest at open, ours data.max_image_pixels the rest): nothing decoded


def test_the_same_picture_under_the_limit_decodes() -> None:
    """The limit, not the format, refused the bombs: a 1500x1500 PNG of the same kind decodes."""
    cfg = validate_config({"data": {"max_image_pixels": 4_000_000, "image_size": 32}}).data
    out = preprocess_image(real_png_bomb(1500), cfg, "ok.png")
    assert out.shape == (3, 32, 32) and not np.any(out)
