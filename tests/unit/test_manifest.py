"""The manifest on both backends: pairs from pairs.csv or seeded random pairing, stable splits,
listing-time skips, the data hash, and clear failures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from config.schema import PipelineConfig
from tasks.data.manifest import read_manifest, split_of, stable_fraction
from tasks.errors import DataError
from tasks.io.layout import SPLITS, Layout
from tasks.io.storage import Storage, open_storage
from tests.unit.synthetic_data import (
    features_of,
    generated,
    listing_bad_files,
    load_into,
    manifest_of,
    tiny_config,
)


@pytest.fixture(scope="module")
def bench() -> dict[str, bytes]:
    return generated(40, seed=21)


@pytest.fixture(params=["local", "s3"])
def setup(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[PipelineConfig, Storage]:
    server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    cfg = tiny_config(request.param, tmp_path, server)
    store = open_storage(cfg.storage)
    store.check()
    return cfg, store


def csv_rows(objects: dict[str, bytes]) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(objects["dataset/pairs.csv"].decode())))


def write_csv(store: Storage, rows: list[dict[str, str]], columns: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    store.write_bytes("dataset/pairs.csv", buf.getvalue().encode())


def test_pairs_csv_manifest(setup: tuple[PipelineConfig, Storage], bench: dict[str, bytes]) -> None:
    cfg, store = setup
    load_into(store, bench)
    ref = manifest_of(store, cfg, "run1")
    assert ref.key == Layout().manifest("run1") and ref.uri == store.uri(ref.key)
    assert ref.n_pairs == 40 and ref.skipped == []
    assert sum(c["real"] for c in ref.counts.values()) == 20
    assert sum(c["fake"] for c in ref.counts.values()) == 20
    assert all(ref.counts[s]["real"] and ref.counts[s]["fake"] for s in SPLITS)

    rows = read_manifest(store, ref.key)
    expected = {
        ("dataset/" + r["audio_key"], "dataset/" + r["image_key"]): r for r in csv_rows(bench)
    }
    assert len(rows) == 40
    for row in rows:
        given = expected[(row.audio_key, row.image_key)]
        assert row.label == int(given["label"]) and row.family == given["family"]
        assert row.emotion == given["emotion"]
        assert row.audio_size == len(bench[row.audio_key]) and len(row.audio_etag) == 32
        assert row.split == split_of(row.pair_id, 0.2, 0.2)
    table = pq.read_table(io.BytesIO(store.read_bytes("outputs/manifests/run1/files.parquet")))
    assert table.num_rows == 80
    assert set(table.column("modality").to_pylist()) == {"audio", "image"}


def test_data_hash_tracks_content(
    setup: tuple[PipelineConfig, Storage], bench: dict[str, bytes]
) -> None:
    cfg, store = setup
    load_into(store, bench)
    first = manifest_of(store, cfg, "a").data_hash
    assert manifest_of(store, cfg, "b").data_hash == first  # unchanged data, same hash
    key = next(k for k in bench if k.endswith(".wav"))
    store.write_bytes(key, bench[key][:-2] + b"\x01\x02")  # same size, new content
    assert manifest_of(store, cfg, "c").data_hash != first


def test_random_pairing_within_labels_when_no_pairs_csv(
    setup: tuple[PipelineConfig, Storage], bench: dict[str, bytes]
) -> None:
    cfg, store = setup
    load_into(store, {k: v for k, v in bench.items() if k != "dataset/pairs.csv"})
    ref = manifest_of(store, cfg, "r")
    rows = read_manifest(store, ref.key)
    audio_used = {r.audio_key for r in rows}
    image_used = {r.image_key for r in rows}
    assert audio_used | image_used == {k for k in bench if k != "dataset/pairs.csv"}
    for r in rows:
        folder = "fake" if r.label else "real"
        assert r.audio_key.split("/")[2] == folder == r.image_key.split("/")[2]
        assert r.split == split_of(r.audio_key, 0.2, 0.2) == split_of(r.image_key, 0.2, 0.2)
        assert r.family == ("real" if r.label == 0 else "")  # family unknown without pairs.csv
    again = read_manifest(store, manifest_of(store, cfg, "r2").key)
    assert [(r.audio_key, r.image_key) for r in again] == [(r.audio_key, r.image_key) for r in rows]


def test_splits_stay_put_when_files_are_added(setup: tuple[PipelineConfig, Storage]) -> None:
    cfg, store = setup
    everything = generated(60, seed=31)
    rows = csv_rows(everything)
    first = rows[:30]
    load_into(
        store,
        {
            "dataset/" + r[k]: everything["dataset/" + r[k]]
            for r in first
            for k in ("audio_key", "image_key")
        },
    )
    write_csv(store, first, list(rows[0]))
    before = {r.pair_id: r.split for r in read_manifest(store, manifest_of(store, cfg, "1").key)}
    load_into(store, everything)  # 30 more pairs, pairs.csv rewritten with all 60 rows
    after = {r.pair_id: r.split for r in read_manifest(store, manifest_of(store, cfg, "2").key)}
    assert len(before) == 30 and len(after) == 60
    assert {pid: after[pid] for pid in before} == before

    # Without pairs.csv a file keeps its split too (pairs may change partners, never splits).
    store.delete("dataset/pairs.csv")
    by_file = {}
    for r in read_manifest(store, manifest_of(store, cfg, "3").key):
        by_file[r.audio_key] = by_file[r.image_key] = r.split
    extra = generated(20, seed=32)
    load_into(
        store, {k.replace("/0000", "/x0"): v for k, v in extra.items() if k != "dataset/pairs.csv"}
    )
    later = read_manifest(store, manifest_of(store, cfg, "4").key)
    assert len({r.audio_key for r in later}) == 80
    for r in later:
        for key in (r.audio_key, r.image_key):
            assert by_file.get(key, r.split) == r.split


def test_stable_fraction_is_a_fixed_function_of_the_key() -> None:
    assert stable_fraction("dataset/audio/real/1.wav") == stable_fraction(
        "dataset/audio/real/1.wav"
    )
    values = [stable_fraction(f"k{i}") for i in range(2000)]
    assert 0 <= min(values) and max(values) < 1
    share = sum(split_of(f"k{i}", 0.2, 0.1) == "test" for i in range(2000)) / 2000
    assert 0.08 < share < 0.12


def test_split_column_is_honoured_and_val_carved_from_train(
    tmp_path: Path, bench: dict[str, bytes]
) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    rows = csv_rows(bench)
    for i, r in enumerate(rows):
        r["split"] = "test" if i % 4 == 0 else "train"
    write_csv(store, rows, ["audio_key", "image_key", "label", "split", "family"])
    got = read_manifest(store, manifest_of(store, cfg, "s").key)
    split_by_pair = {(r.audio_key, r.image_key): r.split for r in got}
    for i, r in enumerate(rows):
        split = split_by_pair[("dataset/" + r["audio_key"], "dataset/" + r["image_key"])]
        assert split == "test" if i % 4 == 0 else split in ("train", "val")
    assert sum(r.split == "val" for r in got) > 0  # carved from train

    for i, r in enumerate(rows):  # all three given: taken as is
        r["split"] = SPLITS[i % 3]
    write_csv(store, rows, ["audio_key", "image_key", "label", "split"])
    got = read_manifest(store, manifest_of(store, cfg, "t").key)
    assert sorted(r.split for r in got) == sorted(SPLITS[i % 3] for i in range(len(rows)))


def test_bad_pairs_csv_rows_are_skipped_with_their_line(
    tmp_path: Path, bench: dict[str, bytes]
) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    rows = csv_rows(bench)
    rows[0]["label"] = "maybe"
    rows[1]["audio_key"] = "audio/real/not-there.wav"
    rows[2]["image_key"] = rows[2]["audio_key"]  # an audio file where an image belongs
    rows[3]["audio_key"] = "dataset/" + rows[3]["audio_key"]  # root-relative keys are fine too
    rows.append(dict(rows[4]))  # duplicate
    write_csv(store, rows, ["audio_key", "image_key", "label", "family"])
    ref = manifest_of(store, cfg, "b")
    assert ref.n_pairs == 37
    reasons = {s["key"]: s["reason"] for s in ref.skipped}
    assert "label 'maybe'" in reasons["dataset/pairs.csv:2"]
    assert "not-there.wav is not a listed audio file" in reasons["dataset/pairs.csv:3"]
    assert "is not a listed image file" in reasons["dataset/pairs.csv:4"]
    assert "listed twice" in reasons["dataset/pairs.csv:42"]


def test_missing_column_names_the_file(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    write_csv(store, csv_rows(bench), ["audio_key", "image_key"])
    with pytest.raises(DataError, match=r"pairs\.csv: missing column\(s\) label"):
        manifest_of(store, cfg, "x")


def test_unusable_listed_files_are_skipped_and_reported(
    setup: tuple[PipelineConfig, Storage], bench: dict[str, bytes]
) -> None:
    cfg, store = setup
    load_into(store, {k: v for k, v in bench.items() if k != "dataset/pairs.csv"})
    bad = listing_bad_files()
    for key, (data, _) in bad.items():
        store.write_bytes("dataset/" + key, data)
    ref = manifest_of(store, cfg, "l")
    reasons = {s["key"]: s["reason"] for s in ref.skipped}
    for key, (_, phrase) in bad.items():
        assert phrase in reasons["dataset/" + key], (key, reasons.get("dataset/" + key))
    assert ref.n_pairs >= 40
    # The run's skipped-file list has one writer: the feature build, listing + decode skips.
    assert not store.exists("outputs/manifests/l/skipped.json")
    features = features_of(store, cfg, ref)
    assert features.skipped_key == "outputs/manifests/l/skipped.json"
    written = json.loads(store.read_bytes("outputs/manifests/l/skipped.json"))
    assert written["run"] == "l" and written["n_skipped"] == len(bad)
    assert {s["key"] for s in written["skipped"]} == {"dataset/" + k for k in bad}


def test_empty_dataset_fails_with_a_clear_message(setup: tuple[PipelineConfig, Storage]) -> None:
    cfg, store = setup
    with pytest.raises(DataError, match=r"dataset/: no usable pairs \(0 audio and 0 image") as err:
        manifest_of(store, cfg, "e")
    assert "see outputs/manifests/e/skipped.json" in str(err.value)
    written = json.loads(store.read_bytes("outputs/manifests/e/skipped.json"))
    assert written == {"run": "e", "n_skipped": 0, "skipped": []}


def test_a_split_without_one_class_is_fatal(tmp_path: Path, bench: dict[str, bytes]) -> None:
    cfg = tiny_config("local", tmp_path)
    store = open_storage(cfg.storage)
    load_into(store, bench)
    rows = csv_rows(bench)
    for r in rows:
        r["split"] = "test" if r["label"] == "1" else "train"
    write_csv(store, rows, ["audio_key", "image_key", "label", "split"])
    with pytest.raises(DataError, match="the train split has no fake pairs"):
        manifest_of(store, cfg, "c")
