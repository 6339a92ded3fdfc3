"""Preprocessing, streamed: bucket objects -> in-memory decode -> feature shards in a content cache.

    preprocess_audio   WAV/FLAC/OGG bytes, any rate and channel count -> mono, resampled to
                       data.sample_rate, first data.clip_seconds -> log-mel (1, n_mels, spec_frames)
                       in [-1, 1] (0 dB = the clip's loudest bin, -80 dB and below = -1)
    preprocess_image   JPEG/PNG bytes, any mode and size -> RGB uint8 (3, S, S), S = data.image_size
    build_features     every pair of a manifest, fetched with at most data.fetch_concurrency objects
                       in flight, decoded in memory (raw objects never touch the local disk),
                       written as shards (tasks/data/shards.py) under outputs/cache/features/<hash>/

The cache key is a hash of every pair's keys, ETags, label and split plus the preprocessing
settings, so a second run on unchanged data finds `index.json` under that prefix and reads no raw
object at all. The index is written last: a build that died half way is never taken for a hit.

A file that cannot be decoded raises `CorruptSample` inside its decoder; `_load_pair` catches it
(the one place) and the pair is skipped, counted and listed with the key and the reason in
`outputs/manifests/<run>/skipped.json` and in `FeatureRef.skipped`. The step fails (`DataError`)
only when no usable pair remains or a split has lost every real or every fake pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import struct
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from tasks.data.manifest import PairRow, check_splits, count_labels, read_manifest
from tasks.data.shards import DeepfakeDataset, batches, write_shard
from tasks.errors import CorruptSample, DataError, ObjectNotFound
from tasks.io.layout import SPLITS, Layout
from tasks.io.storage import Storage
from tasks.refs import FeatureRef, ManifestRef

__all__ = [
    "DeepfakeDataset",
    "batches",
    "build_features",
    "feature_hash",
    "preprocess_audio",
    "preprocess_image",
    "split_dataset",
]

log = logging.getLogger(__name__)

FEATURE_FORMAT = 1  # bump when the decoders change what they produce: old caches are then unused
INDEX_NAME = "index.json"
IMAGE_FORMATS = ("JPEG", "PNG", "MPO")  # MPO: the JPEG variant some cameras write
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768_000
TOP_DB = 80.0  # log-mel dynamic range kept below the loudest bin
# WAV format tags libsndfile decodes; anything else is an unsupported codec.
WAV_CODECS = {
    0x0001: "PCM",
    0x0002: "MS ADPCM",
    0x0003: "IEEE float",
    0x0006: "A-law",
    0x0007: "mu-law",
    0x0011: "IMA ADPCM",
    0x0031: "GSM 6.10",
}
WAV_CODEC_NAMES = {
    0x0050: "MPEG",
    0x0055: "MPEG Layer 3",
    0x0092: "Dolby AC-3",
    0x0161: "Windows Media Audio",
    0x2000: "AC-3",
}
WAVE_FORMAT_EXTENSIBLE = 0xFFFE


# --------------------------------------------------------------------------------------------
# Audio


def preprocess_audio(data: bytes, cfg: Any, where: str = "<audio>") -> np.ndarray:
    """Decode audio bytes to a normalised log-mel, float32 (1, n_mels, spec_frames).

    `cfg` is the `data` config section. Raises `CorruptSample` naming `where` for anything that
    cannot be decoded: empty, truncated, not audio, unsupported codec, absurd rate or length.
    """
    if not data:
        raise CorruptSample(f"{where}: empty file (0 bytes)")
    _check_riff_wave(data, where)
    try:
        with sf.SoundFile(io.BytesIO(data)) as snd:
            sr, frames, channels = snd.samplerate, snd.frames, snd.channels
            if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
                raise CorruptSample(f"{where}: absurd sample rate {sr} Hz")
            if frames <= 0:
                raise CorruptSample(f"{where}: holds no audio frames")
            if frames / sr > cfg.max_audio_seconds:
                raise CorruptSample(
                    f"{where}: {frames / sr:.1f} s long, over data.max_audio_seconds="
                    f"{cfg.max_audio_seconds}"
                )
            need = min(frames, math.ceil(cfg.clip_seconds * sr) + 1)
            y = snd.read(need, dtype="float32", always_2d=True)  # (frames, channels)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        raise CorruptSample(f"{where}: not a readable audio file ({_short(exc)})") from exc
    if len(y) < need:
        raise CorruptSample(f"{where}: truncated: header says {frames} frames, read {len(y)}")
    if not np.all(np.isfinite(y)):
        raise CorruptSample(f"{where}: holds NaN or infinite samples")
    mono = y.mean(axis=1) if channels > 1 else y[:, 0]
    return log_mel(mono, sr, cfg)


def log_mel(y: np.ndarray, sr: int, cfg: Any) -> np.ndarray:
    """Mono waveform at `sr` -> log-mel (1, n_mels, spec_frames) in [-1, 1], float32."""
    import librosa

    if sr != cfg.sample_rate:
        y = librosa.resample(y, orig_sr=sr, target_sr=cfg.sample_rate)
    clip = int(round(cfg.clip_seconds * cfg.sample_rate))
    y = np.pad(y[:clip], (0, max(0, clip - len(y))))
    n_fft, hop = mel_params(cfg)
    spec = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, center=True)) ** 2
    mel = _mel_basis(cfg.sample_rate, n_fft, cfg.n_mels) @ spec[:, : cfg.spec_frames]
    mel = np.pad(mel, ((0, 0), (0, max(0, cfg.spec_frames - mel.shape[1]))))
    peak = float(mel.max())
    if peak <= 1e-10:  # digital silence
        return np.full((1, cfg.n_mels, cfg.spec_frames), -1.0, dtype=np.float32)
    db = 10.0 * np.log10(np.maximum(mel, peak * 10 ** (-TOP_DB / 10)) / peak)  # [-80, 0]
    # The clip makes the documented range hold by construction: log10 and the division round
    # differently with each CPU's float kernels (AVX-512 or not), by an ulp either side.
    scaled = np.clip(db / (TOP_DB / 2) + 1.0, -1.0, 1.0)
    return scaled.astype(np.float32)[None]  # (1, n_mels, spec_frames)


def mel_params(cfg: Any) -> tuple[int, int]:
    """(n_fft, hop): spec_frames hops span clip_seconds; the window covers at least two hops."""
    clip = int(round(cfg.clip_seconds * cfg.sample_rate))
    hop = max(1, clip // cfg.spec_frames)
    n_fft = max(1024, 1 << math.ceil(math.log2(2 * hop)))
    return n_fft, hop


@lru_cache(maxsize=8)
def _mel_basis(sr: int, n_fft: int, n_mels: int) -> np.ndarray:
    import librosa

    return np.asarray(librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels), dtype=np.float32)


def _check_riff_wave(data: bytes, where: str) -> None:
    """For RIFF/WAVE: refuse codecs libsndfile cannot decode and data chunks cut short.

    libsndfile silently reads what is there of a truncated file, so the chunk sizes are checked
    here against the bytes actually present.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk_id == b"fmt " and size >= 2 and body + 2 <= len(data):
            tag = struct.unpack("<H", data[body : body + 2])[0]
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 26 and body + 26 <= len(data):
                tag = struct.unpack("<H", data[body + 24 : body + 26])[0]
            if tag not in WAV_CODECS:
                name = WAV_CODEC_NAMES.get(tag, "unknown")
                raise CorruptSample(
                    f"{where}: unsupported WAV codec 0x{tag:04X} ({name}); "
                    f"supported: {', '.join(WAV_CODECS.values())}"
                )
        elif chunk_id == b"data":
            present = len(data) - body
            if size not in (0, 0xFFFFFFFF) and size > present:
                raise CorruptSample(
                    f"{where}: truncated: the data chunk declares {size} bytes, {present} present"
                )
            return
        pos = body + size + (size & 1)


# --------------------------------------------------------------------------------------------
# Images


def preprocess_image(data: bytes, cfg: Any, where: str = "<image>") -> np.ndarray:
    """Decode image bytes to RGB uint8 (3, S, S), S = cfg.image_size (`cfg` = data section).

    The pixel count is checked from the header before any pixel is decoded, so a decompression
    bomb costs nothing. Raises `CorruptSample` naming `where`.
    """
    if not data:
        raise CorruptSample(f"{where}: empty file (0 bytes)")
    size = cfg.image_size
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if w * h > cfg.max_image_pixels:
            raise CorruptSample(
                f"{where}: {w}x{h} = {w * h} pixels, over data.max_image_pixels="
                f"{cfg.max_image_pixels} (refused as a possible decompression bomb)"
            )
        if img.format not in IMAGE_FORMATS:
            raise CorruptSample(
                f"{where}: {img.format} image; only {', '.join(IMAGE_FORMATS[:2])} are supported"
            )
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (size, size))  # decode at a reduced scale when much larger
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        out = rgb.resize((size, size), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError as exc:
        raise CorruptSample(f"{where}: refused as a decompression bomb ({_short(exc)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise CorruptSample(f"{where}: not a readable image ({_short(exc)})") from exc
    arr = np.asarray(out, dtype=np.uint8)  # (S, S, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, S, S)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; 16-bit greyscale is scaled, not clipped."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            top = max(float(arr.max()), 1e-12)
        grey = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    return img.convert("RGB")


def _short(exc: BaseException) -> str:
    text = str(exc).replace("<_io.BytesIO object at ", "<").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------------------------
# The feature build


def feature_hash(rows: Sequence[PairRow], cfg: Any) -> str:
    """Content key of a feature build: every pair's keys, ETags, label, split + the settings."""
    settings = preprocessing_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in sorted(rows, key=lambda r: r.pair_id):
        line = "\t".join(
            [r.pair_id, r.split, str(r.label), r.family, r.audio_key, r.audio_etag]
            + [r.image_key, r.image_etag]
        )
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:24]


def preprocessing_settings(cfg: Any) -> dict[str, Any]:
    """The `data` settings that change what the shards hold."""
    return {
        "format": FEATURE_FORMAT,
        "sample_rate": cfg.sample_rate,
        "n_mels": cfg.n_mels,
        "spec_frames": cfg.spec_frames,
        "clip_seconds": cfg.clip_seconds,
        "image_size": cfg.image_size,
        "max_audio_seconds": cfg.max_audio_seconds,
        "max_image_pixels": cfg.max_image_pixels,
        "shard_size": cfg.shard_size,
    }


@dataclass
class _Decoded:
    row: PairRow
    audio: np.ndarray | None
    image: np.ndarray | None
    problems: list[dict[str, str]] = field(default_factory=list)


def _load_pair(store: Storage, row: PairRow, cfg: Any) -> _Decoded:
    """Fetch and decode both files of a pair; the one place `CorruptSample` is caught."""
    out = _Decoded(row=row, audio=None, image=None)
    for key, decode in ((row.audio_key, preprocess_audio), (row.image_key, preprocess_image)):
        where = store.uri(key)
        try:
            arr = decode(store.read_bytes(key), cfg, where)
        except (CorruptSample, ObjectNotFound) as exc:
            reason = str(exc)
            reason = reason[len(where) + 2 :] if reason.startswith(where + ": ") else reason
            if isinstance(exc, ObjectNotFound):
                reason = "vanished after the manifest was built (" + reason + ")"
            out.problems.append({"key": key, "reason": reason, "stage": "decode"})
            continue
        if decode is preprocess_audio:
            out.audio = arr
        else:
            out.image = arr
    return out


def iter_decoded(
    store: Storage, rows: Sequence[PairRow], cfg: Any, concurrency: int
) -> Iterator[_Decoded]:
    """Decode pairs in manifest order, at most `concurrency` pairs (2x objects) in flight."""
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fetch") as pool:
        pending: deque[Future[_Decoded]] = deque()
        todo = iter(rows)
        for row in todo:
            pending.append(pool.submit(_load_pair, store, row, cfg))
            if len(pending) >= concurrency:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(pool.submit(_load_pair, store, nxt, cfg))
            yield done


class _ShardWriter:
    """Buffers decoded pairs of one split and writes a shard every `shard_size` pairs."""

    def __init__(self, store: Storage, prefix: str, split: str, shard_size: int) -> None:
        self.store, self.prefix, self.split, self.shard_size = store, prefix, split, shard_size
        self.items: list[tuple[PairRow, np.ndarray, np.ndarray]] = []
        self.keys: list[str] = []

    def add(self, row: PairRow, audio: np.ndarray, image: np.ndarray) -> None:
        self.items.append((row, audio, image))
        if len(self.items) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        key = f"{self.prefix}shard-{self.split}-{len(self.keys):05d}.npz"
        rows = [row for row, _, _ in self.items]
        write_shard(
            self.store,
            key,
            audio=np.stack([a for _, a, _ in self.items]),  # (N, 1, n_mels, spec_frames)
            image=np.stack([i for _, _, i in self.items]),  # (N, 3, S, S)
            label=np.array([r.label for r in rows], dtype=np.int8),  # (N,)
            pair_id=[r.pair_id for r in rows],
            family=[r.family for r in rows],
        )
        self.keys.append(key)
        self.items = []


def build_features(store: Storage, cfg: Any, manifest: ManifestRef) -> FeatureRef:
    """Shards for every usable pair of `manifest`, reused when the content key is cached.

    `cfg` is the PipelineConfig. The skipped files (listing + decoding) are written to
    `outputs/manifests/<run>/skipped.json`.
    """
    layout = Layout.from_config(cfg.storage)
    data = cfg.data
    rows = read_manifest(store, manifest.key)
    fhash = feature_hash(rows, data)
    prefix = layout.features(fhash)
    skipped_key = layout.manifest_dir(manifest.run) + "skipped.json"

    index = _cached_index(store, prefix, fhash)
    if index is not None:
        skipped = list(manifest.skipped) + index["skipped"]
        _write_skipped(store, skipped_key, manifest.run, skipped)
        log.info("feature cache hit %s: %d pairs", store.uri(prefix), index["n_pairs"])
        return FeatureRef(
            run=manifest.run,
            feature_hash=fhash,
            prefix=prefix,
            shards={s: [prefix + name for name in index["shards"][s]] for s in SPLITS},
            counts=index["counts"],
            skipped=skipped,
            skipped_key=skipped_key,
            cache_hit=True,
        )

    writers = {s: _ShardWriter(store, prefix, s, data.shard_size) for s in SPLITS}
    kept: list[PairRow] = []
    decode_skips: dict[str, dict[str, str]] = {}  # key -> entry; a file shared by pairs once
    n_bad_pairs = 0
    for item in iter_decoded(store, rows, data, data.fetch_concurrency):
        for problem in item.problems:
            decode_skips.setdefault(problem["key"], problem)
        if item.audio is None or item.image is None:
            n_bad_pairs += 1
            continue
        writers[item.row.split].add(item.row, item.audio, item.image)
        kept.append(item.row)
    for w in writers.values():
        w.flush()

    skipped = list(manifest.skipped) + list(decode_skips.values())
    _write_skipped(store, skipped_key, manifest.run, skipped)
    where = store.uri(prefix)
    if not kept:
        raise DataError(
            f"{manifest.uri}: no usable pair remains: all {len(rows)} pairs have a file that "
            f"cannot be decoded ({len(decode_skips)} files; see {store.uri(skipped_key)})"
        )
    counts = count_labels(kept)
    check_splits(counts, f"{manifest.uri} after skipping {n_bad_pairs} undecodable pairs")

    index = {
        "format": FEATURE_FORMAT,
        "feature_hash": fhash,
        "settings": preprocessing_settings(data),
        "n_pairs": len(kept),
        "counts": counts,
        "shards": {s: [k[len(prefix) :] for k in writers[s].keys] for s in SPLITS},
        "skipped": list(decode_skips.values()),
        "manifest": manifest.key,
    }
    store.write_bytes(prefix + INDEX_NAME, json.dumps(index, indent=1).encode(), "application/json")
    log.info(
        "features %s: %d pairs in %d shards, %d pairs skipped (%d bad files)",
        where,
        len(kept),
        sum(len(w.keys) for w in writers.values()),
        n_bad_pairs,
        len(decode_skips),
    )
    return FeatureRef(
        run=manifest.run,
        feature_hash=fhash,
        prefix=prefix,
        shards={s: list(writers[s].keys) for s in SPLITS},
        counts=counts,
        skipped=skipped,
        skipped_key=skipped_key,
        cache_hit=False,
    )


def _cached_index(store: Storage, prefix: str, fhash: str) -> dict[str, Any] | None:
    """The cache's index when it is complete and matches `fhash`, else None (rebuild)."""
    key = prefix + INDEX_NAME
    try:
        index = json.loads(store.read_bytes(key))
    except ObjectNotFound:
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        log.warning("%s: unreadable cache index, rebuilding (%s)", store.uri(key), exc)
        return None
    if (
        not isinstance(index, dict)
        or index.get("format") != FEATURE_FORMAT
        or index.get("feature_hash") != fhash
        or not isinstance(index.get("shards"), dict)
    ):
        log.warning("%s: cache index of another format or content, rebuilding", store.uri(key))
        return None
    present = {obj.key for obj in store.list(prefix)}
    missing = [n for s in SPLITS for n in index["shards"].get(s, []) if prefix + n not in present]
    if missing:
        log.warning("%s: %d shards missing, rebuilding", store.uri(prefix), len(missing))
        return None
    return index


def _write_skipped(store: Storage, key: str, run: str, skipped: list[dict[str, str]]) -> None:
    body = {"run": run, "n_skipped": len(skipped), "skipped": skipped}
    store.write_bytes(key, json.dumps(body, indent=1).encode(), "application/json")


def split_dataset(
    cfg: Any, features: FeatureRef, split: str, shuffle: bool = False
) -> DeepfakeDataset:
    """A `DeepfakeDataset` over one split's shards (`cfg` = PipelineConfig)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    n = sum(features.counts.get(split, {}).values())
    return DeepfakeDataset(
        cfg.storage, features.shards.get(split, []), shuffle=shuffle, seed=cfg.run.seed, n_samples=n
    )
