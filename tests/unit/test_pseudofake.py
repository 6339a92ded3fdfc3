"""Self-blended pseudo-fakes: a real face with an altered copy of itself blended into a region,
shown instead of the real face of some fake training pairs (`training.pseudo_fake_rate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from config.schema import PipelineConfig, TrainingConfig
from tasks.data.pseudofake import (
    _reshape_envelope,
    _sharpen_harmonics,
    self_blend,
    self_blend_audio,
)
from tasks.data.shards import DeepfakeDataset, write_shard
from tasks.io.storage import open_storage


def textured(side: int, seed: int = 0) -> np.ndarray:
    """A (3, side, side) uint8 picture with detail at every scale: smooth gradients plus grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = np.stack([80 + 100 * x, 60 + 120 * y, 150 - 80 * x * y])
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("side", [32, 64])
def test_self_blend_alters_the_middle_and_leaves_the_corners(side: int) -> None:
    image = textured(side)
    corners = (slice(0, 3), slice(-3, None))
    for seed in range(60):
        out = self_blend(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        diff = np.abs(out.astype(int) - image.astype(int))
        assert diff.sum() > 0, f"seed {seed}: the pseudo-fake is its own source"
        for rows in corners:
            for cols in corners:
                assert diff[:, rows, cols].max() <= 3, f"seed {seed}: a corner changed"
        # The change sits in a region: some pixels far more altered than the picture's mean.
        assert diff.max() > 4 * diff.mean()


def test_self_blend_is_reproducible_and_varies_with_the_stream() -> None:
    image = textured(48, seed=1)
    first = self_blend(image, np.random.default_rng(7))
    assert np.array_equal(first, self_blend(image, np.random.default_rng(7)))
    others = [self_blend(image, np.random.default_rng(s)) for s in range(8, 12)]
    assert all(not np.array_equal(first, o) for o in others)


# A shard of 4 kinds of pair: (label, audio file label, image file label, family).
KINDS = (
    (0, 0, 0, "real"),
    (1, 1, 0, "griffin_lim"),  # a faked voice, a real face: eligible
    (1, 0, 0, "emotion_mismatch"),  # two real files that disagree: the emotions must tell
    (1, 0, 1, "face_blend"),  # the face is fake already
)


def write_pairs(root: Path, per_kind: int) -> tuple[PipelineConfig, list[tuple[int, ...]]]:
    cfg = PipelineConfig(storage={"uri": str(root)})
    rng = np.random.default_rng(3)
    kinds = [k for k in KINDS for _ in range(per_kind)]
    n = len(kinds)
    write_shard(
        open_storage(cfg.storage), "s.npz",
        audio=rng.standard_normal((n, 1, 8, 16)).astype(np.float32),
        image=np.stack([textured(32, seed=i) for i in range(n)]),
        label=np.array([k[0] for k in kinds], dtype=np.int8),
        file_label=np.array([k[1:3] for k in kinds], dtype=np.int8),
        pair_id=[f"p{i}" for i in range(n)], family=[k[3] for k in kinds], crop=0,
    )  # fmt: skip
    return cfg, kinds


def shown(item: dict[str, Any]) -> np.ndarray:
    return item["image"].numpy()


def is_source(item: dict[str, Any]) -> bool:
    """The item's picture is its own stored one (flipped or not by the training flip)."""
    source = textured(32, seed=int(item["pair_id"][1:])).astype(np.float32) / 255.0
    return np.allclose(shown(item), source) or np.allclose(shown(item), source[:, :, ::-1])


def test_fake_voice_pairs_are_shown_pseudo_fakes_of_their_real_faces_labelled_fake_images(
    tmp_path: Path,
) -> None:
    cfg, kinds = write_pairs(tmp_path, per_kind=60)
    data = DeepfakeDataset(cfg.storage, ["s.npz"], seed=1, augment=True, pseudo_fake_rate=0.5)
    items = list(data)
    made = []
    for it in items:
        label, audio_label, image_label, family = kinds[int(it["pair_id"][1:])]
        assert it["family"] == family and it["label"].item() == label  # the pair never changes
        if is_source(it):
            assert it["file_label"].tolist() == [audio_label, image_label]
            continue
        made.append(it["pair_id"])
        assert family == "griffin_lim", f"{family}: not eligible"
        assert it["file_label"].tolist() == [audio_label, 1.0]  # the face is now a fake
    assert 15 <= len(made) <= 45  # about half of the 60 eligible pairs
    again = [it["pair_id"] for it in data if not is_source(it)]
    assert again == made  # same seed and epoch: the same pseudo-fakes
    data.set_epoch(1)
    assert [it["pair_id"] for it in data if not is_source(it)] != made
    everything = DeepfakeDataset(cfg.storage, ["s.npz"], seed=1, augment=True, pseudo_fake_rate=1)
    assert sum(not is_source(it) for it in everything) == 60  # every fake-voice pair


def test_no_pseudo_fakes_when_off_or_outside_training(tmp_path: Path) -> None:
    cfg, _ = write_pairs(tmp_path, per_kind=10)
    off = DeepfakeDataset(cfg.storage, ["s.npz"], seed=1, augment=True, pseudo_fake_rate=0.0)
    before = DeepfakeDataset(cfg.storage, ["s.npz"], seed=1, augment=True)  # the old default
    for a, b in zip(off, before, strict=True):  # rate 0 draws nothing: the old augmentations
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["audio"], b["audio"])
        assert is_source(a)
    evaluation = DeepfakeDataset(cfg.storage, ["s.npz"], pseudo_fake_rate=1.0)
    assert all(is_source(it) for it in evaluation)  # augment off: validation and test


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_the_rate_is_a_share(rate: float) -> None:
    with pytest.raises(ValidationError, match="pseudo_fake_rate"):
        TrainingConfig(pseudo_fake_rate=rate)


def spoken(m: int = 64, t: int = 64, seed: int = 0) -> np.ndarray:
    """A (1, m, t) log-mel in [-1, 1] with harmonics, a time contour and grain."""
    rng = np.random.default_rng(seed)
    bands, frames = np.mgrid[0:m, 0:t]
    harmonics = 0.3 * np.cos(bands * 0.9 + 0.2 * np.sin(frames / 5))
    level = 0.2 - 0.8 * bands / m + harmonics + rng.normal(0, 0.1, (m, t))
    return np.clip(level, -1, 1)[None].astype(np.float32)


def test_self_blend_audio_alters_one_stretch_of_time_and_frequency() -> None:
    audio = spoken()
    for seed in range(60):
        out = self_blend_audio(audio, np.random.default_rng(seed))
        assert out.shape == audio.shape and out.dtype == np.float32
        assert out.min() >= -1.0  # the log-mel's floor holds
        diff = np.abs(out - audio)[0]
        assert diff.sum() > 0, f"seed {seed}: the pseudo-fake is its own source"
        untouched_bands = int((diff.max(axis=1) == 0).sum())
        assert untouched_bands >= 5, f"seed {seed}: every band changed, not one stretch"
    first = self_blend_audio(audio, np.random.default_rng(7))
    assert np.array_equal(first, self_blend_audio(audio, np.random.default_rng(7)))
    assert not np.array_equal(first, self_blend_audio(audio, np.random.default_rng(8)))


def test_a_reshaped_envelope_moves_whole_bands_smoothly_within_the_range() -> None:
    """The same broad curve across the bands in every frame (a vocoder's envelope, not the
    speaker's), at most two bumps or dips of 3-10 dB each, never past 0 dB or the floor."""
    level = np.full((64, 32), -0.2, dtype=np.float32)  # far from both ends of the range
    for seed in range(40):
        out = _reshape_envelope(level, np.random.default_rng(seed))
        shift = out - level
        assert np.allclose(shift, shift[:, :1], atol=1e-6), f"seed {seed}: differs over time"
        # up to 2 x 10 dB (the unit is 40 dB); a bump and a dip may partly cancel
        assert 0.03 < float(np.abs(shift).max()) <= 0.5 + 1e-6
        assert float(np.abs(np.diff(shift[:, 0])).max()) < 0.05  # broad: no band jumps
    loud = np.full((64, 32), 0.95, dtype=np.float32)
    for seed in range(40):
        out = _reshape_envelope(loud, np.random.default_rng(seed))
        assert out.max() <= 1.0 and out.min() >= -1.0


def test_sharpened_harmonics_stand_higher_above_their_valleys_within_the_range() -> None:
    """The opposite of flattening: each band's distance from the envelope across bands grows
    (by 30-100%), the envelope itself stays, and nothing leaves the log-mel's [-1, 1]."""
    audio = spoken()[0]
    inner = slice(8, -8)  # away from the edge bands, where the envelope filter pads

    def contrast(y: np.ndarray) -> float:
        return float(np.abs(np.diff(y[inner], axis=0)).mean())

    for seed in range(40):
        out = _sharpen_harmonics(audio, np.random.default_rng(seed))
        assert out.shape == audio.shape and out.dtype == np.float32
        assert out.min() >= -1.0 and out.max() <= 1.0
        assert 1.2 < contrast(out) / contrast(audio) < 2.1, f"seed {seed}"
        # the envelope (each frame's mean over the inner bands) moves far less than the detail
        shift = np.abs(out[inner].mean(axis=0) - audio[inner].mean(axis=0)).max()
        assert shift < 0.2 * contrast(audio), f"seed {seed}: the envelope moved by {shift:.3f}"


def test_fake_face_pairs_are_shown_pseudo_fakes_of_their_real_voices_labelled_fake_audio(
    tmp_path: Path,
) -> None:
    cfg, kinds = write_pairs(tmp_path, per_kind=40)
    stored = {
        it["pair_id"]: it["audio"].numpy()
        for it in DeepfakeDataset(cfg.storage, ["s.npz"], seed=1)  # as stored
    }
    data = DeepfakeDataset(
        cfg.storage, ["s.npz"], seed=1, augment=True, pseudo_fake_rate=0.0,
        audio_pseudo_fake_rate=0.5,
    )  # fmt: skip

    def is_stored(it: dict[str, Any]) -> bool:
        """The training shift moves the frames: a pseudo-fake is what no shift of its source
        gives."""
        source, shown = stored[it["pair_id"]], it["audio"].numpy()
        return any(
            np.allclose(shown[..., max(s, 0) : 16 + min(s, 0)],
                        source[..., max(-s, 0) : 16 + min(-s, 0)])
            for s in range(-2, 3)
        )  # fmt: skip

    made = []
    for it in data:
        label, audio_label, image_label, family = kinds[int(it["pair_id"][1:])]
        assert it["label"].item() == label  # the pair never changes
        if is_stored(it):
            assert it["file_label"].tolist() == [audio_label, image_label]
            continue
        made.append(it["pair_id"])
        assert family == "face_blend", f"{family}: not eligible"
        assert it["file_label"].tolist() == [1.0, image_label]  # the voice is now a fake
    assert 10 <= len(made) <= 30  # about half of the 40 eligible pairs
    off = DeepfakeDataset(cfg.storage, ["s.npz"], seed=1, augment=True, pseudo_fake_rate=0.0)
    assert all(is_stored(it) for it in off)  # rate 0 (the dataset's default): every voice its own


@pytest.mark.parametrize("rate", [-0.1, 1.5])
def test_the_audio_rate_is_a_share(rate: float) -> None:
    with pytest.raises(ValidationError, match="audio_pseudo_fake_rate"):
        TrainingConfig(audio_pseudo_fake_rate=rate)
