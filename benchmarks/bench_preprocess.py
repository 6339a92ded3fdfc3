"""Preprocessing throughput, as ratios against a baseline measured in the same run.

    .venv/bin/python -m benchmarks.bench_preprocess [--pairs 120] [--repeats 3] [--latency-ms 20]

Data: the synthetic benchmark written to moto's S3 server on 127.0.0.1 (a free port). A WSGI
middleware adds a fixed delay to every request, standing in for the round trip to a real bucket
(S3 first-byte latency is typically 10-50 ms), so the concurrency gain is measured where it
matters. Reported (median of `--repeats` runs each):
  - concurrent fetch (data.fetch_concurrency = 8) vs one object at a time (= 1), cache cleared;
  - a cache hit (second run on unchanged data) vs a cache miss.
Results go to stdout and to benchmarks/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def start_s3(latency_s: float) -> tuple[Any, str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    inner = server._server.app  # type: ignore[union-attr]

    def delayed(environ: dict[str, Any], start_response: Any) -> Any:
        time.sleep(latency_s)
        return inner(environ, start_response)

    server._server.app = delayed  # type: ignore[union-attr]
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"


def clear_cache(store: Any, prefix: str) -> None:
    for obj in list(store.list(prefix)):
        store.delete(obj.key)


def timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=120)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()

    import boto3

    from config.load import validate_config
    from tasks.data import features as preprocess
    from tasks.data import manifest
    from tasks.data import synthetic as make_dataset
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    server, endpoint = start_s3(args.latency_ms / 1000)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

        def config(concurrency: int) -> Any:
            return validate_config({
                "storage": {"uri": "s3://bench", "endpoint_url": endpoint},
                "data": {"n_mels": 64, "spec_frames": 64, "image_size": 64,
                         "fetch_concurrency": concurrency},
            })  # fmt: skip

        cfg = config(8)
        store = open_storage(cfg.storage)
        layout = Layout.from_config(cfg.storage)
        make_dataset.generate(store, layout, args.pairs, seed=7)
        ref = manifest.build_manifest(store, layout, cfg.data, cfg.run.seed, "bench")
        cache = f"{layout.outputs}cache/"

        results: dict[str, list[float]] = {"sequential": [], "concurrent": [], "cache_hit": []}
        for _ in range(args.repeats):
            for name, conc in (("sequential", 1), ("concurrent", 8)):
                clear_cache(store, cache)
                results[name].append(timed(lambda c=conc: preprocess.build_features(
                    store, layout, config(c).data, ref)))  # fmt: skip
            results["cache_hit"].append(
                timed(lambda: preprocess.build_features(store, layout, cfg.data, ref))
            )
    finally:
        server.stop()

    med = {k: statistics.median(v) for k, v in results.items()}
    report = {
        "pairs": args.pairs,
        "repeats": args.repeats,
        "latency_ms": args.latency_ms,
        "cpus": os.cpu_count(),
        "median_s": med,
        "runs_s": results,
        "speedup_concurrent_vs_sequential": med["sequential"] / med["concurrent"],
        "speedup_cache_hit_vs_miss": med["concurrent"] / med["cache_hit"],
    }
    out = Path(__file__).parent / "results" / "preprocess.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))  # the benchmark's output is its report


if __name__ == "__main__":
    main()
