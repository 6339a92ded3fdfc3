"""The decode processes of the feature build: pairs' keys in, their arrays (or why not) out.

    fetch             one object's bytes (an audio file's first bytes only), or its skipped entry
    decode_pair       both files of a pair -> (log-mel | None, image | None, skipped entries);
                      the one place `CorruptSample` is caught, in whichever process decodes
    decode_processes  pairs fetched and decoded by `n` processes, each on its own core, each
                      with its own storage client and fetch threads; results in input order
    decode_pool       `n` processes that run `decode_pair` on bytes given to them (the benchmark's
                      decode bound)

Each process fetches its own pairs, so the HTTP work (botocore is Python: signing, parsing) is
spread over every core like the decoding, and no raw bytes cross a process boundary. Kept apart
from `features.py` on purpose: a decode process imports only this module, the decoders, the
storage module and the config schema (no torch, no pandas). The processes are spawned, never
forked: the feature build runs inside a Prefect flow, whose threads make a fork unsafe; the
storage client is created in the process on first use (it is never pickled).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import pickle
import queue
import struct
import traceback
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from config.schema import DataConfig
from tasks.data.decode import preprocess_audio, preprocess_image, read_audio_prefix
from tasks.errors import CorruptSample, DataError, ObjectNotFound
from tasks.io.storage import Storage

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


def fetch(store: Storage, key: str, audio: DataConfig | None = None) -> Fetched:
    """One object's bytes, or its skipped-file entry when it vanished since the manifest. With
    `audio`, only the first bytes its first clip_seconds need (a long file is never read whole)."""
    try:
        if audio is not None:
            chunks = store.stream(key)
            try:
                return read_audio_prefix(chunks, audio)
            finally:  # a generator: closing it ends the GET where the prefix ends
                getattr(chunks, "close", lambda: None)()
        return store.read_bytes(key)
    except ObjectNotFound as exc:
        return problem(key, store.uri(key), exc)


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
    decode, so the first real pair is not the one that pays for the decoders' lazy imports."""
    global _WORKER_CFG, _LIMITS
    _WORKER_CFG = cfg
    try:
        preprocess_audio(_WARM_WAV, cfg, "<warm-up>")
    except CorruptSample:  # settings that refuse even this: no matter
        pass
    # After the warm-up: threadpoolctl limits the libraries loaded so far, and the decoders'
    # lazy imports (soxr, numpy's FFT) have happened by now.
    _LIMITS = one_blas_thread()


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


# --------------------------------------------------------------------------------------------
# Fetch + decode in processes

Job = tuple[int, tuple[str, str], tuple[str, str]]  # (index, (audio, image) keys, their URIs)


def process_threads(concurrency: int, workers: int) -> int:
    """Fetch threads in each of `workers` processes: data.fetch_concurrency shared out, and at
    least two (both files of a pair at once)."""
    return max(2, math.ceil(concurrency / workers))


def process_window(concurrency: int, workers: int) -> int:
    """Pairs between being handed to the processes and being yielded: each process fetches
    threads/2 pairs while it decodes one, and as many again wait their turn, so no process
    starves while the slowest pair holds the order back. Memory is bounded by this."""
    return 2 * workers * (process_threads(concurrency, workers) // 2 + 1)


def _process_main(
    cfg: DataConfig, store: Storage, jobs: Any, results: Any, threads: int, wid: int
) -> None:  # pragma: no cover - runs in the spawned process (the tests see its results)
    """Decode process `wid`: take jobs from its queue as long as fewer than threads/2 pairs are
    being fetched here, decode them in the order taken,
    put (index, result) on `results`; (-1, the exception) on an error (a storage error that
    is not a vanished object, a bug)."""
    _init_worker(cfg)
    depth = max(1, threads // 2)
    parent = mp.parent_process()
    pending: deque[tuple[int, tuple[str, str], tuple[str, str], list[Future[Fetched]]]] = deque()
    ended = False
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fetch") as pool:
            while True:
                while not ended and len(pending) <= depth:
                    try:
                        job = jobs.get(timeout=1.0) if not pending else jobs.get_nowait()
                    except queue.Empty:
                        if not pending and parent is not None and not parent.is_alive():
                            # the build's process is gone (killed): so is the work, and nobody
                            # reads what is left in the queue: exit without flushing it
                            results.cancel_join_thread()
                            return
                        break
                    if job is None:
                        ended = True
                        break
                    index, keys, wheres = job
                    fetches = [
                        pool.submit(fetch, store, keys[0], cfg),
                        pool.submit(fetch, store, keys[1]),
                    ]
                    pending.append((index, keys, wheres, fetches))
                if not pending:
                    if ended:
                        return
                    continue
                index, keys, wheres, (audio, image) = pending.popleft()
                decoded = decode_pair(audio.result(), image.result(), keys, wheres, cfg)
                results.put((index, wid, decoded))
    except BaseException as exc:  # noqa: BLE001 - handed to the parent, which raises it
        results.put((-1, wid, _portable(exc)))


def _portable(exc: BaseException) -> BaseException:
    """`exc` as the parent can re-raise it: the same type when it pickles (a `Throttled` stays
    a `Throttled`, so the step's retry policy still sees it), with this process's traceback as
    a note; else a `DataError` holding that traceback."""
    text = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - anything unpicklable is reported as text
        return DataError(f"a decode process failed (data.decode_workers):\n{text}")
    exc.add_note(f"raised in a decode process:\n{text}")
    return exc


def decode_processes(
    store: Storage, jobs: Sequence[Job], cfg: DataConfig, concurrency: int, workers: int
) -> Iterator[DecodeResult]:
    """Fetch and decode every job in `workers` spawned processes; results in the jobs' order.

    At most `process_window` jobs are out at once. A process that dies (killed for memory) or
    fails is a `DataError` naming data.decode_workers; the others are stopped either way.
    """
    ctx: Any = mp.get_context(START_METHOD)
    # A queue per process: with one shared queue, a process blocked in get() holds the queue's
    # reader lock, so another's get_nowait() fails and it stops refilling for that moment. The
    # parent hands each job to the process with the fewest outstanding.
    job_qs = [ctx.Queue() for _ in range(workers)]
    result_q = ctx.Queue()
    threads = process_threads(concurrency, workers)
    procs = [
        ctx.Process(
            target=_process_main,
            args=(cfg, store, job_qs[i], result_q, threads, i),
            name=f"decode-{i}",
            daemon=True,
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()
    window = process_window(concurrency, workers)
    outstanding = [0] * workers
    sent, done = 0, 0
    ready: dict[int, DecodeResult] = {}

    def send() -> None:
        nonlocal sent
        w = min(range(workers), key=outstanding.__getitem__)
        job_qs[w].put(jobs[sent])
        outstanding[w] += 1
        sent += 1

    try:
        while sent < min(window, len(jobs)):
            send()
        while done < len(jobs):
            while done not in ready:
                try:
                    index, wid, result = result_q.get(timeout=1.0)
                except queue.Empty:
                    dead = [p for p in procs if not p.is_alive()]
                    if not dead:
                        continue
                    try:  # what it put before it ended (its error) may have arrived meanwhile
                        index, wid, result = result_q.get(timeout=1.0)
                    except queue.Empty:
                        raise DataError(
                            f"decode process {dead[0].name} died (exit code {dead[0].exitcode}; "
                            f"killed for memory?): lower data.decode_workers (now "
                            f"{cfg.decode_workers}, {workers} processes)"
                        ) from None
                if index < 0:
                    raise result
                outstanding[wid] -= 1
                ready[index] = result
            yield ready.pop(done)
            done += 1
            if sent < len(jobs):
                send()
    finally:
        for q in job_qs:
            q.put(None)
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
        for q in job_qs:
            q.cancel_join_thread()
            q.close()
        result_q.close()
