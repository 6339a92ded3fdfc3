"""Detection quality on the synthetic benchmark, measured through the product's own pipeline.

    python -m benchmarks.quality [--sizes demo,production] [--seeds 0,1,2] [--pairs N]
        [--families-out all|none|a,b] [--ablation | --no-ablation] [--main | --no-main]
        [--set SECTION.KEY=VALUE] [--keep] [--out benchmarks/results/quality.json]

Every figure comes from a real `train-all-fusions` run: the flow function is called in this
process (Prefect starts its own temporary API, as `make run` does), each run on a fresh temporary
folder (`storage.uri`), and its `outputs/reports/<run>/metrics.json` is read back. Sizes:
  - demo: `config/demo.yaml` (64 px images, 64 mel bands, 15 epochs);
  - production: `config/config.yaml` (224 px, 128 mel bands, 15 epochs) with the folder as the
    bucket, `generator.fill_empty_dataset=true` and `run.skip_if_unchanged=false`.
Measured, per size and fusion, as mean ± std over `--seeds` (`run.seed`; the data's own seed,
`generator.seed`, stays fixed, so the spread is that of training):
  - test ROC-AUC and EER, minutes per run;
  - per-family ROC-AUC (each fake family's test fakes against all test reals);
  - leave-one-family-out ROC-AUC (demo size only): for each fake family F, the benchmark is
    written by the product's generator, `dataset/pairs.csv` gets a `split` column (F's fakes all
    in test, the other fakes in train/val only, reals split by the stable hash), and the run
    (`generator.fill_empty_dataset=false`) trains and validates without F and tests on F + reals;
  - the ablation (demo size only): `training.consistency_weight=0`, `training.emotion_weight=0`
    (only when the schema has that key; otherwise skipped with a note) and both, against the
    runs above.
The table goes to stdout, every figure (and each run's) to `--out` as JSON.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config.cli import add_overrides
from tasks.data.manifest import split_of, stable_fraction
from tasks.data.synthetic import FAKE_FAMILIES

log = logging.getLogger("benchmarks.quality")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
SIZES: dict[str, tuple[str, list[str]]] = {  # size -> (config file, overrides that make it work)
    "demo": ("config/demo.yaml", []),
    "production": (
        "config/config.yaml",
        ["generator.fill_empty_dataset=true", "run.skip_if_unchanged=false"],
    ),
}
ABLATIONS: dict[str, list[str]] = {  # variant -> overrides; "full" is the main runs
    "no-consistency": ["training.consistency_weight=0"],
    "no-emotion": ["training.emotion_weight=0"],
    "neither": ["training.consistency_weight=0", "training.emotion_weight=0"],
}
EMOTION_KEY = "emotion_weight"


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)


def leave_one_family_out(
    pairs_csv: str, family: str, val_fraction: float, test_fraction: float
) -> str:
    """pairs.csv with a `split` column that holds `family` out of training.

    `family`'s fakes all go to test; the other fakes go to train or val only (a stable hash of the
    pair's keys, val getting the share val_fraction / (1 - test_fraction)), so the test split holds
    only the held-out family and reals; reals are split train/val/test by the same stable hash.
    Every other column is kept as it is.
    """
    reader = csv.DictReader(io.StringIO(pairs_csv))
    columns = [c for c in reader.fieldnames or [] if c != "split"]
    for needed in ("audio_key", "image_key", "label", "family"):
        if needed not in columns:
            raise ValueError(f"pairs.csv: no {needed!r} column (found {columns})")
    rows = list(reader)
    if not any(r["family"] == family for r in rows):
        raise ValueError(f"pairs.csv: no pair of family {family!r}")
    val_share = val_fraction / (1.0 - test_fraction)
    out = io.StringIO()
    writer = csv.DictWriter(out, [*columns, "split"], lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        key = f"{row['audio_key']}\n{row['image_key']}"
        if row["family"] == family:
            split = "test"
        elif row["label"].strip() in ("1", "fake"):
            split = "val" if stable_fraction("lofo:" + key) < val_share else "train"
        else:
            split = split_of(key, val_fraction, test_fraction)
        writer.writerow({**row, "split": split})
    return out.getvalue()


def verdicts(doc: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """Each fusion's entry of a metrics.json document, and its "ensemble" when it has one."""
    ensemble = {"ensemble": doc["ensemble"]} if doc.get("ensemble") else {}
    return {**doc["fusions"], **ensemble}


def headline(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """fusion (or "ensemble") -> {"roc_auc", "eer"} of a metrics.json document."""
    return {
        fusion: {k: float(entry["metrics"][k]) for k in ("roc_auc", "eer")}
        for fusion, entry in verdicts(doc).items()
    }


def family_auc(doc: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """fusion (or "ensemble") -> {family: ROC-AUC of its fakes vs all reals} of a metrics.json
    document."""
    return {
        fusion: {name: float(v["roc_auc"]) for name, v in entry.get("families", {}).items()}
        for fusion, entry in verdicts(doc).items()
    }


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (0 for one value) and count; NaNs are left out."""
    xs = [float(v) for v in values if not math.isnan(float(v))]
    if not xs:
        return math.nan, math.nan, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs)


def format_mean_std(values: Iterable[float], digits: int = 3) -> str:
    """ "0.912 ± 0.013" over several values, "0.912" for one, "-" for none."""
    mean, std, n = mean_std(values)
    if n == 0:
        return "-"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=True)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in (headers, ["-" * w for w in widths], *rows)
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunResult:
    """One `train-all-fusions` run and what its metrics.json says."""

    kind: str  # "main", "lofo" (variant = held-out family) or "ablation" (variant = its name)
    size: str
    seed: int
    variant: str
    overrides: list[str]
    run: str = ""
    minutes: float = math.nan
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # fusion -> auc, eer
    families: dict[str, dict[str, float]] = field(default_factory=dict)  # fusion -> family -> auc
    folder: str | None = None  # kept with --keep
    error: str | None = None


def run_flow(
    result: RunResult, config_path: str, folder: Path, fill: bool, keep: bool
) -> RunResult:
    """Run `train-all-fusions` on `folder`, read its metrics.json into `result`."""
    from config import load_config
    from flows.train_all_fusions import train_all_fusions
    from tasks.io import records
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    overrides = [
        *result.overrides,
        f"storage.uri={folder}",
        f"run.seed={result.seed}",
        f"generator.fill_empty_dataset={'true' if fill else 'false'}",
    ]
    result.overrides = overrides
    log.info("%s %s seed %d %s: %s", result.kind, result.size, result.seed, result.variant, folder)
    start = time.perf_counter()
    try:
        summary = train_all_fusions(config_path=str(ROOT / config_path), overrides=overrides)
        result.minutes = (time.perf_counter() - start) / 60
        cfg = load_config(ROOT / config_path, overrides)
        doc = records.read_json(
            open_storage(cfg.storage), Layout.from_config(cfg.storage).metrics(summary.run)
        )
        result.run = summary.run
        result.metrics = headline(doc)
        result.families = family_auc(doc)
    except Exception as exc:  # one failed run must not lose the hours of the others
        result.minutes = (time.perf_counter() - start) / 60
        result.error = "".join(traceback.format_exception(exc))
        log.error(
            "run failed (%s %s seed %d %s):\n%s",
            result.kind,
            result.size,
            result.seed,
            result.variant,
            result.error,
        )
    if keep:
        result.folder = str(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)
    return result


def write_benchmark_data(config_path: str, overrides: list[str], folder: Path) -> None:
    """Write the size's benchmark into `folder` with the product's generator."""
    from config import load_config
    from tasks.data import synthetic
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    cfg = load_config(ROOT / config_path, [*overrides, f"storage.uri={folder}"])
    store = open_storage(cfg.storage)
    store.check()
    synthetic.generate(
        store, Layout.from_config(cfg.storage), cfg.generator.n_pairs, cfg.generator.seed
    )


def lofo_dataset(
    config_path: str, overrides: list[str], source: Path, folder: Path, family: str
) -> None:
    """Copy the generated dataset/ to `folder`, rewrite its pairs.csv to hold `family` out."""
    from config import load_config
    from tasks.io.layout import Layout
    from tasks.io.storage import open_storage

    cfg = load_config(ROOT / config_path, [*overrides, f"storage.uri={folder}"])
    layout = Layout.from_config(cfg.storage)
    shutil.copytree(source / layout.dataset, folder / layout.dataset)
    store = open_storage(cfg.storage)
    text = store.read_bytes(layout.pairs_csv()).decode("utf-8")
    rewritten = leave_one_family_out(text, family, cfg.data.val_fraction, cfg.data.test_fraction)
    store.write_bytes(layout.pairs_csv(), rewritten.encode(), content_type="text/csv")


def has_emotion_weight() -> bool:
    from config.schema import TrainingConfig

    return EMOTION_KEY in TrainingConfig.model_fields


# --------------------------------------------------------------------------------------------
# Summary and table


def summarise(results: Sequence[RunResult]) -> dict[str, Any]:
    """Every figure of the table as plain data ({"mean", "std", "n"} per cell).

    main[size][fusion], lofo[size][family][fusion], ablation[size][variant][fusion] hold ROC-AUC,
    EER and minutes per run; families[size][family][fusion] the per-family ROC-AUC of the main runs.
    """

    def stats(values: Iterable[float]) -> dict[str, float]:
        mean, std, n = mean_std(values)
        return {"mean": mean, "std": std, "n": n}

    ok = [r for r in results if r.error is None]
    groups: dict[tuple[str, str, str, str], list[RunResult]] = {}
    for r in ok:
        for fusion in r.metrics:
            groups.setdefault((r.kind, r.size, r.variant, fusion), []).append(r)
    out: dict[str, Any] = {"main": {}, "families": {}, "lofo": {}, "ablation": {}}
    for (kind, size, variant, fusion), runs in groups.items():
        cell = out[kind].setdefault(size, {})
        if kind != "main":
            cell = cell.setdefault(variant, {})
        cell[fusion] = {
            "roc_auc": stats(r.metrics[fusion]["roc_auc"] for r in runs),
            "eer": stats(r.metrics[fusion]["eer"] for r in runs),
            "minutes_per_run": stats(r.minutes for r in runs),
            "seeds": sorted(r.seed for r in runs),
        }
    aucs: dict[tuple[str, str, str], list[float]] = {}
    for r in ok:
        if r.kind == "main":
            for fusion, fams in r.families.items():
                for name, auc in fams.items():
                    aucs.setdefault((r.size, name, fusion), []).append(auc)
    for (size, name, fusion), values in aucs.items():
        out["families"].setdefault(size, {}).setdefault(name, {})[fusion] = stats(values)
    return out


def render(results: Sequence[RunResult], notes: Sequence[str]) -> str:
    """The printed report: one table per measurement, cells mean ± std over the seeds."""
    ok = [r for r in results if r.error is None]
    order = {"early": 0, "mid": 1, "late": 2}  # the schema's order; others after, by name
    fusions = sorted({f for r in ok for f in r.metrics}, key=lambda f: (order.get(f, 3), f))
    parts: list[str] = []

    def runs_of(kind: str, size: str, variant: str | None = None) -> list[RunResult]:
        return [r for r in ok if r.kind == kind and r.size == size and variant in (None, r.variant)]

    sizes = list(dict.fromkeys(r.size for r in results))
    rows = []
    for size in sizes:
        runs = runs_of("main", size)
        for fusion in fusions:
            got = [r for r in runs if fusion in r.metrics]
            if got:
                rows.append(
                    [
                        size,
                        fusion,
                        format_mean_std(r.metrics[fusion]["roc_auc"] for r in got),
                        format_mean_std(r.metrics[fusion]["eer"] for r in got),
                        format_mean_std((r.minutes for r in got), 1),
                        str(len(got)),
                    ]
                )
    if rows:  # none with --no-main
        parts += [
            "Test split (mean ± std over seeds)",
            format_table(["size", "fusion", "ROC-AUC", "EER", "min/run", "seeds"], rows),
        ]

    rows = []
    for size in sizes:
        runs = runs_of("main", size)
        names = sorted({n for r in runs for fams in r.families.values() for n in fams})
        for name in names:
            rows.append(
                [size, name]
                + [
                    format_mean_std(
                        r.families[f][name] for r in runs if name in r.families.get(f, {})
                    )
                    for f in fusions
                ]
            )
    if rows:
        parts += [
            "",
            "Per-family ROC-AUC (test fakes of the family vs all test reals)",
            format_table(["size", "family", *fusions], rows),
        ]

    for kind, title, label in (
        (
            "lofo",
            "Leave-one-family-out ROC-AUC (trained without the family, tested on it + reals)",
            "held out",
        ),
        (
            "ablation",
            "Ablation: test ROC-AUC with heads switched off (full = the runs above)",
            "variant",
        ),
    ):
        rows = []
        for size in sizes:
            variants = list(dict.fromkeys(r.variant for r in runs_of(kind, size)))
            if kind == "ablation" and variants and runs_of("main", size):
                variants = ["full", *variants]
            for variant in variants:
                runs = runs_of(
                    "main" if variant == "full" else kind,
                    size,
                    None if variant == "full" else variant,
                )
                cells = [
                    format_mean_std(r.metrics[f]["roc_auc"] for r in runs if f in r.metrics)
                    for f in fusions
                ]
                minutes = format_mean_std((r.minutes for r in runs), 1)
                rows.append([size, variant, *cells, minutes, str(len(runs))])
        if rows:
            table = format_table(["size", label, *fusions, "min/run", "seeds"], rows)
            parts += ["", title, table] if parts else [title, table]

    failed = [r for r in results if r.error is not None]
    if failed:
        parts += ["", f"{len(failed)} run(s) failed (tracebacks in the log and the JSON):"]
        parts += [
            f"  {r.kind} {r.size} seed {r.seed} {r.variant}: {r.error.strip().splitlines()[-1]}"
            for r in failed
            if r.error
        ]
    if notes:
        parts += ["", *(f"note: {n}" for n in notes)]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="demo,production", help="demo, production or both")
    parser.add_argument("--seeds", default="0,1,2", help="run.seed values, comma-separated")
    parser.add_argument(
        "--pairs", type=int, default=None, help="generator.n_pairs (default: the config's, 600)"
    )
    parser.add_argument(
        "--families-out", default="all", help="leave-one-family-out on demo size: all, none or a,b"
    )
    parser.add_argument(
        "--ablation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="consistency/emotion heads off, demo size (default: on)",
    )
    parser.add_argument(
        "--main",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the full benchmark's runs, every size (default: on; off: held-out and ablation only)",
    )
    add_overrides(parser, help="extra override for every run (repeatable)")
    parser.add_argument("--keep", action="store_true", help="keep each run's temporary folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON of every figure")
    args = parser.parse_args(argv)
    args.sizes = [s for s in args.sizes.split(",") if s]
    for size in args.sizes:
        if size not in SIZES:
            parser.error(f"--sizes: unknown size {size!r} (choose from {', '.join(SIZES)})")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        parser.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    if not args.seeds:
        parser.error("--seeds: name at least one seed")
    if args.families_out == "all":
        args.families_out = list(FAKE_FAMILIES)
    elif args.families_out == "none":
        args.families_out = []
    else:
        args.families_out = [f for f in args.families_out.split(",") if f]
        unknown = sorted(set(args.families_out) - set(FAKE_FAMILIES))
        if unknown:
            parser.error(f"--families-out: unknown {unknown} (families: {list(FAKE_FAMILIES)})")
    if not (args.main or args.families_out or args.ablation):
        parser.error("--no-main with --families-out none and --no-ablation: nothing to run")
    if args.pairs is not None and args.pairs < 2:
        parser.error(f"--pairs: need at least 2, got {args.pairs}")
    return args


def in_process_prefect() -> None:
    """Settings for flow runs called in this process (Prefect starts its temporary API): no
    analytics, the project's loggers in the run logs, INFO lines on stderr."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models,config,flows")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    in_process_prefect()
    from config import load_config

    started = datetime.now(UTC)
    notes: list[str] = []
    ablations = dict(ABLATIONS)
    if args.ablation and not has_emotion_weight():
        ablations = {k: v for k, v in ablations.items() if not any(EMOTION_KEY in o for o in v)}
        notes.append(
            f"training.{EMOTION_KEY} is not in this schema (TrainingConfig): the "
            "emotion-off ablation variants were skipped"
        )
    root = Path(tempfile.mkdtemp(prefix="quality-"))
    results: list[RunResult] = []
    try:
        for size in args.sizes:
            config_path, size_overrides = SIZES[size]
            base = [*size_overrides, *args.overrides]
            if args.pairs is not None:
                base.append(f"generator.n_pairs={args.pairs}")
            load_config(ROOT / config_path, base)  # a bad --set fails here, before any run

            def new_folder(name: str) -> Path:
                return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))

            for seed in args.seeds if args.main else []:
                r = RunResult("main", size, seed, "full", list(base))
                results.append(
                    run_flow(r, config_path, new_folder(f"{size}-{seed}"), True, args.keep)
                )
            if size != "demo":  # the held-out and ablation runs are bounded to the demo size
                continue
            if args.families_out:
                source = root / f"{size}-data"
                write_benchmark_data(config_path, base, source)
                for family in args.families_out:
                    for seed in args.seeds:
                        folder = new_folder(f"{size}-lofo-{family}-{seed}")
                        r = RunResult("lofo", size, seed, family, list(base))
                        try:
                            lofo_dataset(config_path, base, source, folder, family)
                        except Exception as exc:
                            r.error = "".join(traceback.format_exception(exc))
                            results.append(r)
                            continue
                        results.append(run_flow(r, config_path, folder, False, args.keep))
                if not args.keep:
                    shutil.rmtree(source, ignore_errors=True)
            if args.ablation:
                for variant, extra in ablations.items():
                    for seed in args.seeds:
                        r = RunResult("ablation", size, seed, variant, [*base, *extra])
                        folder = new_folder(f"{size}-{variant}-{seed}")
                        results.append(run_flow(r, config_path, folder, True, args.keep))
    finally:
        if args.keep:
            log.info("run folders kept under %s", root)
        else:
            shutil.rmtree(root, ignore_errors=True)

    table = render(results, notes)
    report = {
        "command": " ".join(["python -m benchmarks.quality", *(argv or sys.argv[1:])]),
        "started_utc": started.isoformat(timespec="seconds"),
        "minutes_total": (datetime.now(UTC) - started).total_seconds() / 60,
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
            "seeds": args.seeds,
            "pairs": args.pairs,
            "families_out": args.families_out,
            "ablation": args.ablation,
            "overrides": args.overrides,
        },
        "notes": notes,
        "summary": summarise(results),
        "runs": [asdict(r) for r in results],
        "table": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=True) + "\n")
    print(table)  # the benchmark's output is its report
    print(f"\nwritten: {args.out}")
    return 1 if any(r.error for r in results) else 0


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


if __name__ == "__main__":
    sys.exit(main())
