"""`detect` after a tiny pipeline run, through Prefect: `--pairs` on the test split's pairs gives
each champion's scores and decisions, equal (within float tolerance) to the evaluation's own
predictions.csv for the same pairs; `--audio/--image` on local copies of a pair scores alike; a
bad file is skipped and listed; a run that does not exist fails naming the keys."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from flows.common import run_cli
from flows.detect import SKIPPED_KEY, TABLE_KEY, main, parser
from tasks.data.manifest import pair_id_of, read_manifest
from tasks.io.layout import Layout
from tasks.io.storage import LocalStorage
from tests.flows.test_pipeline import TINY

FUSIONS = ("early", "mid", "late")
TOLERANCE = 1e-5  # same arrays, same weights: only float summation order may differ by batch


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def trained(prefect_harness: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny train-all-fusions run (the demo's recipe at 32 px, one epoch) in a local bucket."""
    from flows.train_all_fusions import train_all_fusions

    root = tmp_path_factory.mktemp("detect")
    bucket = root / "bucket"
    cfg_path = root / "tiny.yaml"
    cfg_path.write_text(TINY.format(bucket=bucket))
    summary = train_all_fusions(config_path=str(cfg_path))
    layout = Layout()
    store = LocalStorage(str(bucket))
    test_rows = [r for r in read_manifest(store, layout.manifest(summary.run)) if r.split == "test"]
    predictions = {
        row["pair_id"]: row for row in read_csv(bucket / layout.predictions(summary.run))
    }
    return {
        "run": summary.run,
        "bucket": bucket,
        "config": cfg_path,
        "test_rows": test_rows,
        "predictions": predictions,
    }


def detect_cli(trained: dict[str, Any], *args: str) -> int:
    return run_cli(main, parser(), ["--config", str(trained["config"]), *args])


def check_against_evaluation(rows: list[dict[str, str]], trained: dict[str, Any]) -> None:
    for row in rows:
        expected = trained["predictions"][pair_id_of(row["audio_key"], row["image_key"])]
        for fusion in (*FUSIONS, "ensemble"):  # the fused verdict too, as predictions.csv has it
            score, want = float(row[f"score_{fusion}"]), float(expected[f"score_{fusion}"])
            assert score == pytest.approx(want, abs=TOLERANCE), (fusion, row)
            assert row[f"decision_{fusion}"] == expected[f"decision_{fusion}"], (fusion, row)


def test_detect_pairs_gives_the_evaluations_scores(trained, tmp_path: Path) -> None:
    rows = trained["test_rows"]
    assert len(rows) == len(trained["predictions"]) >= 8
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["audio_key", "image_key"])
        writer.writerows((r.audio_key, r.image_key) for r in rows)
    out = tmp_path / "scores.csv"

    assert detect_cli(trained, "--pairs", str(pairs), "--out", str(out)) == 0

    got = read_csv(out)
    assert list(got[0]) == [
        "audio_key", "image_key", "score_early", "decision_early", "score_mid", "decision_mid",
        "score_late", "decision_late", "score_ensemble", "decision_ensemble",
    ]  # fmt: skip
    assert [(g["audio_key"], g["image_key"]) for g in got] == [
        (r.audio_key, r.image_key) for r in rows
    ]
    check_against_evaluation(got, trained)
    decisions = {g[f"decision_{f}"] for g in got for f in FUSIONS}
    assert decisions <= {"fake", "real"}
    skipped = json.loads((tmp_path / "scores.skipped.json").read_text())
    assert skipped["n_skipped"] == 0

    # The same pairs with the run's own models (--run): the champions are this run's models.
    again = tmp_path / "again.csv"
    code = detect_cli(trained, "--pairs", str(pairs), "--run", trained["run"], "--out", str(again))
    assert code == 0
    assert read_csv(again) == got


def test_dataset_pairs_csv_key_and_prefix_pair_as_training(trained, tmp_path: Path) -> None:
    """`--pairs dataset/pairs.csv` (a bucket key; its keys are relative to dataset/) and
    `--prefix dataset/` (paired as the manifest pairs it) score every pair the run trained and
    tested on; the test pairs' scores are the evaluation's."""
    manifest = read_manifest(
        LocalStorage(str(trained["bucket"])), Layout().manifest(trained["run"])
    )
    test_ids = {r.pair_id for r in trained["test_rows"]}

    by_csv = tmp_path / "by-csv.csv"
    assert detect_cli(trained, "--pairs", "dataset/pairs.csv", "--out", str(by_csv)) == 0
    rows = [
        {**r, "audio_key": "dataset/" + r["audio_key"], "image_key": "dataset/" + r["image_key"]}
        for r in read_csv(by_csv)
    ]
    assert {(r["audio_key"], r["image_key"]) for r in rows} == {
        (m.audio_key, m.image_key) for m in manifest
    }
    tested = [r for r in rows if pair_id_of(r["audio_key"], r["image_key"]) in test_ids]
    assert len(tested) == len(test_ids)
    check_against_evaluation(tested, trained)

    by_prefix = tmp_path / "by-prefix.csv"
    assert detect_cli(trained, "--prefix", "dataset/", "--out", str(by_prefix)) == 0
    got = read_csv(by_prefix)
    assert sorted((g["audio_key"], g["image_key"]) for g in got) == sorted(
        (r["audio_key"], r["image_key"]) for r in rows
    )
    check_against_evaluation(
        [g for g in got if pair_id_of(g["audio_key"], g["image_key"]) in test_ids], trained
    )


def test_detect_single_local_pair_and_bucket_default(trained, tmp_path: Path) -> None:
    row = trained["test_rows"][0]
    audio = tmp_path / "clip.wav"
    image = tmp_path / ("face" + Path(row.image_key).suffix)
    audio.write_bytes((trained["bucket"] / row.audio_key).read_bytes())
    image.write_bytes((trained["bucket"] / row.image_key).read_bytes())

    assert detect_cli(trained, "--audio", str(audio), "--image", str(image)) == 0

    [scores] = sorted((trained["bucket"] / "outputs" / "detections").glob("*/detections.csv"))
    [got] = read_csv(scores)
    assert (got["audio_key"], got["image_key"]) == (str(audio), str(image))
    check_against_evaluation([{**got, "audio_key": row.audio_key, "image_key": row.image_key}],
                             trained)  # fmt: skip


def test_bad_file_is_skipped_and_listed_never_fatal(trained, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    good = trained["test_rows"][:2]
    bad_audio = tmp_path / "broken.wav"
    bad_audio.write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "audio_key,image_key\n"
        f"{good[0].audio_key},{good[0].image_key}\n"
        f"{bad_audio},{good[1].image_key}\n"
        f"dataset/audio/real/no-such.wav,{good[1].image_key}\n"
        f"{good[1].audio_key},{good[1].image_key}\n"
    )
    out = tmp_path / "scores.csv"

    assert detect_cli(trained, "--pairs", str(pairs), "--out", str(out)) == 0

    got = read_csv(out)
    assert [g["audio_key"] for g in got] == [good[0].audio_key, good[1].audio_key]
    check_against_evaluation(got, trained)
    skipped = json.loads((tmp_path / "scores.skipped.json").read_text())
    reasons = {s["key"]: s["reason"] for s in skipped["skipped"]}
    assert skipped["n_skipped"] == 2
    assert "not a readable audio file" in reasons[str(bad_audio)]
    assert "neither a local file nor an object" in reasons["dataset/audio/real/no-such.wav"]

    async def artifacts(key: str) -> list[Any]:
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), limit=50
            )

    import asyncio

    tables = asyncio.run(artifacts(TABLE_KEY))
    assert any(
        {r["audio_key"] for r in json.loads(a.data)} == {good[0].audio_key, good[1].audio_key}
        for a in tables
    )
    notes = asyncio.run(artifacts(SKIPPED_KEY))
    assert any(str(bad_audio) in a.data and "no-such.wav" in a.data for a in notes)

    async def run_names() -> list[str]:
        async with get_client() as client:
            return [r.name for r in await client.read_flow_runs(limit=200)]

    assert any(
        n.startswith("detect 20") and f"pairs {pairs} (champions)" in n
        for n in asyncio.run(run_names())
    )


def test_missing_run_fails_naming_the_keys(trained, capsys) -> None:
    code = detect_cli(trained, "--prefix", "dataset/", "--run", "20000101T000000Z")
    err = capsys.readouterr().err
    assert code == 2
    assert "run '20000101T000000Z' has no model" in err
    assert "outputs/models/mid/20000101T000000Z/model.pt" in err
    assert trained["run"] in err  # the runs that do have models


def test_no_champions_fails_naming_the_champion_records(prefect_harness, tmp_path: Path, capsys):
    cfg = tmp_path / "empty.yaml"
    (tmp_path / "bucket").mkdir()
    cfg.write_text(f"storage:\n  uri: {tmp_path / 'bucket'}\n")
    code = run_cli(main, parser(), ["--config", str(cfg), "--audio", "a.wav", "--image", "b.png"])
    err = capsys.readouterr().err
    assert code == 2
    assert "no fusion has a champion" in err
    assert "outputs/models/early/champion.json" in err
