"""The decode processes of the feature build: one pair's bytes in, its arrays (or why not) out.

    decode_pair    both files of a pair -> (log-mel | None, image | None, skipped-file entries);
                   the one place `CorruptSample` is caught, in whichever process decodes
    decode_pool    `n` processes that run `decode_pair`, each on its own core

Kept apart from `features.py` on purpose: a decode process imports only this module, the
decoders and the config schema (no torch, no pandas, no boto3), so it starts in a fraction of a
second and never holds a storage client. The processes are spawned, never forked: the feature
build runs inside a Prefect flow, whose threads make a plain fork unsafe.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from config.schema import DataConfig
from tasks.data.decode import preprocess_audio, preprocess_image
from tasks.errors import CorruptSample, ObjectNotFound

Fetched = bytes | dict[str, str]  # an object's bytes, or its skipped-file entry (it vanished)
# What decoding a pair gives: (log-mel or None, image or None, skipped-file entries).
DecodeResult = tuple[np.ndarray | None, np.ndarray | None, list[dict[str, str]]]
START_METHOD = "spawn"  # see the module docstring; forkserver would leave a socket in $TMPDIR


def problem(key: str, where: str, exc: CorruptSample | ObjectNotFound) -> dict[str, str]:
    """A skipped-file entry: the key, the reason without the leading "<uri>: ", the stage."""
    reason = str(exc)
    reason = reason[len(where) + 2 :] if reason.startswith(where + ": ") else reason
    if isinstance(exc, ObjectNotFound):
        reason = "vanished after the manifest was built (" + reason + ")"
    return {"key": key, "reason": reason, "stage": "decode"}


def decode_pair(
    audio: Fetched, image: Fetched, keys: tuple[str, str], wheres: tuple[str, str], cfg: DataConfig
) -> DecodeResult:
    """Decode both files of a pair (`keys` are storage keys, `wheres` their URIs, for messages).
    A bad file becomes an entry of the skipped-file list, never an error."""
    out: list[np.ndarray | None] = [None, None]
    problems: list[dict[str, str]] = []
    for i, (data, decode) in enumerate(((audio, preprocess_audio), (image, preprocess_image))):
        if isinstance(data, dict):  # vanished: already an entry
            problems.append(data)
            continue
        try:
            out[i] = decode(data, cfg, wheres[i])
        except CorruptSample as exc:
            problems.append(problem(keys[i], wheres[i], exc))
    return out[0], out[1], problems


_WORKER_CFG: DataConfig | None = None  # the settings this decode process was started with
_LIMITS: threadpool_limits | None = None  # this decode process's BLAS limit, kept for its life


def one_blas_thread() -> threadpool_limits:
    """BLAS and OpenMP held to one thread (for as long as the result lives, or as a `with`).

    The decoders' products are small (a 128 x 513 filterbank times a 513 x 129 spectrogram):
    extra BLAS threads only wake up and contend, measured 6x slower than one thread per
    decoding process on a busy 2-core machine. Parallelism comes from the processes instead.
    """
    return threadpool_limits(limits=1)


def _init_worker(cfg: DataConfig) -> None:
    """Runs once in each decode process: one BLAS thread, the settings, and one throwaway
    decode, so the first real pair is not the one that pays for librosa's lazy imports."""
    global _WORKER_CFG, _LIMITS
    _LIMITS = one_blas_thread()
    _WORKER_CFG = cfg
    try:
        preprocess_audio(_WARM_WAV, cfg, "<warm-up>")
    except CorruptSample:  # settings that refuse even this (a tiny max_audio_seconds): no matter
        pass


def decode_in_worker(
    audio: Fetched, image: Fetched, keys: tuple[str, str], wheres: tuple[str, str]
) -> DecodeResult:
    """`decode_pair` with the settings the process was started with (what the pool runs)."""
    if _WORKER_CFG is None:
        raise RuntimeError("decode_in_worker called outside a decode_pool process")
    return decode_pair(audio, image, keys, wheres, _WORKER_CFG)


def _silence_wav(seconds: float = 0.5, rate: int = 16000) -> bytes:
    """A short silent 16-bit mono WAV (the warm-up input), built by hand."""
    body = b"\x00\x00" * int(seconds * rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, 16 bit
    return (
        b"RIFF" + struct.pack("<I", 36 + len(body)) + b"WAVE"
        + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(body)) + body
    )  # fmt: skip


_WARM_WAV = _silence_wav()


def decode_pool(cfg: DataConfig, n: int) -> ProcessPoolExecutor:
    """`n` decode processes, each given `cfg` once at start (not with every pair)."""
    return ProcessPoolExecutor(
        max_workers=n,
        mp_context=mp.get_context(START_METHOD),
        initializer=_init_worker,
        initargs=(cfg,),
    )
