"""The feature build, streamed: bucket objects -> in-memory decode -> shards in a content cache.

    build_features     every pair of a manifest, fetched with at most data.fetch_concurrency objects
                       in flight (both files of a pair at once), decoded in memory by
                       `tasks/data/decode.py` in data.decode_workers processes (raw objects never
                       touch the local disk), written as shards (`tasks/data/shards.py`) under
                       `Layout.features(<hash>)` by a background thread

The stages (`iter_decoded`): a thread pool fetches (I/O releases the GIL, so one process keeps
the round trip covered); each pair whose two objects are in goes to a pool of spawned decode
processes (`tasks/data/workers.py`: one core each, no fork of the threaded flow process, no
storage client in them); results come back in manifest order, so shards, their names and the
skipped list are the same whatever the number of processes; at most fetch_concurrency +
2 x workers pairs are in flight and at most two finished shards wait for their PUT, so memory is
bounded by that window, not by the dataset.

The cache key is a hash of every pair's keys, ETags, label and split plus the preprocessing
settings, so a second run on unchanged data finds `index.json` under that prefix and reads no raw
object at all. The index is written last: a build that died half way is never taken for a hit.

A file that cannot be decoded raises `CorruptSample` inside its decoder; `decode_pair` catches it
(the one place, in whichever process decodes) and the pair is skipped, counted and listed with
the key and the reason in the run's skipped-file list (`Layout.skipped(run)`, together with the
manifest's listing skips) and in
`FeatureRef.skipped`. The step fails (`DataError`) only when no usable pair remains or a split has
lost every real or every fake pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from config.schema import DataConfig
from tasks import progress
from tasks.data.manifest import PairRow, check_splits, count_labels, read_manifest
from tasks.data.shards import write_shard
from tasks.data.skipped import write_skipped
from tasks.data.workers import (
    decode_pair,
    decode_processes,
    fetch,
    one_blas_thread,
)
from tasks.errors import DataError, ObjectNotFound
from tasks.io.layout import SPLITS, Layout
from tasks.io.records import read_json, write_json
from tasks.io.storage import Storage
from tasks.refs import FeatureRef, ManifestRef

log = logging.getLogger(__name__)

FEATURE_FORMAT = 3  # bump when what the shards hold changes (3: file_label); old caches go unused


# --------------------------------------------------------------------------------------------
# The feature build


def feature_hash(rows: Sequence[PairRow], cfg: DataConfig) -> str:
    """Content key of a feature build: every pair's keys, ETags, label, split + the settings."""
    settings = preprocessing_settings(cfg)
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in sorted(rows, key=lambda r: r.pair_id):
        line = "\t".join(
            [r.pair_id, r.split, str(r.label), r.family, r.emotion, r.image_emotion]
            + [str(r.audio_label), str(r.image_label)]
            + [r.audio_key, r.audio_etag, r.image_key, r.image_etag]
        )
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()[:24]


def preprocessing_settings(cfg: DataConfig) -> dict[str, Any]:
    """The `data` settings that change what the shards hold."""
    return {
        "format": FEATURE_FORMAT,
        "sample_rate": cfg.sample_rate,
        "n_mels": cfg.n_mels,
        "audio_bands": cfg.audio_bands,
        "band_limit_hz": cfg.band_limit_hz,
        "spec_frames": cfg.spec_frames,
        "clip_seconds": cfg.clip_seconds,
        "image_size": cfg.image_size,
        "image_mode": cfg.image_mode,
        "crop_margin": cfg.crop_margin if cfg.image_mode == "crop" else 0,
        "max_image_pixels": cfg.max_image_pixels,
        "shard_size": cfg.shard_size,
    }


@dataclass
class _Decoded:
    row: PairRow
    audio: np.ndarray | None
    image: np.ndarray | None
    problems: list[dict[str, str]] = field(default_factory=list)


# "auto" gives a decode process at most one per this many pairs: starting one (interpreter,
# numpy, boto3, the decoders; no librosa, see tasks/data/spectral.py) costs about 0.3 s on an
# idle core, the time to decode ~60 pairs, so a tiny build (the tests) decodes in its own
# process and a larger one on every core.
AUTO_PAIRS_PER_WORKER = 64


def decode_workers(cfg: DataConfig, n_pairs: int) -> int:
    """Processes that decode: `data.decode_workers`, or for "auto" the cores this process may use
    (at most one per AUTO_PAIRS_PER_WORKER pairs); never more than there are pairs. 1 means
    decoding in this process, no pool."""
    if cfg.decode_workers != "auto":
        return max(1, min(cfg.decode_workers, n_pairs))
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_pairs // AUTO_PAIRS_PER_WORKER))


def iter_decoded(
    store: Storage,
    rows: Sequence[PairRow],
    cfg: DataConfig,
    concurrency: int,
    workers: int = 1,
) -> Iterator[_Decoded]:
    """Fetch and decode pairs, yielded in manifest order, memory bounded by a window of pairs.

    `workers` > 1: `workers` spawned processes each fetch (their share of `concurrency` GETs in
    flight, both files of a pair at once) and decode their pairs (`workers.decode_processes`).
    `workers` = 1: a pool of `concurrency` threads here fetches and decodes; at most
    `concurrency + 2` pairs are between fetch and yield.
    """
    if workers > 1:
        jobs = [
            (i, (r.audio_key, r.image_key), (store.uri(r.audio_key), store.uri(r.image_key)))
            for i, r in enumerate(rows)
        ]
        results = decode_processes(store, jobs, cfg, concurrency, workers)
        for row, (audio, image, problems) in zip(rows, results, strict=True):
            yield _Decoded(row=row, audio=audio, image=image, problems=problems)
        return

    def load(row: PairRow) -> _Decoded:
        keys = (row.audio_key, row.image_key)
        if concurrency > 1:  # both files at once
            audio_f = fetchers.submit(fetch, store, keys[0], cfg)
            image = fetch(store, keys[1])
            audio = audio_f.result()
        else:
            audio, image = fetch(store, keys[0], cfg), fetch(store, keys[1])
        wheres = (store.uri(keys[0]), store.uri(keys[1]))
        mel, picture, problems = decode_pair(audio, image, keys, wheres, cfg)
        return _Decoded(row=row, audio=mel, image=picture, problems=problems)

    window = concurrency + 2
    # One BLAS thread for the build (see one_blas_thread). The pair loaders take half the
    # threads and fetch the audio on the other half, so at most `concurrency` GETs are in flight.
    with (
        one_blas_thread(),
        ThreadPoolExecutor(
            max_workers=max(1, concurrency // 2), thread_name_prefix="fetch-audio"
        ) as fetchers,
        ThreadPoolExecutor(
            max_workers=max(1, concurrency - concurrency // 2), thread_name_prefix="fetch"
        ) as loaders,
    ):
        pending: deque[Future[_Decoded]] = deque()
        todo = iter(rows)
        for row in todo:
            pending.append(loaders.submit(load, row))
            if len(pending) >= window:
                break
        while pending:
            done = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(loaders.submit(load, nxt))
            yield done


class _Uploader:
    """Encodes and writes shards on a background thread, so decoding never waits for a PUT.

    At most `depth` shards wait to be written (memory stays bounded); the first error is raised
    in the caller at the next `put` or at `close`.
    """

    def __init__(self, store: Storage, depth: int = 2) -> None:
        self.store = store
        self.queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    write_shard(self.store, job[0], **job[1])
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
                    self.error = exc

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def put(self, key: str, arrays: dict[str, Any]) -> None:
        self._raise()
        self.queue.put((key, arrays))

    def close(self, check: bool = True) -> None:
        """Wait for every queued shard; with `check`, raise the first write error."""
        self.queue.put(None)
        self.thread.join()
        if check:
            self._raise()


class _ShardWriter:
    """Buffers decoded pairs of one split and hands a shard to the uploader every `shard_size`
    pairs (names and order fixed here, in manifest order, so shards are the same however many
    processes decoded)."""

    def __init__(
        self,
        uploader: _Uploader,
        layout: Layout,
        fhash: str,
        split: str,
        shard_size: int,
        crop: int,
    ) -> None:
        self.uploader, self.layout, self.fhash = uploader, layout, fhash
        self.split, self.shard_size, self.crop = split, shard_size, crop
        self.items: list[tuple[PairRow, np.ndarray, np.ndarray]] = []
        self.names: list[str] = []  # as the index records them
        self.keys: list[str] = []

    def add(self, row: PairRow, audio: np.ndarray, image: np.ndarray) -> None:
        self.items.append((row, audio, image))
        if len(self.items) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        name = self.layout.feature_shard_name(self.split, len(self.keys))
        key = self.layout.feature_file(self.fhash, name)
        rows = [row for row, _, _ in self.items]
        self.uploader.put(
            key,
            {
                "audio": np.stack([a for _, a, _ in self.items]),  # (N, 1, n_mels, spec_frames)
                "image": np.stack([i for _, _, i in self.items]),  # (N, 3, S, S)
                "label": np.array([r.label for r in rows], dtype=np.int8),  # (N,)
                "file_label": np.array(  # (N, 2): the audio's and the image's own label
                    [(r.audio_label, r.image_label) for r in rows], dtype=np.int8
                ),
                "pair_id": [r.pair_id for r in rows],
                "family": [r.family for r in rows],
                "audio_emotion": [r.emotion for r in rows],
                "image_emotion": [r.image_emotion for r in rows],
                "crop": self.crop,
            },
        )
        self.names.append(name)
        self.keys.append(key)
        self.items = []


def build_features(
    store: Storage, layout: Layout, data: DataConfig, manifest: ManifestRef
) -> FeatureRef:
    """Shards for every usable pair of `manifest`, reused when the content key is cached.

    The run's skipped files (the manifest's listing skips + the decoding skips) are written once,
    to `Layout.skipped(run)`.
    """
    rows = read_manifest(store, manifest.key)
    fhash = feature_hash(rows, data)
    prefix = layout.features(fhash)

    index = _cached_index(store, layout, fhash)
    if index is not None:
        skipped = list(manifest.skipped) + index["skipped"]
        skipped_key = write_skipped(store, layout, manifest.run, skipped)
        log.info("feature cache hit %s: %d pairs", store.uri(prefix), index["n_pairs"])
        return FeatureRef(
            run=manifest.run,
            feature_hash=fhash,
            prefix=prefix,
            shards={s: [layout.feature_file(fhash, n) for n in index["shards"][s]] for s in SPLITS},
            counts=index["counts"],
            emotions=list(index.get("emotions", [])),
            skipped=skipped,
            skipped_key=skipped_key,
            cache_hit=True,
        )

    crop = data.image_size if data.image_mode == "crop" else 0
    uploader = _Uploader(store)
    writers = {s: _ShardWriter(uploader, layout, fhash, s, data.shard_size, crop) for s in SPLITS}
    kept: list[PairRow] = []
    decode_skips: dict[str, dict[str, str]] = {}  # key -> entry; a file shared by pairs once
    n_bad_pairs = 0
    workers = decode_workers(data, len(rows))
    try:
        decoded = iter_decoded(store, rows, data, data.fetch_concurrency, workers)
        for item in progress.track(decoded, total=len(rows), description="preprocessing"):
            for problem in item.problems:
                decode_skips.setdefault(problem["key"], problem)
            if item.audio is None or item.image is None:
                n_bad_pairs += 1
                continue
            writers[item.row.split].add(item.row, item.audio, item.image)
            kept.append(item.row)
        for w in writers.values():
            w.flush()
    except BaseException:
        uploader.close(check=False)  # the error in hand is the one to report
        raise
    uploader.close()  # every shard written (or the first write error raised) before the index

    skipped = list(manifest.skipped) + list(decode_skips.values())
    skipped_key = write_skipped(store, layout, manifest.run, skipped)
    where = store.uri(prefix)
    if not kept:
        raise DataError(
            f"{manifest.uri}: no usable pair remains: all {len(rows)} pairs have a file that "
            f"cannot be decoded ({len(decode_skips)} files; see {store.uri(skipped_key)})"
        )
    counts = count_labels(kept)
    check_splits(counts, f"{manifest.uri} after skipping {n_bad_pairs} undecodable pairs")
    emotions = emotion_vocabulary(kept)

    index = {
        "format": FEATURE_FORMAT,
        "feature_hash": fhash,
        "settings": preprocessing_settings(data),
        "n_pairs": len(kept),
        "counts": counts,
        "emotions": emotions,
        "shards": {s: list(writers[s].names) for s in SPLITS},
        "skipped": list(decode_skips.values()),
        "manifest": manifest.key,
    }
    write_json(store, layout.feature_index(fhash), index)
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
        emotions=emotions,
        skipped=skipped,
        skipped_key=skipped_key,
        cache_hit=False,
    )


def emotion_vocabulary(rows: Sequence[PairRow]) -> list[str]:
    """The emotion names the train split knows (voice and face), sorted; [] = no labels."""
    names = {r.emotion for r in rows if r.split == "train"}
    names |= {r.image_emotion for r in rows if r.split == "train"}
    return sorted(n for n in names if n)


def _cached_index(store: Storage, layout: Layout, fhash: str) -> dict[str, Any] | None:
    """The cache's index when it is complete and matches `fhash`, else None (rebuild)."""
    key, prefix = layout.feature_index(fhash), layout.features(fhash)
    # The shards are listed while the index is read: a hit costs one round trip less (on a miss
    # the listing, one request, goes unused and its errors unseen).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-list") as pool:
        listing = pool.submit(lambda: {obj.key for obj in store.list(prefix)})
        try:
            index = read_json(store, key)
        except ObjectNotFound:
            return None
        except DataError as exc:
            log.warning(
                "%s: unreadable cache index, rebuilding (%s)", store.uri(key), exc.__cause__
            )
            return None
        if (
            not isinstance(index, dict)
            or index.get("format") != FEATURE_FORMAT
            or index.get("feature_hash") != fhash
            or not isinstance(index.get("shards"), dict)
        ):
            log.warning("%s: cache index of another format or content, rebuilding", store.uri(key))
            return None
        present = listing.result()
    missing = [
        n
        for s in SPLITS
        for n in index["shards"].get(s, [])
        if layout.feature_file(fhash, n) not in present
    ]
    if missing:
        log.warning("%s: %d shards missing, rebuilding", store.uri(prefix), len(missing))
        return None
    return index
