"""The streaming benchmark runs (`make bench` in miniature): SeaweedFS, the latency proxy, the
decode bound, the naive reading, the product, the s3torchconnector peer and the cache, end to
end on a few demo-size pairs. Nothing about speed is asserted: only that every figure exists."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_stream", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    demo = report["results"]["demo"]
    assert demo["decode_bound_pairs_per_s"] > 0 and demo["startup_s"] > 0
    assert set(demo["latencies"]) == {"0ms", "20ms"}
    for row in demo["latencies"].values():
        for name in ("naive", "product", "peer", "product_without_startup"):
            assert math.isfinite(row["pairs_per_s"][name]) and row["pairs_per_s"][name] > 0
        for ratio in (
            "product_vs_decode_bound",
            "product_vs_naive",
            "product_vs_peer",
            "product_vs_bound_on_cores_left",
            "bound_cpu_ms_per_pair",
        ):
            assert math.isfinite(row[ratio]) and row[ratio] > 0
        # both sides of the connection did work: the build's processes and the store's
        cpu = row["pairs_per_s"]
        assert cpu["client_cpu_ms_per_pair"] > 0 and cpu["server_cpu_ms_per_pair"] > 0
        assert cpu["peer_cpu_ms_per_pair"] > 0 and cpu["peer_server_cpu_ms_per_pair"] > 0
        assert 0 < cpu["server_share"] < 1
        assert row["cache_hit_speedup"] > 0
    assert proc.stdout.count(" ms  bound ") == 2  # one table line per round trip
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-weed-")]  # cleaned up
