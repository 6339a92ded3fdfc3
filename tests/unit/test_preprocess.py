"""Preprocessing: decoders for any rate/channels/mode, every kind of bad file skipped and reported,
the streamed feature build on both backends, and the content-keyed cache (no raw GET on a hit)."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from config.schema import DataConfig, PipelineConfig, StorageConfig
from tasks.data.decode import preprocess_audio, preprocess_image
from tasks.data.features import feature_hash
from tasks.data.shards import DeepfakeDataset, batches, read_shard
from tasks.errors import CorruptSample, DataError
from tasks.io.layout import SPLITS
from tasks.io.storage import Storage, open_storage
from tasks.refs import FeatureRef
from tests.unit.synthetic_data import (
    TINY_DATA,
    CountingStore,
    bad_files,
    features_of,
    generated,
    image_bytes,
    listing_bad_files,
    load_into,
    manifest_of,
    tiny_config,
    wav_bytes,
)

N = 32  # pairs in the generated bench
DATA = DataConfig(sample_rate=16000, clip_seconds=2.0, **TINY_DATA)


@pytest.fixture(scope="module")
def bench() -> dict[str, bytes]:
    return generated(N, seed=41)


@pytest.fixture(params=["local", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def setup_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest, **data: object):
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    cfg = tiny_config(kind, tmp_path, server, **data)
    store = open_storage(cfg.storage)
    store.check()
    return cfg, store, server


# --- decoders --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sr", "channels", "fmt", "subtype"),
    [
        (16000, 1, "WAV", "PCM_16"),
        (8000, 1, "WAV", "PCM_U8"),
        (44100, 2, "WAV", "PCM_24"),
        (22050, 6, "WAV", "FLOAT"),
        (48000, 2, "FLAC", "PCM_16"),
        (32000, 1, "OGG", "VORBIS"),
    ],
)
def test_audio_of_any_rate_and_channels_becomes_one_log_mel(
    sr: int, channels: int, fmt: str, subtype: str
) -> None:
    mel = preprocess_audio(wav_bytes(1.5, sr, channels, format=fmt, subtype=subtype), DATA)
    assert mel.shape == (1, 32, 32) and mel.dtype == np.float32
    assert mel.min() >= -1.0 and mel.max() == pytest.approx(1.0)
    # A 220 Hz tone lands in the same mel band whatever the rate and channel count.
    reference = preprocess_audio(wav_bytes(1.5, 16000, 1), DATA)
    assert np.argmax(mel[0, :, 5]) == np.argmax(reference[0, :, 5])


def test_short_audio_is_padded_and_silence_is_the_floor() -> None:
    mel = preprocess_audio(wav_bytes(0.5), DATA)  # clip_seconds = 2: the last 3/4 is padding
    assert mel.shape == (1, 32, 32)
    assert np.all(mel[:, :, -4:] == -1.0) and mel[:, :, :8].max() > 0.9
    silent = io.BytesIO()
    sf.write(silent, np.zeros(16000), 16000, format="WAV")
    assert np.all(preprocess_audio(silent.getvalue(), DATA) == -1.0)


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("JPEG", "RGB", (640, 480)),
        ("JPEG", "L", (50, 70)),
        ("JPEG", "CMYK", (64, 64)),
        ("PNG", "RGBA", (33, 31)),
        ("PNG", "LA", (20, 20)),
        ("PNG", "P", (100, 40)),
        ("PNG", "1", (16, 16)),
    ],
)
def test_images_of_any_mode_and_size_become_rgb(fmt: str, mode: str, size: tuple[int, int]) -> None:
    out = preprocess_image(image_bytes(fmt, size, mode), DATA)
    assert out.shape == (3, 32, 32) and out.dtype == np.uint8


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    out = preprocess_image(buf.getvalue(), DATA)
    assert out[0, 0, 0] < 20 and out[0, -1, -1] > 235
    assert 100 < out[0, 16, 16] < 160  # mid-grey stays mid-grey


def test_exif_orientation_is_applied() -> None:
    img = Image.new("RGB", (60, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 30, 30))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out = preprocess_image(buf.getvalue(), DATA)
    assert out[:, :8].mean() > 200 and out[:, -8:].mean() < 50  # white on top after rotation


@pytest.mark.parametrize("key", sorted(bad_files()))
def test_every_bad_kind_raises_corrupt_sample_naming_the_file(key: str) -> None:
    data, phrase = bad_files()[key]
    decode = preprocess_audio if key.startswith("audio/") else preprocess_image
    with pytest.raises(CorruptSample, match=phrase) as err:
        decode(data, DATA, f"s3://b/dataset/{key}")
    assert str(err.value).startswith(f"s3://b/dataset/{key}: ")


def test_empty_and_non_finite_audio_are_corrupt() -> None:
    with pytest.raises(CorruptSample, match="empty file"):
        preprocess_audio(b"", DATA, "x.wav")
    with pytest.raises(CorruptSample, match="empty file"):
        preprocess_image(b"", DATA, "x.png")
    buf = io.BytesIO()
    sf.write(buf, np.full(800, np.nan, dtype=np.float32), 8000, format="WAV", subtype="FLOAT")
    with pytest.raises(CorruptSample, match="NaN"):
        preprocess_audio(buf.getvalue(), DATA, "nan.wav")


# --- the feature build -----------------------------------------------------------------------


def shard_rows(store: Storage, keys: list[str]) -> list[tuple[str, int]]:
    out = []
    for key in keys:
        shard = read_shard(store, key)
        assert shard["audio"].shape[1:] == (1, 32, 32) and shard["image"].shape[1:] == (3, 32, 32)
        out += list(zip(shard["pair_id"].tolist(), shard["label"].tolist(), strict=True))
    return out


def test_shards_hold_every_pair_and_a_rerun_is_a_cache_hit(
    kind: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    bench: dict[str, bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg, store, server = setup_store(kind, tmp_path, request)
    load_into(store, bench)
    # On the S3 path nothing may land on the local disk: no temp files, nothing in the cwd.
    work, temp = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    for var in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.setenv(var, str(temp))

    manifest = manifest_of(store, cfg, "run1")
    if server is not None:
        server.requests.clear()
    first = features_of(store, cfg, manifest)
    assert not first.cache_hit and first.skipped == []
    if server is not None:  # the counter sees raw fetches: each object once
        assert server.requests.count("GET", "/dataset/") == 2 * N
    assert first.counts == manifest.counts
    rows = [r for s in SPLITS for r in shard_rows(store, first.shards[s])]
    assert len(rows) == manifest.n_pairs == N  # one shard row per good pair
    assert len({pid for pid, _ in rows}) == N
    assert all(len(first.shards[s]) == -(-sum(first.counts[s].values()) // 8) for s in SPLITS)
    assert os.listdir(work) == [] and os.listdir(temp) == []

    manifest2 = manifest_of(store, cfg, "run2")
    counting = CountingStore(store)
    if server is not None:
        server.requests.clear()
    second = features_of(counting, cfg, manifest2)  # type: ignore[arg-type]
    assert second.cache_hit and second.feature_hash == first.feature_hash
    assert second.shards == first.shards and second.counts == first.counts
    assert counting.count("dataset/") == 0  # no raw object read...
    if server is not None:  # ...and none fetched over HTTP
        assert server.requests.count("GET", "/dataset/") == 0
        assert server.requests.count("GET", "/outputs/cache/") == 1  # the index only
    assert json.loads(store.read_bytes("outputs/manifests/run2/skipped.json"))["n_skipped"] == 0


def test_changed_settings_or_a_lost_shard_rebuild(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    first = features_of(store, cfg, manifest)
    other = tiny_config("local", tmp_path, image_size=16)
    assert other.storage == cfg.storage
    resized = features_of(store, other, manifest)
    assert not resized.cache_hit and resized.feature_hash != first.feature_hash
    store.delete(first.shards["train"][0])
    rebuilt = features_of(store, cfg, manifest)
    assert not rebuilt.cache_hit and rebuilt.feature_hash == first.feature_hash
    assert store.exists(first.shards["train"][0])
    assert features_of(store, cfg, manifest).cache_hit


def test_every_bad_file_is_skipped_and_reported(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, bench: dict[str, bytes]
) -> None:
    cfg, store, _ = setup_store(kind, tmp_path, request)
    load_into(store, bench)
    planted = {**bad_files(), **listing_bad_files()}
    for key, (data, _) in planted.items():
        store.write_bytes("dataset/" + key, data)
    # Pair every planted audio/image file with a good partner in pairs.csv.
    csv_text = store.read_bytes("dataset/pairs.csv").decode()
    good = [line.split(",") for line in csv_text.splitlines()[1:]]
    extra = []
    for i, key in enumerate(k for k in planted if k.startswith(("audio/real", "audio/fake"))):
        extra.append(f"{key},{good[i][1]},1,vocoder_bandlimit,happy,happy")
    for i, key in enumerate(k for k in planted if k.startswith(("images/real", "images/fake"))):
        extra.append(f"{good[i][0]},{key},0,real,sad,sad")
    store.write_bytes("dataset/pairs.csv", (csv_text + "\n".join(extra) + "\n").encode())

    manifest = manifest_of(store, cfg, "bad")
    features = features_of(store, cfg, manifest)
    reasons = {s["key"]: s["reason"] for s in features.skipped}
    for key, (_, phrase) in planted.items():
        assert phrase in reasons.get("dataset/" + key, ""), (key, reasons.get("dataset/" + key))
    assert sum(sum(c.values()) for c in features.counts.values()) == N  # all good pairs kept
    written = json.loads(store.read_bytes(features.skipped_key or ""))
    assert {s["key"] for s in written["skipped"]} >= {"dataset/" + k for k in planted}
    assert features.skipped_key == "outputs/manifests/bad/skipped.json"
    again = features_of(store, cfg, manifest_of(store, cfg, "bad2"))
    assert again.cache_hit and {s["key"] for s in again.skipped} == set(reasons)


def test_no_usable_pair_left_is_fatal_and_says_why(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    for key in bench:
        if key.endswith(".wav"):
            store.write_bytes(key, b"RIFF" + b"\x00" * 40)  # every audio file broken
    with pytest.raises(DataError, match=f"no usable pair remains: all {N} pairs"):
        features_of(store, cfg, manifest)
    written = json.loads(store.read_bytes("outputs/manifests/r/skipped.json"))
    assert written["n_skipped"] == N


def test_a_split_losing_a_class_to_bad_files_is_fatal(
    tmp_path: Path, bench: dict[str, bytes]
) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    from tasks.data.manifest import read_manifest

    for row in read_manifest(store, manifest.key):
        if row.split == "test" and row.label == 1:
            store.write_bytes(row.image_key, b"garbage")
    with pytest.raises(DataError, match="the test split has no fake pairs"):
        features_of(store, cfg, manifest)


def test_fetches_are_concurrent_but_bounded(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path, fetch_concurrency=3)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    counting = CountingStore(store, latency=0.02)
    features_of(counting, cfg, manifest)  # type: ignore[arg-type]
    assert counting.count("dataset/") == 2 * N
    assert 1 < counting.max_active <= 3


def split_dataset(
    cfg: PipelineConfig, features: FeatureRef, split: str, shuffle: bool = False
) -> DeepfakeDataset:
    """A `DeepfakeDataset` over one split's shards, as training and evaluation build theirs."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    n = sum(features.counts.get(split, {}).values())
    return DeepfakeDataset(
        cfg.storage, features.shards.get(split, []), shuffle=shuffle, seed=cfg.run.seed, n_samples=n
    )


def test_dataset_streams_the_shards(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    features = features_of(store, cfg, manifest_of(store, cfg, "r"))
    train = split_dataset(cfg, features, "train", shuffle=True)
    assert isinstance(train, DeepfakeDataset)
    assert len(train) == sum(features.counts["train"].values())
    items = list(train)
    assert len(items) == len(train)
    assert sum(int(it["label"]) for it in items) == features.counts["train"]["fake"]
    batch = next(iter(batches(iter(items), 5)))
    assert batch["audio"].shape == (5, 1, 32, 32) and batch["image"].shape == (5, 3, 32, 32)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    with pytest.raises(ValueError, match="split must be one of"):
        split_dataset(cfg, features, "dev")


def test_feature_hash_covers_content_and_settings() -> None:
    from tasks.data.manifest import PairRow

    row = PairRow("p", "train", 1, "f", "", "", "a.wav", 1, "e1", "i.png", 1, "e2")
    base = feature_hash([row], DATA)
    changed = PairRow("p", "train", 1, "f", "", "", "a.wav", 1, "e9", "i.png", 1, "e2")
    assert feature_hash([changed], DATA) != base
    relabelled = PairRow("p", "train", 1, "f", "happy", "sad", "a.wav", 1, "e1", "i.png", 1, "e2")
    assert feature_hash([relabelled], DATA) != base  # the shards hold the emotions too
    assert feature_hash([row], DATA.model_copy(update={"image_mode": "crop"})) != base
    assert feature_hash([row], DATA.model_copy(update={"n_mels": 16})) != base
    assert feature_hash([row], DATA) == base


# --- the Prefect steps -----------------------------------------------------------------------


def test_step_wrappers_return_references(tmp_path: Path, bench: dict[str, bytes]) -> None:
    from prefect.logging import disable_run_logger

    from flows.steps import build_features as features_step
    from flows.steps import build_manifest as manifest_step

    cfg = tiny_config("local", tmp_path)
    load_into(open_storage(cfg.storage), bench)
    with disable_run_logger():
        manifest = manifest_step.fn(cfg, "w")
        features = features_step.fn(cfg, manifest)
    assert manifest.n_pairs == N and not features.cache_hit
    assert sum(len(v) for v in features.shards.values()) >= 3


def test_steps_retry_transient_storage_faults_only() -> None:
    from prefect.states import Failed

    from flows.steps import build_features as features_step
    from flows.steps import build_manifest as manifest_step
    from flows.steps import is_transient
    from tasks.errors import Throttled

    for step in (manifest_step, features_step):
        assert step.retries == 4 and step.retry_condition_fn is is_transient
    assert not is_transient(None, None, Failed(data=DataError("dataset/: no usable pairs")))
    assert not is_transient(None, None, Failed(data=CorruptSample("a.wav: truncated")))
    assert is_transient(None, None, Failed(data=Throttled("s3://b/k: throttled")))


# --- crop mode: native pixels, never a resize --------------------------------------------------


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_crop_mode_keeps_native_pixels_where_a_resize_smears_them() -> None:
    """A 2 px checkerboard (an upsampling trace) at 120 px: crop mode stores the centre 40 px
    square untouched; resizing the whole picture to 32 px blurs the pattern away."""
    y, x = np.mgrid[0:120, 0:120]
    board = np.where((x + y) % 2 == 0, 200, 40).astype(np.uint8)
    data = _png(np.stack([board] * 3, axis=-1))
    crop = DATA.model_copy(update={"image_mode": "crop", "crop_margin": 8})
    out = preprocess_image(data, crop)
    assert out.shape == (3, 40, 40) and out.dtype == np.uint8  # image_size 32 + margin 8
    assert np.array_equal(out[0], board[40:80, 40:80])  # the very pixels of the centre
    resized = preprocess_image(data, DATA)
    assert resized.shape == (3, 32, 32)
    contrast = np.abs(np.diff(resized[0].astype(int), axis=1)).mean()
    assert contrast < 40 < np.abs(np.diff(out[0].astype(int), axis=1)).mean()


def test_crop_mode_pads_small_images_by_reflection_instead_of_upsampling() -> None:
    small = np.random.default_rng(3).integers(0, 255, (20, 24, 3), dtype=np.uint8)
    crop = DATA.model_copy(update={"image_mode": "crop", "crop_margin": 8})
    out = preprocess_image(_png(small), crop)
    assert out.shape == (3, 40, 40)
    top, left = (40 - 20) // 2, (40 - 24) // 2
    assert np.array_equal(out[:, top : top + 20, left : left + 24], small.transpose(2, 0, 1))
    assert np.array_equal(out[:, top - 1, left : left + 24], small[1].T)  # mirrored edge row


def random_shard(
    root: Path, n: int, side: int, seed: int, crop: int = 0
) -> tuple[StorageConfig, np.ndarray]:
    """A shard "s.npz" of `n` pairs, real and fake in turn, with random (3, side, side) pictures
    (pair i's id is "i"): its storage settings and the pictures."""
    from tasks.data.shards import write_shard

    storage = PipelineConfig(storage={"uri": str(root)}).storage
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (n, 3, side, side), dtype=np.uint8)
    write_shard(
        open_storage(storage), "s.npz", audio=rng.standard_normal((n, 1, 8, 16)).astype(np.float32),
        image=image, label=np.arange(n, dtype=np.int8) % 2, pair_id=[str(i) for i in range(n)],
        family=["real", "f"] * (n // 2), crop=crop,
    )  # fmt: skip
    return storage, image


def test_crop_mode_shards_give_centre_crops_for_evaluation_and_random_ones_for_training(
    tmp_path: Path,
) -> None:
    storage, image = random_shard(tmp_path, 4, 40, seed=5, crop=32)
    plain = list(DeepfakeDataset(storage, ["s.npz"]))
    assert all(it["image"].shape == (3, 32, 32) for it in plain)
    centre = image[0, :, 4:36, 4:36].astype(np.float32) / 255.0
    assert np.allclose(plain[0]["image"].numpy(), centre)
    train = DeepfakeDataset(storage, ["s.npz"], seed=1, augment=True)
    train.set_epoch(1)
    first = [it["image"] for it in train]
    again = [it["image"] for it in train]  # same seed and epoch: the same augmentations
    assert all(a.shape == (3, 32, 32) for a in first)
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, again, strict=True))
    train.set_epoch(2)
    later = [it["image"] for it in train]
    assert any(not np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, later, strict=True))
    assert all(it["audio"].shape == (1, 8, 16) for it in train)  # a time shift keeps the shape


def test_degrade_blurs_or_recompresses_and_keeps_the_picture() -> None:
    """A slight blur, a JPEG round trip or both: fine grain weakened, the picture kept."""
    from tasks.data.shards import degrade

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:48, 0:48] / 48
    base = np.stack([60 + 120 * x, 50 + 140 * y, 170 - 90 * x * y])
    image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)

    def grain(img: np.ndarray) -> float:  # energy of neighbour differences: the finest detail
        f = img.astype(np.float64)
        return float((np.diff(f, axis=1) ** 2).mean() + (np.diff(f, axis=2) ** 2).mean())

    for seed in range(12):
        out = degrade(image, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert grain(out) < 0.9 * grain(image), f"seed {seed}: the fine grain is not weakened"
        # the picture itself stays: its smooth part moves by a few grey levels at most
        assert abs(float(out.astype(float).mean() - image.astype(float).mean())) < 3
        assert float(np.abs(out.astype(float) - base).mean()) < 12
    first = degrade(image, np.random.default_rng(7))
    assert np.array_equal(first, degrade(image, np.random.default_rng(7)))


def test_training_pictures_are_degraded_at_the_rate_and_evaluation_ones_never(
    tmp_path: Path,
) -> None:
    storage, image = random_shard(tmp_path, 40, 24, seed=6)

    def degraded(data: DeepfakeDataset) -> int:
        """How many pictures are neither the shard's nor its mirror image."""
        count = 0
        for it in data:
            out = np.rint(it["image"].numpy() * 255).astype(np.uint8)
            own = image[int(it["pair_id"])]
            count += not (np.array_equal(out, own) or np.array_equal(out, own[:, :, ::-1]))
        return count

    assert degraded(DeepfakeDataset(storage, ["s.npz"], seed=1, augment=True)) == 0
    assert degraded(DeepfakeDataset(storage, ["s.npz"], image_degrade_rate=1.0)) == 0  # evaluation
    assert degraded(DeepfakeDataset(storage, ["s.npz"], augment=True, image_degrade_rate=1.0)) == 40
    some = degraded(
        DeepfakeDataset(storage, ["s.npz"], seed=1, augment=True, image_degrade_rate=0.2)
    )
    assert 1 <= some <= 20  # a share: 8 expected of 40


# --- the audio front-end: band spacing and a band limit ----------------------------------------


def test_linear_bands_are_evenly_spaced_up_to_the_top() -> None:
    from tasks.data.decode import filterbank

    bank = filterbank("linear", 16000, 1024, 16)
    assert bank.shape == (16, 513)
    freqs = np.linspace(0, 8000, 513)
    centres = freqs[bank.argmax(axis=1)]
    assert np.allclose(np.diff(centres), 8000 / 17, atol=16)  # evenly spaced, unlike mel
    mel_centres = freqs[filterbank("mel", 16000, 1024, 16).argmax(axis=1)]
    assert np.diff(mel_centres)[-1] > 3 * np.diff(mel_centres)[0]  # mel widens at the top
    assert np.allclose(bank.sum(axis=1), 1.0, atol=1e-5)


def test_band_limit_makes_a_wideband_and_a_telephone_recording_look_alike() -> None:
    """A voice-band tone plus a 6 kHz component, at 16 kHz, against the same tone recorded at
    8 kHz (telephone: nothing above 4 kHz survives). With band_limit_hz=4000 the two give the
    same features; without it the wideband one shows its 6 kHz band (the sample rate leaks)."""

    def mix(sr: int) -> bytes:
        t = np.arange(sr) / sr
        y = 0.4 * np.sin(2 * np.pi * 440 * t)
        if sr > 12000:
            y += 0.2 * np.sin(2 * np.pi * 6000 * t)
        y *= np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.02)  # 20 ms fades, as speech starts
        buf = io.BytesIO()
        sf.write(buf, y, sr, format="WAV", subtype="PCM_16")
        return buf.getvalue()

    for bands in ("mel", "linear"):
        limited = DATA.model_copy(update={"band_limit_hz": 4000.0, "audio_bands": bands})
        wide, phone = preprocess_audio(mix(16000), limited), preprocess_audio(mix(8000), limited)
        assert np.abs(wide - phone).max() < 0.1, bands
        full = DATA.model_copy(update={"audio_bands": bands})
        gap = preprocess_audio(mix(16000), full) - preprocess_audio(mix(8000), full)
        assert np.abs(gap).max() > 0.5, bands  # the 6 kHz band shows: the sample rate leaks
