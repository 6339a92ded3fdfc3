"""End to end: one `train-all-fusions` run, the wall time of each of its stages as Prefect saw it.

    .venv/bin/python -m benchmarks.bench_e2e [--config config/demo.yaml] [--repeats 1]
        [--set SECTION.KEY=VALUE ...] [--smoke] [--keep] [--out benchmarks/results/e2e.json]

Each repeat calls the flow function in this process, as benchmarks/quality.py does (Prefect
starts its own temporary API), on a fresh temporary folder as `storage.uri` with
`generator.fill_empty_dataset=true`, so the run writes the synthetic benchmark first; the folder
is deleted afterwards (kept with `--keep`). The figures come from Prefect, not from timers of
ours: the flow run and its task runs read back through the Prefect client, each task run's start
and end time, its duration and its share of the flow run's wall time (the ratio to a baseline of
the same run). Task runs that overlap (the fusions trained at once) are also shown as one group:
the wall time from the first one's start to the last one's end beside each one's own duration.
Medians over `--repeats`. The table goes to stdout, every figure to `--out`. `--smoke` runs a
tiny version (96 pairs, 32 px, one epoch) that checks the plumbing; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from config.cli import add_overrides

log = logging.getLogger("benchmarks.bench_e2e")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "e2e.json"
FOLDER_PREFIX = "bench-e2e-"
# config/e2e.yaml's tiny inputs: every split still holds real and fake pairs
SMOKE = [
    "generator.n_pairs=96",
    "data.n_mels=32",
    "data.spec_frames=32",
    "data.image_size=32",
    "data.shard_size=32",
    "training.epochs=1",
    "training.keep_checkpoints=1",
]
SETTLE_TIMEOUT_S = 60.0  # the API records task runs from their events, a moment after the flow


# --------------------------------------------------------------------------------------------
# Pure helpers


def stage_rows(flow_start: datetime, total_s: float, task_runs: Sequence[Any]) -> list[dict]:
    """One row per task run, in order of start: its label, times and share of `total_s`.

    The label is the task run's name without the suffix Prefect adds to tell runs of a task apart
    ("build-manifest-3f2" -> "build-manifest"); a custom name ("train-early") stays as it is."""
    rows: list[dict] = []
    seen: dict[str, int] = {}
    for tr in sorted(task_runs, key=lambda t: t.start_time):
        label = tr.name.removesuffix(f"-{str(tr.dynamic_key)[:3]}")
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:  # the same task run twice in one flow run
            label = f"{label}#{seen[label]}"
        duration_s = (tr.end_time - tr.start_time).total_seconds()
        rows.append(
            {
                "stage": label,
                "task_run": tr.name,
                "task_key": tr.task_key,
                "state": tr.state.name if tr.state else None,
                "start": tr.start_time.isoformat(),
                "end": tr.end_time.isoformat(),
                "from_s": (tr.start_time - flow_start).total_seconds(),
                "to_s": (tr.end_time - flow_start).total_seconds(),
                "duration_s": duration_s,
                "run_time_s": tr.total_run_time.total_seconds(),  # in Running, retries summed
                "share": duration_s / total_s,
            }
        )
    return rows


def overlaps(rows: Sequence[dict], total_s: float) -> list[dict]:
    """Groups of stages that ran at the same time (intervals that overlap, chained): each with
    its members, its span (first start to last end), the sum of their own durations."""
    groups: list[list[dict]] = []
    for row in sorted(rows, key=lambda r: r["from_s"]):
        if groups and row["from_s"] < max(r["to_s"] for r in groups[-1]):
            groups[-1].append(row)
        else:
            groups.append([row])
    out = []
    for members in (g for g in groups if len(g) > 1):
        span_s = max(r["to_s"] for r in members) - min(r["from_s"] for r in members)
        out.append(
            {
                "stages": [r["stage"] for r in members],
                "from_s": min(r["from_s"] for r in members),
                "to_s": max(r["to_s"] for r in members),
                "span_s": span_s,
                "share": span_s / total_s,
                "sum_own_s": sum(r["duration_s"] for r in members),
            }
        )
    return out


def union_s(rows: Sequence[dict]) -> float:
    """Seconds of the flow run during which at least one stage ran."""
    covered, end = 0.0, float("-inf")
    for row in sorted(rows, key=lambda r: r["from_s"]):
        start = max(row["from_s"], end)
        if row["to_s"] > start:
            covered += row["to_s"] - start
        end = max(end, row["to_s"])
    return covered


def medians(repeats: Sequence[dict]) -> dict[str, Any]:
    """Per stage (and per overlapping group) the median over the repeats of each figure."""

    def median_of(rows: Sequence[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    stages: dict[str, list[dict]] = {}
    for rep in repeats:
        for row in rep["stages"]:
            stages.setdefault(row["stage"], []).append(row)
    groups: dict[str, list[dict]] = {}
    for rep in repeats:
        for group in rep["overlapping"]:
            groups.setdefault(",".join(group["stages"]), []).append(group)
    keys = ("from_s", "to_s", "duration_s", "share")
    return {
        "total_s": statistics.median(r["total_s"] for r in repeats),
        "sum_stages_s": statistics.median(r["sum_stages_s"] for r in repeats),
        "union_s": statistics.median(r["union_s"] for r in repeats),
        "outside_stages_s": statistics.median(r["outside_stages_s"] for r in repeats),
        "stages": {
            name: {"repeats": len(rows), **{k: median_of(rows, k) for k in keys}}
            for name, rows in stages.items()
        },
        "overlapping": [
            {"stages": name.split(","), "repeats": len(rows)}
            | {k: median_of(rows, k) for k in ("from_s", "to_s", "span_s", "share", "sum_own_s")}
            for name, rows in groups.items()
        ],
    }


def render(summary: dict[str, Any], n_repeats: int) -> str:
    """The plain-text report of `medians(...)` (or of one repeat's figures, the same keys)."""
    from benchmarks.quality import format_table

    rows = sorted(summary["stages"].items(), key=lambda kv: kv[1]["from_s"])
    table = format_table(
        ["stage", "from s", "to s", "seconds", "share"],
        [
            [
                name,
                f"{s['from_s']:.1f}",
                f"{s['to_s']:.1f}",
                f"{s['duration_s']:.2f}",
                f"{s['share']:.1%}",
            ]
            for name, s in rows
        ],
    )
    what = f"medians of {n_repeats} repeats" if n_repeats > 1 else "one run"
    lines = [f"train-all-fusions, wall time per stage ({what}; times from the flow run's start)",
             "", table, ""]  # fmt: skip
    for g in summary["overlapping"]:
        lines.append(
            f"at once: {', '.join(g['stages'])}: {g['span_s']:.1f} s wall ({g['share']:.1%}) "
            f"from {g['from_s']:.1f} to {g['to_s']:.1f} s; their own durations add up to "
            f"{g['sum_own_s']:.1f} s"
        )
    lines += [
        f"flow run total:        {summary['total_s']:.1f} s",
        f"sum of stage times:    {summary['sum_stages_s']:.1f} s (overlapping stages counted each)",
        f"some stage running:    {summary['union_s']:.1f} s",
        f"outside every stage:   {summary['outside_stages_s']:.1f} s (the flow body between "
        "task runs)",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Runs


def read_runs(flow_run_id: UUID) -> tuple[Any, list[Any]]:
    """The flow run and its task runs, once the API has recorded every task run's end."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only_this = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last_count = -1
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run_id)
            task_runs = client.read_task_runs(flow_run_filter=only_this, limit=200)
            done = all(
                t.state is not None and t.state.is_final() and t.start_time and t.end_time
                for t in task_runs
            )
            if done and task_runs and len(task_runs) == last_count and flow_run.end_time:
                return flow_run, task_runs
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"flow run {flow_run_id}: its task runs not all recorded as finished "
                    f"after {SETTLE_TIMEOUT_S:.0f} s ({len(task_runs)} read)"
                )
            last_count = len(task_runs) if done else -1
            time.sleep(0.5)


def run_once(config_path: str, overrides: list[str], folder: Path) -> dict[str, Any]:
    """One `train-all-fusions` run on `folder`; its stages as Prefect recorded them."""
    from flows.train_all_fusions import train_all_fusions

    state = train_all_fusions(
        config_path=str(ROOT / config_path), overrides=overrides, return_state=True
    )
    if not state.is_completed():
        state.result()  # raises the run's own error
        raise RuntimeError(f"flow run ended {state.name}: {state.message}")
    summary = state.result()
    flow_run, task_runs = read_runs(state.state_details.flow_run_id)
    total_s = (flow_run.end_time - flow_run.start_time).total_seconds()
    rows = stage_rows(flow_run.start_time, total_s, task_runs)
    covered = union_s(rows)
    return {
        "storage_uri": str(folder),
        "run": summary.run,
        "flow_run_id": str(flow_run.id),
        "flow_run_name": flow_run.name,
        "state": flow_run.state.name if flow_run.state else None,
        "start": flow_run.start_time.isoformat(),
        "end": flow_run.end_time.isoformat(),
        "total_s": total_s,
        "run_time_s": flow_run.total_run_time.total_seconds(),
        "sum_stages_s": sum(r["duration_s"] for r in rows),
        "union_s": covered,
        "outside_stages_s": total_s - covered,
        "stages": rows,
        "overlapping": overlaps(rows, total_s),
    }


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--config", default="config/demo.yaml", help="relative to the project")
    parser.add_argument("--repeats", type=int, default=1, help="runs; the median of each figure")
    add_overrides(parser)
    parser.add_argument("--smoke", action="store_true", help="a tiny run that only checks it works")
    parser.add_argument("--keep", action="store_true", help="keep each run's folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats: need at least 1, got {args.repeats}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.quality import in_process_prefect

    in_process_prefect()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per API call otherwise
    from config import load_config

    base = [*(SMOKE if args.smoke else []), *args.overrides, "generator.fill_empty_dataset=true"]
    try:
        load_config(ROOT / args.config, base)  # a bad --set fails here, before any run
    except Exception as exc:
        print(f"bench_e2e: {exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.bench_e2e", *(argv or sys.argv[1:])]),
        "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": args.config,
        "overrides": base,
        "smoke": args.smoke,
        "repeats": [],
    }
    for i in range(args.repeats):
        folder = Path(tempfile.mkdtemp(prefix=FOLDER_PREFIX))
        overrides = [*base, f"storage.uri={folder}"]
        log.info("repeat %d of %d on %s", i + 1, args.repeats, folder)
        try:
            report["repeats"].append(run_once(args.config, overrides, folder))
        except Exception as exc:
            print(f"bench_e2e: repeat {i + 1} failed:\n" + "".join(traceback.format_exception(exc)),
                  file=sys.stderr)  # fmt: skip
            shutil.rmtree(folder, ignore_errors=True)
            return 1
        if args.keep:
            log.info("run folder kept: %s", folder)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = os.getloadavg()
    report["medians"] = medians(report["repeats"])
    table = render(report["medians"], args.repeats)
    report["table"] = table
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    start, end = report["machine"]["loadavg_at_start"][0], report["machine"]["loadavg_at_end"][0]
    print(table)  # the benchmark's output is its report
    print(f"load average {start:.2f} at the start, {end:.2f} at the end, "
          f"on {report['machine']['cpus']} cores\nwritten: {args.out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
