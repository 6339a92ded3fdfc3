"""The quality benchmark's plain helpers: the leave-one-family-out pairs.csv, reading metrics.json,
mean ± std formatting."""

from __future__ import annotations

import csv
import io
import math

import pytest

from benchmarks.quality import (
    RunResult,
    family_auc,
    format_mean_std,
    format_table,
    headline,
    leave_one_family_out,
    mean_std,
    parse_args,
    render,
)
from tasks.data.synthetic import PAIRS_COLUMNS, pairs_csv, plan_pairs


def test_leave_one_family_out_holds_the_family_out_of_training() -> None:
    text = pairs_csv(plan_pairs(280, seed=3)).decode()
    rows = list(csv.DictReader(io.StringIO(leave_one_family_out(text, "griffin_lim", 0.15, 0.15))))
    assert list(rows[0]) == [*PAIRS_COLUMNS, "split"]  # every column kept, split added
    assert len(rows) == 280
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "val", "test")}
    assert all(r["split"] == "test" for r in rows if r["family"] == "griffin_lim")
    test_families = {r["family"] for r in by_split["test"]}
    assert test_families == {"griffin_lim", "real"}  # only the held-out fakes and reals
    for split in ("train", "val"):
        families = {r["family"] for r in by_split[split]}
        assert "griffin_lim" not in families and "real" in families and len(families) > 2
    again = leave_one_family_out(text, "griffin_lim", 0.15, 0.15)
    assert again == leave_one_family_out(again, "griffin_lim", 0.15, 0.15)  # stable, idempotent


def test_leave_one_family_out_refuses_an_unknown_family() -> None:
    text = pairs_csv(plan_pairs(20, seed=3)).decode()
    with pytest.raises(ValueError, match="no pair of family 'nope'"):
        leave_one_family_out(text, "nope", 0.15, 0.15)


def test_metrics_document_is_read_per_fusion_and_family() -> None:
    doc = {
        "fusions": {
            "early": {
                "metrics": {"roc_auc": 0.9, "eer": 0.1, "f1": 0.8},
                "families": {"face_blend": {"roc_auc": 0.95, "recall": 0.9, "n_fake": 6.0}},
            },
            "late": {"metrics": {"roc_auc": 0.7, "eer": 0.3}, "families": {}},
        }
    }
    assert headline(doc) == {
        "early": {"roc_auc": 0.9, "eer": 0.1},
        "late": {"roc_auc": 0.7, "eer": 0.3},
    }
    assert family_auc(doc) == {"early": {"face_blend": 0.95}, "late": {}}
    # a run with an ensemble: read as one more column, after the fusions
    doc["ensemble"] = {
        "fusions": ["early", "late"],
        "metrics": {"roc_auc": 0.85, "eer": 0.2, "tpr_at_1pct_fpr": 0.4},
        "families": {"face_blend": {"roc_auc": 0.97, "recall": 1.0, "n_fake": 6.0}},
    }
    assert list(headline(doc)) == ["early", "late", "ensemble"]
    assert headline(doc)["ensemble"] == {"roc_auc": 0.85, "eer": 0.2}
    assert family_auc(doc)["ensemble"] == {"face_blend": 0.97}


def test_mean_std_formatting() -> None:
    assert format_mean_std([0.9, 0.8, 1.0]) == "0.900 ± 0.100"  # sample std
    assert format_mean_std([0.9]) == "0.900"
    assert format_mean_std([]) == "-"
    assert format_mean_std([2.5, math.nan], digits=1) == "2.5"  # NaN left out
    assert mean_std([1.0, 3.0])[2] == 2
    table = format_table(["a", "bb"], [["xyz", "1"]]).splitlines()
    assert table == ["a    bb", "---  --", "xyz  1"]


def _run(kind: str, seed: int, variant: str, auc: float) -> RunResult:
    metrics = {f: {"roc_auc": auc, "eer": 0.1} for f in ("early", "mid", "late")}
    return RunResult(kind, "demo", seed, variant, [], minutes=4.0, metrics=metrics)


def test_held_out_runs_alone_render_without_the_full_benchmark() -> None:
    args = parse_args(["--no-main", "--families-out", "griffin_lim", "--no-ablation"])
    assert not args.main and args.families_out == ["griffin_lim"]
    lofo = [_run("lofo", 1, "griffin_lim", 0.6), _run("lofo", 2, "griffin_lim", 0.8)]
    text = render([*lofo, _run("ablation", 1, "no_consistency", 0.9)], [])
    assert "Test split" not in text
    assert text.startswith("Leave-one-family-out")
    assert "demo  griffin_lim  0.700 ± 0.141" in text
    assert " full " not in text  # no full-benchmark row for the ablation to compare against
    with_main = render([_run("main", 1, "full", 0.99), *lofo], [])
    assert with_main.startswith("Test split") and "0.990" in with_main
    with pytest.raises(SystemExit):
        parse_args(["--no-main", "--families-out", "none", "--no-ablation"])
