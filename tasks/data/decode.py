"""Decoding: the bytes of one audio or image file -> the array the models read, in memory.

    read_audio_prefix  the chunks of an audio object -> only its first bytes, as many as the
                       first data.clip_seconds need (the header says how many), so a file of any
                       length (an hour, ten) is never fetched nor held whole
    preprocess_audio   WAV/FLAC/OGG bytes, any rate and channel count -> mono, resampled to
                       data.sample_rate, first data.clip_seconds -> log-mel (1, n_mels, spec_frames)
                       in [-1, 1] (0 dB = the clip's loudest bin, -80 dB and below = -1)
    preprocess_image   JPEG/PNG bytes, any mode and size -> RGB uint8 (3, S, S), S = data.image_size

A file that cannot be decoded raises `CorruptSample` naming it: this is the one boundary where
soundfile, libsndfile and PIL errors are translated. The feature build (`tasks/data/features.py`)
catches it, skips the pair and reports the file.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import soundfile as sf
from PIL import Image, ImageOps

from config.schema import DataConfig
from tasks.data import spectral
from tasks.errors import CorruptSample

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
# Codecs whose frames are all block_align bytes (one sample per channel per frame): the bytes a
# clip needs are exact. The others (ADPCM, GSM) are reckoned from the header's bytes per second.
WAV_FIXED_FRAME = {0x0001, 0x0003, 0x0006, 0x0007}
# How far into a file its header may reach (metadata, album art, LIST chunks before the audio):
# past this without finding where the audio starts, the prefix is decoded as it is.
MAX_HEADER_BYTES = 16 << 20
# Containers whose header gives no byte rate (OGG, MP3, AIFF...): a bound above any compressed
# stream and above uncompressed PCM of up to 8 channels of 24 bit at 48 kHz (1.15 MB/s).
GENERIC_HEAD_BYTES = 1 << 20
GENERIC_BYTES_PER_S = 2 << 20


# --------------------------------------------------------------------------------------------
# Audio


def read_audio_prefix(chunks: Iterable[bytes], cfg: DataConfig) -> bytes:
    """The first bytes of an audio object, as many as decoding its first `clip_seconds` needs.

    Consumes `chunks` (a storage stream) only until then; the caller closes the stream, so the
    rest of a long file is never fetched. A file shorter than that comes back whole. When the
    header does not say where the audio starts within MAX_HEADER_BYTES, that much comes back
    and the decoder judges it.
    """
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        needed = audio_bytes_needed(bytes(buf[:MAX_HEADER_BYTES]), cfg)
        if needed is not None and len(buf) >= needed:
            return bytes(buf[:needed])
        if needed is None and len(buf) >= MAX_HEADER_BYTES:
            return bytes(buf)
    return bytes(buf)


def audio_bytes_needed(head: bytes, cfg: DataConfig) -> int | None:
    """Bytes from the start of an audio file that hold its first `clip_seconds` (and a margin),
    from its first bytes `head`; None when `head` does not reach the start of the audio yet.
    Never more than `max_prefix_bytes`, whatever a (broken) header claims."""
    needed = _bytes_needed(head, cfg)
    return None if needed is None else min(needed, max_prefix_bytes(cfg))


def max_prefix_bytes(cfg: DataConfig) -> int:
    """The most of one audio file ever fetched: the header allowance plus the clip at the
    highest rate accepted, 8 channels of 32 bit (72 MB in all for a 2-s clip)."""
    return MAX_HEADER_BYTES + math.ceil((cfg.clip_seconds + 0.25) * MAX_SAMPLE_RATE * 32)


def _bytes_needed(head: bytes, cfg: DataConfig) -> int | None:
    seconds = cfg.clip_seconds + 0.25  # the decoder reads clip + 1 frame; resampling edges
    wav = _wav_layout(head)
    if wav is not None:
        if wav.data_start is None:
            return None
        if not MIN_SAMPLE_RATE <= wav.rate <= MAX_SAMPLE_RATE or wav.block_align <= 0:
            return len(head)  # a broken header: the decoder refuses it with the reason
        if wav.tag in WAV_FIXED_FRAME:
            return wav.data_start + (math.ceil(seconds * wav.rate) + 2) * wav.block_align
        per_s = max(wav.bytes_per_s, wav.block_align)
        return wav.data_start + math.ceil(seconds * per_s) + 4 * wav.block_align
    if head[:4] == b"fLaC":
        return _flac_bytes_needed(head, seconds)
    return GENERIC_HEAD_BYTES + math.ceil((seconds + 1.0) * GENERIC_BYTES_PER_S)


def _flac_bytes_needed(head: bytes, seconds: float) -> int | None:
    """FLAC: past the metadata blocks, at most the uncompressed size of the clip (+ frame
    headers); STREAMINFO (always the first block) gives rate, channels and bits per sample."""
    pos, streaminfo = 4, None
    while True:
        if pos + 4 > len(head):
            return None
        last, kind = head[pos] & 0x80, head[pos] & 0x7F
        size = int.from_bytes(head[pos + 1 : pos + 4], "big")
        if kind == 0 and size >= 18 and pos + 4 + 18 <= len(head):
            streaminfo = head[pos + 4 : pos + 4 + 18]
        pos += 4 + size
        if last:
            break
    if streaminfo is None:
        return len(head)  # no STREAMINFO: broken, the decoder refuses it
    bits = int.from_bytes(streaminfo[10:14], "big")
    rate, channels, depth = bits >> 12, ((bits >> 9) & 0x7) + 1, ((bits >> 4) & 0x1F) + 1
    per_s = rate * channels * math.ceil(depth / 8)
    return pos + math.ceil(seconds * per_s * 1.1) + (64 << 10)


def preprocess_audio(data: bytes, cfg: DataConfig, where: str = "<audio>") -> np.ndarray:
    """Decode audio bytes to a normalised log-mel, float32 (1, n_mels, spec_frames).

    `data` is the whole file or its first bytes (`read_audio_prefix`): only the first
    `clip_seconds` are decoded, whatever the length the header declares. Raises `CorruptSample`
    naming `where` for anything that cannot be decoded: empty, truncated within the clip, not
    audio, unsupported codec, absurd rate.
    """
    if not data:
        raise CorruptSample(f"{where}: empty file (0 bytes)")
    _check_riff_wave(data, where, cfg)
    try:
        with sf.SoundFile(io.BytesIO(data)) as snd:
            sr, frames, channels = snd.samplerate, snd.frames, snd.channels
            if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
                raise CorruptSample(f"{where}: absurd sample rate {sr} Hz")
            if frames <= 0:
                raise CorruptSample(f"{where}: holds no audio frames")
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


def analysis_rate(cfg: DataConfig) -> int:
    """The rate the front-end works at: `sample_rate`, or with `band_limit_hz` twice the limit
    (when lower), so that the resampler's own low-pass removes everything above the limit and a
    wideband and a narrow-band recording of the same sound arrive alike."""
    if cfg.band_limit_hz is None:
        return cfg.sample_rate
    return min(cfg.sample_rate, int(round(2 * cfg.band_limit_hz)))


def log_mel(y: np.ndarray, sr: int, cfg: DataConfig) -> np.ndarray:
    """Mono waveform at `sr` -> log-mel (1, n_mels, spec_frames) in [-1, 1], float32."""
    rate = analysis_rate(cfg)
    y = spectral.resample(y, sr, rate)
    clip = int(round(cfg.clip_seconds * rate))
    y = np.pad(y[:clip], (0, max(0, clip - len(y))))
    n_fft, hop = mel_params(cfg)
    spec = spectral.stft_power(y, n_fft, hop)
    bands = filterbank(cfg.audio_bands, rate, n_fft, cfg.n_mels, cfg.band_limit_hz)
    mel = bands @ spec[:, : cfg.spec_frames]
    mel = np.pad(mel, ((0, 0), (0, max(0, cfg.spec_frames - mel.shape[1]))))
    peak = float(mel.max())
    if peak <= 1e-10:  # digital silence
        return np.full((1, cfg.n_mels, cfg.spec_frames), -1.0, dtype=np.float32)
    db = 10.0 * np.log10(np.maximum(mel, peak * 10 ** (-TOP_DB / 10)) / peak)  # [-80, 0]
    # The clip makes the documented range hold by construction: log10 and the division round
    # differently with each CPU's float kernels (AVX-512 or not), by an ulp either side.
    scaled = np.clip(db / (TOP_DB / 2) + 1.0, -1.0, 1.0)
    return scaled.astype(np.float32)[None]  # (1, n_mels, spec_frames)


def mel_params(cfg: DataConfig) -> tuple[int, int]:
    """(n_fft, hop) at `analysis_rate`: spec_frames hops span clip_seconds; the window covers at
    least two hops."""
    clip = int(round(cfg.clip_seconds * analysis_rate(cfg)))
    hop = max(1, clip // cfg.spec_frames)
    n_fft = max(1024, 1 << math.ceil(math.log2(2 * hop)))
    return n_fft, hop


def filterbank(
    kind: str, sr: int, n_fft: int, n_bands: int, fmax: float | None = None
) -> np.ndarray:
    """(n_bands, n_fft // 2 + 1) float32 triangular filters from 0 Hz to `fmax` (default: the
    Nyquist frequency, and never above it): mel-spaced (Slaney's scale and norm, as librosa's) or
    linearly spaced (each filter of unit area). Nothing above `fmax` reaches any band."""
    top = min(float(fmax), sr / 2) if fmax is not None else sr / 2
    return _filterbank(kind, sr, n_fft, n_bands, top)


@lru_cache(maxsize=16)
def _filterbank(kind: str, sr: int, n_fft: int, n_bands: int, top: float) -> np.ndarray:
    if kind == "mel":
        return spectral.mel_filters(sr, n_fft, n_bands, top)
    if kind != "linear":
        raise ValueError(f"audio bands {kind!r} are not one of mel, linear")
    freqs = np.linspace(0.0, sr / 2, n_fft // 2 + 1)
    edges = np.linspace(0.0, top, n_bands + 2)  # filter k spans edges[k] .. edges[k + 2]
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None] - lo) / (mid - lo)
    falling = (hi - freqs[None]) / (hi - mid)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)  # (n_bands, bins)
    area = tri.sum(axis=1, keepdims=True)
    return np.asarray(tri / np.maximum(area, 1e-12), dtype=np.float32)


@dataclass(frozen=True)
class _WavLayout:
    """What a RIFF/WAVE header says (the fields the prefix and truncation checks need)."""

    tag: int | None = None  # codec (the sub-format's, for WAVE_FORMAT_EXTENSIBLE)
    rate: int = 0
    bytes_per_s: int = 0
    block_align: int = 0
    data_start: int | None = None  # offset of the first audio byte
    data_size: int | None = None  # the data chunk's declared size (0 / 0xFFFFFFFF: unknown)


def _wav_layout(data: bytes) -> _WavLayout | None:
    """The RIFF/WAVE header of `data` (the file or its first bytes); None when not RIFF/WAVE."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    fields: dict[str, int] = {}
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if chunk_id == b"fmt " and size >= 2 and body + 2 <= len(data):
            tag = struct.unpack("<H", data[body : body + 2])[0]
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 26 and body + 26 <= len(data):
                tag = struct.unpack("<H", data[body + 24 : body + 26])[0]
            fields["tag"] = tag
            if size >= 14 and body + 14 <= len(data):
                _, rate, per_s, align = struct.unpack("<HIIH", data[body + 2 : body + 14])
                fields.update(rate=rate, bytes_per_s=per_s, block_align=align)
        elif chunk_id == b"data":
            return _WavLayout(**fields, data_start=body, data_size=size)
        pos = body + size + (size & 1)
    return _WavLayout(**fields)


def _check_riff_wave(data: bytes, where: str, cfg: DataConfig) -> None:
    """For RIFF/WAVE: refuse codecs libsndfile cannot decode and data cut short within the clip.

    libsndfile silently reads what is there of a truncated file, so the data chunk's declared
    size is checked here against the bytes present: they must cover the whole chunk or at
    least the part the clip needs (`data` may be a prefix: `read_audio_prefix`).
    """
    wav = _wav_layout(data)
    if wav is None:
        return
    if wav.tag is not None and wav.tag not in WAV_CODECS:
        name = WAV_CODEC_NAMES.get(wav.tag, "unknown")
        raise CorruptSample(
            f"{where}: unsupported WAV codec 0x{wav.tag:04X} ({name}); "
            f"supported: {', '.join(WAV_CODECS.values())}"
        )
    if wav.rate and not MIN_SAMPLE_RATE <= wav.rate <= MAX_SAMPLE_RATE:
        raise CorruptSample(f"{where}: absurd sample rate {wav.rate} Hz")
    if wav.data_start is None or wav.data_size is None:
        return
    size, present = wav.data_size, len(data) - wav.data_start
    if size in (0, 0xFFFFFFFF) or size <= present:
        return
    if wav.rate > 0 and wav.block_align > 0:
        frames = math.ceil(cfg.clip_seconds * wav.rate) + 1
        per_s = max(wav.bytes_per_s, wav.block_align)
        clip = (
            frames * wav.block_align
            if wav.tag in WAV_FIXED_FRAME
            else math.ceil(cfg.clip_seconds * per_s)
        )
        if present >= min(size, clip):
            return
    raise CorruptSample(
        f"{where}: truncated: the data chunk declares {size} bytes, {present} present"
    )


# --------------------------------------------------------------------------------------------
# Images


def preprocess_image(data: bytes, cfg: DataConfig, where: str = "<image>") -> np.ndarray:
    """Decode image bytes to RGB uint8 (3, S, S), S = cfg.image_size, or in crop mode
    (3, C, C), C = S + crop_margin: the centre of the picture at its native resolution (padded by
    reflection when smaller), so the crops taken later keep the high-frequency traces.

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
        crop = cfg.image_mode == "crop"
        keep = size + cfg.crop_margin if crop else size
        if img.format in ("JPEG", "MPO"):  # decode at a reduced scale when much larger
            img.draft("RGB", (4 * keep, 4 * keep) if crop else (size, size))
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
        if crop:
            return centre_square(np.asarray(rgb, dtype=np.uint8), keep)  # (3, C, C)
        out = rgb.resize((size, size), Image.Resampling.BILINEAR)
    except Image.DecompressionBombError as exc:
        raise CorruptSample(f"{where}: refused as a decompression bomb ({_short(exc)})") from exc
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as exc:
        raise CorruptSample(f"{where}: not a readable image ({_short(exc)})") from exc
    arr = np.asarray(out, dtype=np.uint8)  # (S, S, 3)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))  # (3, S, S)


def centre_square(rgb: np.ndarray, side: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, side, side): the centre, native pixels; reflection-padded where
    the picture is smaller (never upsampled, which would smear the traces)."""
    h, w = rgb.shape[:2]
    pad_h, pad_w = max(0, side - h), max(0, side - w)
    if pad_h or pad_w:
        widths = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0))
        if min(h, w) > 1:
            rgb = np.pad(rgb, widths, mode="reflect")
        else:  # a single row or column has nothing to mirror
            rgb = np.pad(rgb, widths, mode="edge")
        h, w = rgb.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    square = rgb[top : top + side, left : left + side]  # (side, side, 3)
    return np.ascontiguousarray(square.transpose(2, 0, 1))  # (3, side, side)


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
