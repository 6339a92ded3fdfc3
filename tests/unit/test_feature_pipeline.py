"""The parallel feature build: decode processes give exactly the shards, order, skipped list and
cache key of a build in one process; bad files are still skipped and reported; the in-flight
window bounds how far fetching runs ahead; a failed shard write fails the build."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tasks.data.features import AUTO_PAIRS_PER_WORKER, decode_workers, iter_decoded
from tasks.data.manifest import read_manifest
from tasks.data.shards import read_shard
from tasks.data.workers import process_window
from tasks.errors import StorageError, Throttled
from tasks.io.layout import SPLITS
from tasks.io.storage import Storage, open_storage
from tests.unit.synthetic_data import (
    CountingStore,
    bad_files,
    features_of,
    generated,
    load_into,
    manifest_of,
    tiny_config,
)

N = 40  # pairs: several shards per split at shard_size 8


@pytest.fixture(scope="module")
def bench() -> dict[str, bytes]:
    return generated(N, seed=5)


def plant_bad_files(store: Storage) -> set[str]:
    """Every bad kind, each paired with a good partner in pairs.csv; returns their keys."""
    planted = bad_files()
    for key, (data, _) in planted.items():
        store.write_bytes("dataset/" + key, data)
    csv_text = store.read_bytes("dataset/pairs.csv").decode()
    good = [line.split(",") for line in csv_text.splitlines()[1:]]
    extra = []
    for i, key in enumerate(k for k in planted if k.startswith("audio/")):
        extra.append(f"{key},{good[i][1]},1,vocoder_bandlimit,happy,happy")
    for i, key in enumerate(k for k in planted if k.startswith("images/")):
        extra.append(f"{good[i][0]},{key},0,real,sad,sad")
    store.write_bytes("dataset/pairs.csv", (csv_text + "\n".join(extra) + "\n").encode())
    return {"dataset/" + k for k in planted}


def unaddressed(value: Any) -> Any:
    """`value` (JSON-like) with memory addresses such as <0x7f...> blanked."""
    return json.loads(re.sub(r"0x[0-9a-f]{6,}", "0x?", json.dumps(value)))


def shard_arrays(store: Storage, keys: list[str]) -> list[dict[str, np.ndarray]]:
    return [read_shard(store, k) for k in keys]


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_decode_processes_give_the_shards_of_one_process(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, bench: dict[str, bytes]
) -> None:
    server = request.getfixturevalue("s3_server") if kind == "s3" else None
    refs, stores = [], []
    for workers in (1, 2):
        (tmp_path / str(workers)).mkdir()
        cfg = tiny_config(kind, tmp_path / str(workers), server, decode_workers=workers)
        store = open_storage(cfg.storage)
        load_into(store, bench)
        planted = plant_bad_files(store)
        refs.append(features_of(store, cfg, manifest_of(store, cfg, "r")))
        stores.append(store)
    one, many = refs
    assert many.feature_hash == one.feature_hash  # the cache key: the number of processes is
    assert many.counts == one.counts  # not a preprocessing setting
    # Same entries, same order (libsndfile names the buffer's address: not the build's to fix).
    assert unaddressed(many.skipped) == unaddressed(one.skipped)
    assert {s["key"] for s in many.skipped} == planted  # every bad file reported, none more
    for split in SPLITS:
        assert many.shards[split] == one.shards[split] and many.shards[split]
        for a, b in zip(
            shard_arrays(stores[0], one.shards[split]),
            shard_arrays(stores[1], many.shards[split]),
            strict=True,
        ):
            for name in a:
                assert a[name].dtype == b[name].dtype, name
                np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    index = [
        json.loads(s.read_bytes(f"outputs/cache/features/{r.feature_hash}/index.json"))
        for s, r in zip(stores, refs, strict=True)
    ]
    assert unaddressed(index[0]) == unaddressed(index[1])


def test_auto_decodes_in_process_for_small_builds_and_on_every_core_for_large() -> None:
    cfg = tiny_config("local", Path("/nonexistent")).data
    assert decode_workers(cfg, AUTO_PAIRS_PER_WORKER - 1) == 1
    assert decode_workers(cfg.model_copy(update={"decode_workers": 3}), 2) == 2  # <= pairs
    assert decode_workers(cfg.model_copy(update={"decode_workers": 3}), 100) == 3
    big = decode_workers(cfg, 10_000 * AUTO_PAIRS_PER_WORKER)
    import os

    assert big == len(os.sched_getaffinity(0))


def test_fetching_in_process_runs_at_most_a_window_ahead(
    tmp_path: Path, bench: dict[str, bytes]
) -> None:
    concurrency = 4
    cfg = tiny_config("local", tmp_path, fetch_concurrency=concurrency, decode_workers=1)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    rows = read_manifest(store, manifest_of(store, cfg, "r").key)
    counting = CountingStore(store, latency=0.005)
    window = concurrency + 2
    seen = []
    for n, item in enumerate(iter_decoded(counting, rows, cfg.data, concurrency, 1), start=1):  # type: ignore[arg-type]
        seen.append(item.row.pair_id)
        # Everything fetched so far belongs to a yielded pair or to the window after it.
        assert counting.count("dataset/") <= 2 * (n + window)
        if n == 3:  # a slow consumer: fetching must stop at the window, not run to the end
            time.sleep(0.3)
            assert counting.count("dataset/") <= 2 * (n + window)
    assert seen == [r.pair_id for r in rows]  # manifest order
    assert counting.count("dataset/") == 2 * len(rows)
    assert 1 < counting.max_active <= concurrency


def test_decode_processes_fetch_at_most_a_window_ahead(
    tmp_path: Path, s3_server: Any, bench: dict[str, bytes]
) -> None:
    concurrency, workers = 4, 2
    cfg = tiny_config("s3", tmp_path, s3_server, fetch_concurrency=concurrency)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    rows = read_manifest(store, manifest_of(store, cfg, "r").key)
    window = process_window(concurrency, workers)
    assert window < len(rows)  # or the bound below proves nothing
    s3_server.requests.clear()
    seen = []
    for n, item in enumerate(iter_decoded(store, rows, cfg.data, concurrency, workers), start=1):
        seen.append(item.row.pair_id)
        assert s3_server.requests.count("GET", "/dataset/") <= 2 * (n + window)
        if n == 3:  # the processes stop at the window while the consumer is slow
            time.sleep(1.0)
            assert s3_server.requests.count("GET", "/dataset/") <= 2 * (n + window)
    assert seen == [r.pair_id for r in rows]
    assert s3_server.requests.count("GET", "/dataset/") == 2 * len(rows)


class FailingWrites:
    """A storage wrapper whose shard writes fail (a bucket that refuses PUTs half way)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.root_uri = inner.root_uri

    def __getstate__(self) -> dict[str, Any]:  # decode processes get a copy (reads only)
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        if key.endswith(".npz"):
            raise StorageError(f"{self.inner.uri(key)}: access denied (planted)")
        return self.inner.write_bytes(key, data, content_type)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_shard_write_fails_the_build_and_leaves_no_index(
    workers: int, tmp_path: Path, bench: dict[str, bytes]
) -> None:
    cfg = tiny_config("local", tmp_path, decode_workers=workers)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    with pytest.raises(StorageError, match="access denied \\(planted\\)"):
        features_of(FailingWrites(store), cfg, manifest)  # type: ignore[arg-type]
    assert not [o.key for o in store.list("outputs/cache/") if o.key.endswith("index.json")]
    assert features_of(store, cfg, manifest).cache_hit is False  # a later run rebuilds


class ThrottledReads(FailingWrites):
    """Reads of one image fail as throttled after retries (a transient fault)."""

    victim = ""  # the key that fails

    def read_bytes(self, key: str) -> bytes:
        if key.endswith(self.victim):
            raise Throttled(
                f"{self.inner.uri(key)}: throttled by the store after retries (planted)"
            )
        return self.inner.read_bytes(key)

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self.inner.write_bytes(key, data, content_type)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_storage_fault_in_a_decode_process_keeps_its_type(
    workers: int, tmp_path: Path, bench: dict[str, bytes]
) -> None:
    cfg = tiny_config("local", tmp_path, decode_workers=workers)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    manifest = manifest_of(store, cfg, "r")
    flaky = ThrottledReads(store)
    flaky.victim = read_manifest(store, manifest.key)[-1].image_key
    # The step retries Throttled (is_transient): a decode process must not turn it into another
    # error, nor into a skipped file.
    with pytest.raises(Throttled, match="planted"):
        features_of(flaky, cfg, manifest)  # type: ignore[arg-type]
