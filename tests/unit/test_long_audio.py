"""Long audio is not corrupt: a valid file of any length (61 s, ten hours) decodes to the log-mel
of its first data.clip_seconds, and only as many bytes as that clip needs are fetched; a file cut
short within the clip, or a header that makes no sense, is still refused with the reason."""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from config.load import validate_config
from config.schema import DataConfig
from tasks.data.decode import (
    GENERIC_BYTES_PER_S,
    GENERIC_HEAD_BYTES,
    max_prefix_bytes,
    preprocess_audio,
    read_audio_prefix,
)
from tasks.data.workers import fetch
from tasks.errors import ConfigError, CorruptSample
from tasks.io.storage import LocalStorage, S3Storage

CFG = DataConfig(n_mels=32, spec_frames=32)  # clip_seconds 2.0 at 16 kHz


def tone(seconds: float, sr: int = 16000, channels: int = 1) -> np.ndarray:
    """Noise and a gliding tone: every clip of it looks different, so a wrong offset shows."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(3)
    y = 0.3 * np.sin(2 * np.pi * (200 + 40 * t) * t) + 0.05 * rng.standard_normal(t.size)
    return np.repeat(y[:, None], channels, axis=1).astype(np.float32)


def encoded(y: np.ndarray, sr: int, fmt: str = "WAV", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def chunks_of(data: bytes, size: int = 1 << 16) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_61_second_wav_decodes_to_its_first_clip() -> None:
    y = tone(61.0)
    long_wav = encoded(y, 16000)
    first_clip = encoded(y[: 2 * 16000 + 10], 16000)
    got = preprocess_audio(long_wav, CFG, "long.wav")
    assert got.shape == (1, 32, 32)
    np.testing.assert_allclose(got, preprocess_audio(first_clip, CFG, "clip.wav"), atol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "subtype", "sr", "channels"),
    [
        ("WAV", "PCM_16", 16000, 1),
        ("WAV", "PCM_24", 44100, 2),
        ("WAV", "FLOAT", 48000, 8),
        ("WAV", "ULAW", 8000, 1),
        ("WAV", "IMA_ADPCM", 16000, 1),
        ("WAV", "GSM610", 8000, 1),
        ("FLAC", "PCM_16", 16000, 2),
        ("OGG", "VORBIS", 16000, 1),
    ],
)
def test_only_the_prefix_the_clip_needs_is_read_and_it_decodes_alike(
    fmt: str, subtype: str, sr: int, channels: int
) -> None:
    data = encoded(tone(61.0, sr, channels), sr, fmt, subtype)
    prefix = read_audio_prefix(chunks_of(data), CFG)
    assert data.startswith(prefix)
    if fmt == "OGG":  # no byte rate in the header: a fixed bound, above any compressed stream
        assert len(prefix) <= GENERIC_HEAD_BYTES + 3.25 * GENERIC_BYTES_PER_S
    else:  # the header gives the byte rate: 2 s of 61 (+ header and margin)
        assert len(prefix) < len(data) / 5
    np.testing.assert_allclose(
        preprocess_audio(prefix, CFG, "prefix"), preprocess_audio(data, CFG, "whole"), atol=1e-4
    )


def ten_hour_wav(consumed: list[int], sr: int = 16000) -> Iterator[bytes]:
    """A valid 10-hour 16-bit mono WAV (1.15 GB), made chunk by chunk as it is read: never
    held whole, here or by the reader. `consumed` counts the bytes handed out."""
    data_size = 10 * 3600 * sr * 2
    fmt = struct.pack("<HHIIHH", 1, 1, sr, sr * 2, 2, 16)
    header = (
        b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE"
        + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", data_size)
    )  # fmt: skip
    consumed.append(len(header))
    yield header
    block = (tone(1.0, sr)[:, 0] * 32767).astype("<i2").tobytes()  # one second per chunk
    for _ in range(10 * 3600):
        consumed.append(len(block))
        yield block


def test_a_ten_hour_wav_is_read_only_partly() -> None:
    consumed: list[int] = []
    prefix = read_audio_prefix(ten_hour_wav(consumed), CFG)
    assert sum(consumed) < 5 * 32000  # the header and a few one-second chunks, of 36,000
    assert len(prefix) <= sum(consumed)
    out = preprocess_audio(prefix, CFG, "ten-hours.wav")
    assert out.shape == (1, 32, 32) and np.isfinite(out).all() and out.std() > 0.05


def test_a_broken_header_never_makes_the_reader_take_the_whole_file() -> None:
    good = bytearray(encoded(tone(61.0), 16000))
    pos = good.find(b"fmt ")
    good[pos + 12 : pos + 16] = struct.pack("<I", 10**9)  # absurd sample rate
    consumed: list[int] = []

    def counted() -> Iterator[bytes]:
        for chunk in chunks_of(bytes(good)):
            consumed.append(len(chunk))
            yield chunk

    prefix = read_audio_prefix(counted(), CFG)
    assert sum(consumed) <= 1 << 16 and len(prefix) <= 1 << 16
    with pytest.raises(CorruptSample, match="absurd sample rate 1000000000 Hz"):
        preprocess_audio(prefix, CFG, "broken.wav")
    assert max_prefix_bytes(CFG) < 72 << 20  # whatever a header claims, at most this is read


def test_truncated_within_the_clip_is_refused_but_beyond_it_is_not() -> None:
    wav = encoded(tone(61.0), 16000)
    cut_early = wav[: 44 + 16000 * 2]  # 1 s of the 61 the header declares, short of the 2-s clip
    with pytest.raises(CorruptSample, match=r"^cut\.wav: truncated: the data chunk declares"):
        preprocess_audio(cut_early, CFG, "cut.wav")
    cut_late = wav[: len(wav) // 2]  # 30 s present: the clip is whole, the rest is never used
    assert preprocess_audio(cut_late, CFG, "half.wav").shape == (1, 32, 32)
    short = encoded(tone(1.0), 16000)  # shorter than the clip: whole, it is padded
    assert preprocess_audio(short, CFG, "short.wav").shape == (1, 32, 32)
    with pytest.raises(CorruptSample, match="truncated"):  # cut, it is refused
        preprocess_audio(short[: len(short) // 2], CFG, "short.wav")


def test_the_fetch_reads_audio_only_partly_from_s3_and_a_folder(
    tmp_path: Path, s3_server, s3_bucket: str
) -> None:  # type: ignore[no-untyped-def]
    wav = encoded(tone(61.0), 16000)
    key = "dataset/audio/real/long.wav"
    stores = [
        LocalStorage(str(tmp_path)),
        S3Storage(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url),
    ]
    for store in stores:
        store.write_bytes(key, wav)
        got = fetch(store, key, CFG)
        assert isinstance(got, bytes) and wav.startswith(got)
        assert len(got) < len(wav) / 10, store.root_uri
        assert fetch(store, key) == wav  # images (no audio settings) are read whole
        np.testing.assert_allclose(
            preprocess_audio(got, CFG, key), preprocess_audio(wav, CFG, key), atol=1e-5
        )


def test_max_audio_seconds_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match=r"data: max_audio_seconds was removed: audio of any"):
        validate_config({"data": {"max_audio_seconds": 60.0}})
