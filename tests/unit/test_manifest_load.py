"""The manifest of a large listing: one list request per 1000 keys, no request per object, and
memory that grows with the number of objects, not faster.

5,000 tiny objects (and a pairs.csv) in a moto bucket, over HTTP, counted by the test server;
memory on a lazily generated listing of 2,000 and 20,000 objects, so only the manifest's own
allocations count. The 50,000-object figures come from benchmarks/bench_manifest.py.
"""

from __future__ import annotations

import csv
import io
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import pytest

from config.load import validate_config
from tasks.data.manifest import build_manifest
from tasks.io.layout import Layout
from tasks.io.storage import ObjectInfo, open_storage

N_PAIRS = 2_500  # 2,500 audio + 2,500 images + pairs.csv = 5,001 objects: 6 list pages
PAGE = 1_000  # S3's (and moto's) page size for list_objects_v2
# What the manifest keeps per listed object (its FileEntry, its ObjectInfo for the data hash, its
# rows in the two tables); measured about 600 B at 5,000 and 50,000 objects.
BYTES_PER_OBJECT = 1_500


def sample_keys(n_pairs: int) -> Iterator[tuple[str, str, int]]:
    """(audio key, image key, label) of `n_pairs` pairs, half real, half fake."""
    for i in range(n_pairs):
        label = "fake" if i % 2 else "real"
        yield f"dataset/audio/{label}/a{i:06d}.wav", f"dataset/images/{label}/i{i:06d}.png", i % 2


@pytest.fixture(scope="module")
def big_bucket(s3_server: Any) -> str:
    """A bucket holding N_PAIRS pairs of 3-byte files and their pairs.csv, put 16 at a time."""
    bucket = s3_server.new_bucket("load")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    rows = list(sample_keys(N_PAIRS))
    keys = [k for audio, image, _ in rows for k in (audio, image)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=b"abc"), keys))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["audio_key", "image_key", "label"])
    writer.writerows(rows)
    client.put_object(Bucket=bucket, Key="dataset/pairs.csv", Body=buf.getvalue().encode())
    return bucket


@pytest.mark.slow  # putting the 5,001 objects takes ~40 s on the shared 2-core machine
def test_listing_is_paged_and_no_object_is_fetched(s3_server: Any, big_bucket: str) -> None:
    cfg = validate_config(
        {"storage": {"uri": f"s3://{big_bucket}", "endpoint_url": s3_server.endpoint_url}}
    )
    store = open_storage(cfg.storage)
    s3_server.requests.clear()
    ref = build_manifest(store, Layout.from_config(cfg.storage), cfg.data, 0, "load")
    with s3_server.requests.lock:
        requests = [(m, p, q) for m, p, q in s3_server.requests.entries]
    assert ref.n_pairs == N_PAIRS and ref.skipped == []

    lists = [r for r in requests if r[0] == "GET" and "list-type=2" in r[2]]
    n_objects = 2 * N_PAIRS + 1
    assert len(lists) == -(-n_objects // PAGE) == 6
    dataset_reads = [r for r in requests if "/dataset/" in r[1] and r not in lists]
    assert dataset_reads == [("GET", f"/{big_bucket}/dataset/pairs.csv", "")]
    others = sorted(
        (m, p.removeprefix(f"/{big_bucket}"))
        for m, p, q in requests
        if "/dataset/" not in p and "list-type" not in q
    )
    assert others == [
        ("HEAD", ""),  # store.check(): the bucket is there
        ("PUT", "/outputs/manifests/load/files.parquet"),
        ("PUT", "/outputs/manifests/load/manifest.parquet"),
    ]


class GeneratedListing:
    """A storage whose `list` makes its ObjectInfos on the fly and whose writes go nowhere:
    memory measured around `build_manifest` is the manifest's alone."""

    def __init__(self, n_pairs: int) -> None:
        self.n_pairs = n_pairs
        self.written: dict[str, int] = {}

    def check(self) -> None:
        pass

    def uri(self, key: str) -> str:
        return f"generated://{key}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for i, (audio, image, _) in enumerate(sample_keys(self.n_pairs)):
            yield ObjectInfo(key=audio, size=3, etag=f"{2 * i:032x}")
            yield ObjectInfo(key=image, size=3, etag=f"{2 * i + 1:032x}")

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        self.written[key] = len(data)
        return self.uri(key)


def peak_bytes(n_pairs: int) -> int:
    store = GeneratedListing(n_pairs)
    cfg = validate_config({"storage": {"uri": "/nonexistent/unused"}})
    tracemalloc.start()
    try:
        ref = build_manifest(store, Layout(), cfg.data, 0, "load")  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ref.n_pairs > 0.9 * n_pairs  # random pairing: the longer side of each group decides
    return peak


def test_memory_grows_linearly_with_the_listing() -> None:
    small, large = peak_bytes(1_000), peak_bytes(10_000)  # 2,000 and 20,000 objects
    assert large <= 2 * 10_000 * BYTES_PER_OBJECT, f"{large / 20_000:.0f} B per object"
    assert small <= 2 * 1_000 * BYTES_PER_OBJECT + (1 << 20), f"{small / 2_000:.0f} B per object"
    # Ten times the objects, at most ~ten times the memory (quadratic would be a hundred).
    assert large <= 12 * small, (small, large)
