"""The training benchmark runs (`make bench`'s training half in miniature): the input stall and
the pure-compute epoch, the concurrency plan, and peak RSS of preprocessing and training in
fresh processes at two data sizes, on a few demo-size pairs. Nothing about speed is asserted:
only that every figure exists and lies where it must."""

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


def test_the_training_benchmark_runs_and_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_train", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (fusion, row), *others = report["stall"].items()
    assert fusion == "mid" and not others
    assert 0.0 <= row["stall_share"] < 1.0
    assert row["streamed_s"] > 0 and row["pure_compute_s"] > 0
    assert math.isclose(row["step_vs_pure_compute"], row["streamed_s"] / row["pure_compute_s"])
    conc = report["concurrency"]
    assert conc["planned"] == 1  # one fusion: nothing to train beside it
    assert conc["one_at_a_time_samples_per_s"] > 0 and conc["auto_samples_per_s"] > 0
    mem = report["memory"]
    assert set(mem["by_pairs"]) == {"40", "80"}
    for sizes in mem["by_pairs"].values():
        # each stage in a fresh process: a torch-importing python, far below the machine's cap
        for stage in ("preprocessing", "training"):
            assert 100 < sizes[stage]["rss_mb"] < mem["cap_mb"]
    assert mem["training_ratio"] > 0 and mem["preprocessing_ratio"] > 0
    assert proc.stdout.count("input stall") == 1 and "peak RSS" in proc.stdout
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-train-")]  # cleaned up
