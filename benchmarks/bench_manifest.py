"""The manifest of a large bucket: requests, memory and time of `build_manifest` on SeaweedFS.

    .venv/bin/python -m benchmarks.bench_manifest [--pairs 25000] [--put-threads 32]
        [--out benchmarks/results/manifest.json]

SeaweedFS (`weed server -s3`, started in a temporary folder as in benchmarks/bench_stream.py) on
127.0.0.1 gets `--pairs` pairs of 3-byte files (audio/ and images/, real and fake) and their
pairs.csv: 2 x pairs + 1 objects. Then `build_manifest` runs once, as the build-manifest step
calls it, and this reports:
  requests      every HTTP request the product's S3 client sent (botocore's before-send event),
                by operation: ListObjectsV2 pages, GetObject, HeadObject, PutObject...
  rss_growth    the process's resident set after minus before (psutil), and its peak during
                the build (sampled every 10 ms by a thread);
  traced_peak   tracemalloc's peak during a second build (Python allocations only; slower);
  seconds       the first build's wall time (listing, pairing, parquet, two uploads), and
                list_only_seconds: the same listing alone, nothing kept (the store's share).
The figures go to stdout and to `--out`. Not part of `make test` (tests/unit/
test_manifest_load.py checks the same at 5,000 objects).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import threading
import time
import tracemalloc
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

from benchmarks.bench_stream import BUCKET, start_weed
from config.load import validate_config
from scripts.stack import STACK_ACCESS_KEY, STACK_SECRET_KEY
from tasks.data.manifest import build_manifest
from tasks.io.layout import Layout
from tasks.io.storage import S3Storage, open_storage


def client(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=STACK_ACCESS_KEY,
        aws_secret_access_key=STACK_SECRET_KEY,
        config=Config(max_pool_connections=64, retries={"max_attempts": 8, "mode": "adaptive"}),
    )


def fill(endpoint: str, pairs: int, threads: int) -> float:
    """Put `pairs` pairs and their pairs.csv; returns the seconds it took."""
    s3 = client(endpoint)
    rows = []
    for i in range(pairs):
        label = "fake" if i % 2 else "real"
        rows.append((f"audio/{label}/a{i:06d}.wav", f"images/{label}/i{i:06d}.png", i % 2))
    keys = [f"dataset/{k}" for a, b, _ in rows for k in (a, b)]
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda k: s3.put_object(Bucket=BUCKET, Key=k, Body=b"abc"), keys))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["audio_key", "image_key", "label"])
    writer.writerows(rows)
    s3.put_object(Bucket=BUCKET, Key="dataset/pairs.csv", Body=buf.getvalue().encode())
    return time.perf_counter() - started


class PeakRss:
    """The process's largest resident set while the block runs (sampled every 10 ms)."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def measure(endpoint: str, pairs: int) -> dict[str, Any]:
    cfg = validate_config({"storage": {"uri": f"s3://{BUCKET}", "endpoint_url": endpoint}})
    store = open_storage(cfg.storage)
    assert isinstance(store, S3Storage)
    layout = Layout.from_config(cfg.storage)
    sent: Counter[str] = Counter()

    def count(event_name: str, **_: Any) -> None:
        sent[event_name.rsplit(".", 1)[-1]] += 1  # before-send.s3.<Operation>

    store.client.meta.events.register("before-send.s3", count)
    store.check()  # the client is built and connected before the baseline
    sent.clear()
    proc = psutil.Process()
    before = proc.memory_info().rss
    with PeakRss() as rss:
        started = time.perf_counter()
        ref = build_manifest(store, layout, cfg.data, 0, "bench")
        seconds = time.perf_counter() - started
    after = proc.memory_info().rss
    requests = dict(sent)
    started = time.perf_counter()
    listed = sum(1 for _ in store.list(layout.dataset))  # the listing alone, nothing kept
    list_seconds = time.perf_counter() - started
    tracemalloc.start()
    build_manifest(store, layout, cfg.data, 0, "bench-traced")
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    objects = 2 * pairs + 1
    return {
        "objects": objects,
        "pairs": ref.n_pairs,
        "requests": requests,
        "list_pages": requests.get("ListObjectsV2", 0),
        "expected_pages": -(-objects // 1000),
        "rss_before_mb": round(before / 2**20, 1),
        "rss_growth_mb": round((after - before) / 2**20, 1),
        "rss_peak_growth_mb": round((rss.peak - before) / 2**20, 1),
        "traced_peak_mb": round(traced / 2**20, 1),
        "traced_bytes_per_object": round(traced / objects),
        "seconds": round(seconds, 2),
        "list_only_seconds": round(list_seconds, 2),  # the store's share of `seconds`
        "listed": listed,
        "objects_per_second": round(objects / seconds),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=25_000, help="pairs (2 objects each)")
    parser.add_argument("--put-threads", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/manifest.json"))
    args = parser.parse_args(argv)
    # The product's storage takes boto3's default chain: the store's test keys, nothing else.
    os.environ.update(AWS_ACCESS_KEY_ID=STACK_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=STACK_SECRET_KEY,
                      AWS_DEFAULT_REGION="us-east-1")  # fmt: skip
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(name, None)
    weed = start_weed()
    try:
        fill_s = fill(weed.endpoint, args.pairs, args.put_threads)
        result = measure(weed.endpoint, args.pairs)
    finally:
        weed.stop()
    result.update(
        fill_seconds=round(fill_s, 1),
        machine=f"{platform.machine()}, {psutil.cpu_count()} cores",
        python=platform.python_version(),
        store="SeaweedFS on 127.0.0.1",
    )
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
