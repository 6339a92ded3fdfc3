"""The end-to-end benchmark runs (`make bench`'s third part in miniature): one tiny
`train-all-fusions` run through a temporary Prefect API, its stages read back from Prefect.
Nothing about speed is asserted: only that every stage the flow runs is there, with a positive
duration and a share of the flow run's wall time, and that the run's folder is gone."""

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
# every task the flow runs on an empty folder with the demo's settings (flows/steps.py)
STAGES = {
    "set-up-folders", "start-run", "fill-demo-dataset", "build-manifest", "build-features",
    "train-early", "train-mid", "train-late", "collect-losses", "evaluate",
    "promote-champions", "publish-report", "finish-run",
}  # fmt: skip


def test_the_end_to_end_benchmark_reports_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_e2e", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    (run,) = report["repeats"]
    assert run["state"] == "Completed" and run["total_s"] > 0
    stages = {row["stage"]: row for row in run["stages"]}
    assert set(stages) == STAGES
    for row in stages.values():
        assert row["state"] == "Completed"
        assert row["duration_s"] > 0 and 0 < row["share"] <= 1
        assert math.isclose(row["share"], row["duration_s"] / run["total_s"])
        assert 0 <= row["from_s"] < row["to_s"] <= run["total_s"]
    assert set(report["medians"]["stages"]) == STAGES
    # the fusions trained at once (as many as memory allows) are shown as one group each
    trainings = [stages[f"train-{f}"] for f in ("early", "mid", "late")]
    if trainings[0]["from_s"] < min(t["to_s"] for t in trainings[1:]):
        group = next(g for g in run["overlapping"] if "train-early" in g["stages"])
        assert 0 < group["span_s"] < group["sum_own_s"] and 0 < group["share"] <= 1
    assert 0 < run["union_s"] <= run["total_s"]
    for key in ("cpus", "cpu", "python", "loadavg_at_start", "loadavg_at_end"):
        assert report["machine"][key]
    assert "train-early" in proc.stdout and "flow run total" in proc.stdout
    assert not Path(run["storage_uri"]).exists()  # the run's folder is removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("bench-e2e-")]


def test_overlapping_stages_are_grouped_and_counted_once() -> None:
    from benchmarks.bench_e2e import overlaps, union_s

    def row(stage: str, start: float, end: float) -> dict:
        return {"stage": stage, "from_s": start, "to_s": end, "duration_s": end - start}

    rows = [row("a", 0, 2), row("x", 3, 9), row("y", 3, 7), row("z", 4, 10), row("b", 11, 12)]
    (group,) = overlaps(rows, total_s=20)
    assert group["stages"] == ["x", "y", "z"]
    assert (group["from_s"], group["to_s"], group["span_s"], group["sum_own_s"]) == (3, 10, 7, 16)
    assert math.isclose(group["share"], 7 / 20)
    assert union_s(rows) == 2 + 7 + 1
