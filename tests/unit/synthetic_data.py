"""Helpers for the data tests: a generated benchmark held in memory and copied into any backend,
tiny configs, the data steps' calls, a storage wrapper that counts reads, and one planted file of
every bad kind."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from PIL import Image

from config.load import validate_config
from config.schema import PipelineConfig
from tasks.data.features import build_features
from tasks.data.manifest import build_manifest
from tasks.data.synthetic import generate
from tasks.io.layout import Layout
from tasks.io.storage import CHUNK, ObjectInfo, Storage
from tasks.refs import FeatureRef, ManifestRef

TINY_DATA = {
    "n_mels": 32,
    "spec_frames": 32,
    "image_size": 32,
    "shard_size": 8,
    "fetch_concurrency": 2,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "max_image_pixels": 4_000_000,
}


def tiny_config(store_kind: str, tmp_path: Path, server: Any = None, **data: Any) -> PipelineConfig:
    """A config on a fresh local folder or a fresh moto bucket, with tiny preprocessing sizes."""
    if store_kind == "local":
        storage = {"uri": str(tmp_path / "bucket")}
    else:
        storage = {"uri": f"s3://{server.new_bucket()}", "endpoint_url": server.endpoint_url}
    return validate_config({"storage": storage, "data": {**TINY_DATA, **data}, "run": {"seed": 7}})


def manifest_of(store: Storage, cfg: PipelineConfig, run: str) -> ManifestRef:
    """`build_manifest` as the build-manifest step calls it."""
    layout = Layout.from_config(cfg.storage)
    return build_manifest(store, layout, cfg.data, cfg.run.seed, run)


def features_of(store: Storage, cfg: PipelineConfig, manifest: ManifestRef) -> FeatureRef:
    """`build_features` as the build-features step calls it."""
    return build_features(store, Layout.from_config(cfg.storage), cfg.data, manifest)


class MemoryStore:
    """Just enough of the Storage interface for `make_dataset.generate` to write into a dict."""

    root_uri = "memory://"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def uri(self, key: str) -> str:
        return self.root_uri + key

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        with self.lock:
            self.objects[key] = data
        return self.uri(key)


def generated(n: int, seed: int = 11) -> dict[str, bytes]:
    """The benchmark's objects (keys under dataset/), generated in memory."""
    mem = MemoryStore()
    generate(mem, Layout(), n, seed, workers=2)  # type: ignore[arg-type]
    return mem.objects


def load_into(store: Storage, objects: dict[str, bytes]) -> None:
    store.check()
    for key, data in objects.items():
        store.write_bytes(key, data)


class CountingStore:
    """Wraps a Storage; counts objects read per key prefix and the most reads at once.

    `latency` (seconds) is added to every read, as a network would, so overlaps are observable.
    """

    def __init__(self, inner: Storage, latency: float = 0.0) -> None:
        self.inner = inner
        self.latency = latency
        self.root_uri = inner.root_uri
        self.reads: list[str] = []
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def read_bytes(self, key: str) -> bytes:
        with self.lock:
            self.reads.append(key)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            time.sleep(self.latency)
            return self.inner.read_bytes(key)
        finally:
            with self.lock:
                self.active -= 1

    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        yield self.read_bytes(key)

    def count(self, prefix: str) -> int:
        return sum(1 for k in self.reads if k.startswith(prefix))

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


# --------------------------------------------------------------------------------------------
# Files of every bad kind


def wav_bytes(seconds: float = 1.0, sr: int = 16000, channels: int = 1, **kw: Any) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * 220 * t)
    y = np.repeat(y[:, None], channels, axis=1)
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=kw.get("format", "WAV"), subtype=kw.get("subtype", "PCM_16"))
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but carries almost no data (a bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def wav_with_codec(tag: int) -> bytes:
    data = bytearray(wav_bytes(0.5))
    pos = data.find(b"fmt ")
    data[pos + 8 : pos + 10] = struct.pack("<H", tag)
    return bytes(data)


def wav_with_rate(rate: int) -> bytes:
    """A WAV whose header claims `rate` samples per second (the audio itself is 16 kHz)."""
    data = bytearray(wav_bytes(0.5))
    pos = data.find(b"fmt ")
    data[pos + 12 : pos + 16] = struct.pack("<I", rate)
    return bytes(data)


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Key under dataset/ -> (content, a phrase the reported reason must contain).

    Decode-time kinds; the listing-time kinds (zero bytes, wrong extension, stray file) are in
    `listing_bad_files`.
    """
    good_wav = wav_bytes(1.0)
    good_jpg = image_bytes("JPEG", (64, 48))
    good_png = image_bytes("PNG", (64, 48))
    return {
        "audio/fake/bad-truncated.wav": (good_wav[: len(good_wav) // 2], "truncated"),
        "audio/real/bad-text.wav": (b"this is a text file, not audio\n" * 20, "not a readable"),
        "audio/fake/bad-codec.wav": (wav_with_codec(0x0055), "unsupported WAV codec"),
        "audio/real/bad-absurd-rate.wav": (wav_with_rate(10**9), "absurd sample rate"),
        "images/fake/bad-truncated.jpg": (good_jpg[: len(good_jpg) // 2], "not a readable"),
        "images/real/bad-truncated.png": (good_png[: len(good_png) // 2], "not a readable"),
        "images/fake/bad-text.png": (b"<html>not an image</html>" * 10, "not a readable image"),
        "images/real/bad-gif.png": (image_bytes("GIF", (20, 20), "P"), "GIF image"),
        "images/fake/bad-bomb.png": (png_header_only(3000, 3000), "max_image_pixels"),
        "images/real/bad-huge-bomb.png": (png_header_only(100_000, 100_000), "bomb"),
    }


def listing_bad_files() -> dict[str, tuple[bytes, str]]:
    return {
        "audio/real/bad-empty.wav": (b"", "empty file (0 bytes)"),
        "images/fake/bad-empty.jpg": (b"", "empty file (0 bytes)"),
        "audio/real/clip.mp4": (b"\x00\x00\x00\x18ftypmp42", "unsupported extension"),
        "notes/readme.txt": (b"hello", "not under audio/"),
        "images/unsure/face.png": (image_bytes("PNG"), "neither real/ nor fake/"),
    }
