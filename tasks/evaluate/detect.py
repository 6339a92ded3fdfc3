"""Scoring new media: each fusion's champion (or a named run's model) on pairs of audio + image.

    load_detectors(store, layout, cfg, run)   the model of each fusion in `training.fusions`:
                                              its champion (champion.json), or with `run` that
                                              run's model.pt; none at all is a clear error
    read_pairs_csv(text, where)               (audio_key, image_key) rows of a --pairs file
    pairs_under_prefix(store, cfg, prefix)    the pairs under a bucket prefix, paired as training
                                              pairs dataset/ (pairs.csv, or audio/{real,fake}/ with
                                              images/{real,fake}/ at random within a label, seeded);
                                              new media: a pairs.csv without labels, or audio/ and
                                              images/ files by name
    score_pairs(store, detectors, pairs, ...) -> Detection   scores, decisions and skipped files
    write_detection(store, key, detection)    the CSV: audio_key, image_key, then per fusion
                                              score_<fusion>, decision_<fusion> (and the
                                              ensemble's, below); skipped.json beside it

Every input is preprocessed as the model's own training and evaluation preprocessed it: the model
file stores its run's resolved config, so its `data` settings drive `preprocess_audio` and
`preprocess_image` (through `decode_pair`, the feature build's own decoder and skip rule), and the
decoded arrays go through a shard's round trip (float16 log-mel, uint8 image) and
`DeepfakeDataset`'s evaluation path (centre crop in crop mode, no augmentation) into
`inference.predict`. The score is the calibrated one, sigmoid(logit / temperature), and the
decision "fake" when it is at or above the threshold fitted on validation, both from the model
file's operating point (`publish.operating_point`), exactly as the evaluation's predictions.csv.
With two fusions or more whose model files keep their validation reals' scores, the pair also
gets `score_ensemble` and `decision_ensemble`: the fusions' combined verdict
(`calibration.ensemble_scores`), as in predictions.csv.

A pair whose file is missing or cannot be decoded is skipped and listed (key, reason, stage), as
the feature build does; only when no pair at all can be scored is it an error.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field
from torch import nn

from config.schema import ALL_FUSIONS, DataConfig, PipelineConfig
from tasks.data import manifest as manifests
from tasks.data.features import preprocessing_settings
from tasks.data.shards import InMemoryShard, decode_shard, encode_shard
from tasks.data.workers import Fetched, decode_pair
from tasks.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ObjectNotFound,
    StorageError,
    is_transient_error,
)
from tasks.evaluate import inference, publish
from tasks.evaluate.calibration import (
    ENSEMBLE,
    OperatingPoint,
    calibrated_scores,
    ensemble_scores,
    ensemble_threshold,
    has_ensemble,
)
from tasks.io import records
from tasks.io.layout import FAKE, LABEL_NAMES, REAL, Layout, new_run_id
from tasks.io.storage import LocalStorage, Storage
from tasks.refs import Ref
from tasks.runs.champions import read_champion

log = logging.getLogger(__name__)

PAIR_COLUMNS = ("audio_key", "image_key")
CHUNK = 64  # pairs fetched, decoded and scored at a time: memory stays bounded by a chunk
BATCH = 32  # inference batch, as the evaluation's
PREVIEW_ROWS = 500  # rows a DetectionRef carries for the table artifact


@dataclass
class Detector:
    """One fusion's model, how its inputs are preprocessed, and where it decides."""

    fusion: str
    run: str
    model_key: str
    model: nn.Module
    data: DataConfig  # the model's own run's preprocessing settings
    point: OperatingPoint


@dataclass
class Detection:
    """What scoring a list of pairs gives: one row per scored pair, the files left out."""

    fusions: list[str]
    ensemble: bool = False  # the rows hold score_ensemble and decision_ensemble too
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


class DetectionRef(Ref):
    """Where a `detect` run wrote its scores, and what it scored with."""

    id: str
    scores_uri: str  # the CSV
    skipped_uri: str  # skipped.json beside it
    models: dict[str, str]  # fusion -> model key
    thresholds: dict[str, float]  # fusion -> decision threshold (calibrated score); "ensemble"
    # -> the ensemble's (a mean rank) when it was formed
    n_pairs: int
    n_scored: int
    skipped: list[dict[str, str]] = Field(default_factory=list)
    # The CSV's first PREVIEW_ROWS rows, for the table artifact (the CSV holds them all).
    preview: list[dict[str, Any]] = Field(default_factory=list)


# --- models ----------------------------------------------------------------------------------


def load_detectors(
    store: Storage, layout: Layout, cfg: PipelineConfig, run: str | None = None
) -> list[Detector]:
    """The model of each fusion in `cfg.training.fusions`: its champion, or `run`'s model.pt.
    Fusions without one are left out (logged); none at all is a `CheckpointError` naming where
    the models were looked for."""
    fusions = [f for f in ALL_FUSIONS if f in cfg.training.fusions]
    found: list[tuple[str, str, str]] = []  # (fusion, run, model key)
    looked: list[str] = []
    for fusion in fusions:
        if run is None:
            champion = read_champion(store, layout, fusion)
            looked.append(store.uri(layout.champion(fusion)))
            if champion is None:
                log.warning("%s: no champion yet (%s)", fusion, looked[-1])
                continue
            found.append((fusion, champion.run, champion.model_key))
        else:
            key = layout.model(fusion, run)
            looked.append(store.uri(key))
            if not store.exists(key):
                log.warning("%s: run %s has no model (%s)", fusion, run, looked[-1])
                continue
            found.append((fusion, run, key))
    if not found:
        what = f"run {run!r} has no model" if run else "no fusion has a champion"
        hint = (
            f"runs with models: {', '.join(publish.runs_with_models(store, layout)) or 'none'}"
            if run
            else "train one first (train-all-fusions), or pass --run RUN"
        )
        raise CheckpointError(f"{what}: looked for {', '.join(looked)}; {hint}")
    detectors = []
    for name, model_run, key in found:
        try:
            model, meta = inference.load_fusion_model(store, key)
        except ObjectNotFound as exc:
            raise CheckpointError(
                f"{store.uri(key)}: the {name} model ({'champion' if run is None else 'run'} "
                f"{model_run}) does not exist; fix or delete {store.uri(layout.champion(name))}"
            ) from exc
        data = PipelineConfig.model_validate(meta["config"]).data
        point = publish.operating_point(store, key, meta, cfg.evaluation)
        detectors.append(Detector(name, model_run, key, model, data, point))  # point: logged
    return detectors


# --- pairs -----------------------------------------------------------------------------------


def read_pairs_csv(text: str, where: str) -> list[tuple[str, str]]:
    """The (audio_key, image_key) rows of a --pairs CSV (other columns are ignored)."""
    reader = csv.DictReader(io.StringIO(text))
    columns = [c.strip() for c in reader.fieldnames or []]
    missing = [c for c in PAIR_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {', '.join(missing)}; needs audio_key,image_key "
            f"(keys relative to the storage root, or local paths), found {columns}"
        )
    pairs = []
    for raw in reader:
        raw.pop(None, None)  # cells beyond the header: ignored like the other extra columns
        rec = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
        pairs.append((rec["audio_key"], rec["image_key"]))
    if not pairs:
        raise DataError(f"{where}: no pairs (a header and no rows)")
    return pairs


def pairs_under_prefix(
    store: Storage, cfg: PipelineConfig, prefix: str
) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """The pairs under `prefix`, paired as training pairs dataset/: its pairs.csv, or
    audio/{real,fake}/ with images/{real,fake}/ at random within a label and split (run.seed).
    New media, unlabelled: a pairs.csv without a label column (keys relative to the prefix or
    the root), else audio/<name>.* with images/<name>.* (same stem). Returns the pairs and the
    files left out."""
    prefix = prefix.strip("/") + "/"
    layout = Layout(dataset=prefix, outputs=cfg.storage.outputs_prefix)
    listing = manifests.list_dataset(store, layout)
    rows: list[manifests.PairRow] = []
    if listing.pairs_csv is not None:
        where = store.uri(listing.pairs_csv.key)
        try:
            text = store.read_bytes(listing.pairs_csv.key).decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: not UTF-8 text ({exc})") from exc
        if "label" not in next(csv.reader(io.StringIO(text)), []):  # new media: no labels
            pairs = [(_under(a, prefix), _under(i, prefix)) for a, i in read_pairs_csv(text, where)]
            return pairs, []
        rows, skipped = manifests.pairs_from_csv(
            text, listing, layout, cfg.data.val_fraction, cfg.data.test_fraction, where
        )
    elif listing.audio or listing.images:
        rows, skipped = manifests.pairs_at_random(
            listing, cfg.run.seed, cfg.data.val_fraction, cfg.data.test_fraction
        )
        rows.sort(key=lambda r: (manifests.SPLITS.index(r.split), r.pair_id))
    else:
        return _pairs_by_name(store, prefix)
    if not rows:
        raise DataError(
            f"{store.uri(prefix)}: no pairs under this prefix ({len(listing.audio)} audio and "
            f"{len(listing.images)} image files, {len(listing.skipped + skipped)} left out: "
            f"{'; '.join(s['key'] + ': ' + s['reason'] for s in (listing.skipped + skipped)[:3])})"
        )
    return [(r.audio_key, r.image_key) for r in rows], listing.skipped + skipped


def _under(key: str, prefix: str) -> str:
    """A key of a pairs.csv under `prefix`: relative to it, or to the storage root."""
    key = key.lstrip("/")
    return key if key.startswith(prefix) else prefix + key


def _pairs_by_name(
    store: Storage, prefix: str
) -> tuple[list[tuple[str, str]], list[dict[str, str]]]:
    """Unlabelled media: `<prefix>audio/<name>.<ext>` with `<prefix>images/<name>.<ext>`."""
    found: dict[str, dict[str, str]] = {"audio": {}, "images": {}}
    skipped = []
    for obj in store.list(prefix):
        rel = obj.key[len(prefix) :]
        folder, _, name = rel.partition("/")
        stem, dot, ext = name.rpartition(".")
        allowed = manifests.MODALITY_FOLDERS.get(folder)
        if allowed is None or not dot or "." + ext.lower() not in allowed:
            if not rel.endswith("/"):
                reason = "not an audio/*.{wav,flac,ogg,mp3} or images/*.{jpg,jpeg,png} file"
                skipped.append({"key": obj.key, "reason": reason, "stage": "pairing"})
            continue
        found[folder][stem] = obj.key
    pairs = []
    for stem in sorted(found["audio"].keys() | found["images"].keys()):
        audio, image = found["audio"].get(stem), found["images"].get(stem)
        if audio and image:
            pairs.append((audio, image))
        else:
            other = "image" if audio else "audio"
            reason = f"no {other} file named {stem}.* to pair it with"
            skipped.append({"key": audio or image or stem, "reason": reason, "stage": "pairing"})
    if not pairs:
        raise DataError(
            f"{store.uri(prefix)}: no pairs under this prefix ({len(skipped)} files left out); "
            "expected audio/{real,fake}/ and images/{real,fake}/ (paired as training pairs), a "
            "pairs.csv, or audio/<name>.wav with images/<name>.jpg"
        )
    return pairs, skipped


# --- scoring ---------------------------------------------------------------------------------


def fetch(store: Storage, name: str, dataset_prefix: str = "") -> tuple[Fetched, str]:
    """(bytes, or its skipped-file entry; the URI or path that names it): a local file when
    `name` is one, else the object at key `name` in `store`, else (as pairs.csv keys may be) at
    `dataset_prefix` + `name`."""
    path = Path(name).expanduser()
    if path.is_file():
        try:
            return path.read_bytes(), str(path)
        except OSError as exc:
            return _entry(name, f"cannot read the local file ({exc.strerror})", "fetch"), str(path)
    key = name.lstrip("/")
    if not key:
        return _entry(name, "empty key", "fetch"), name
    keys = [key]
    if dataset_prefix and not key.startswith(dataset_prefix):
        keys.append(dataset_prefix + key)
    for candidate in keys:
        where = store.uri(candidate)
        try:
            return store.read_bytes(candidate), where
        except ObjectNotFound:
            continue
        except StorageError as exc:
            if is_transient_error(exc):
                raise  # the store is unwell, not the file: the task's retries are for this
            reason = str(exc)
            reason = reason[len(where) + 2 :] if reason.startswith(where + ": ") else reason
            return _entry(name, reason, "fetch"), where
    tried = " nor ".join(store.uri(k) for k in keys)
    return _entry(name, f"neither a local file nor an object ({tried})", "fetch"), store.uri(key)


def _entry(key: str, reason: str, stage: str) -> dict[str, str]:
    return {"key": key, "reason": reason, "stage": stage}


def _shard(arrays: Sequence[tuple[np.ndarray, np.ndarray]], data: DataConfig) -> dict[str, Any]:
    """A feature shard's arrays, through its own encoding (float16 log-mel, uint8 image)."""
    n = len(arrays)
    crop = data.image_size if data.image_mode == "crop" else 0  # as the feature build writes
    encoded = encode_shard(
        audio=np.stack([a for a, _ in arrays]),  # (N, 1, n_mels, spec_frames)
        image=np.stack([i for _, i in arrays]),  # (N, 3, S, S) or (N, 3, C, C) in crop mode
        label=np.zeros(n, dtype=np.int8),  # unknown; not used
        pair_id=[str(k) for k in range(n)],
        family=[""] * n,
        crop=crop,
    )
    return decode_shard(encoded, "<new media>")


def score_pairs(
    store: Storage,
    detectors: Sequence[Detector],
    pairs: Sequence[tuple[str, str]],
    device: torch.device,
    concurrency: int = 8,
    chunk: int = CHUNK,
    dataset_prefix: str = "",
) -> Detection:
    """Every pair scored by every detector, in the order given; pairs with a bad file skipped.
    A key found neither locally nor at the storage root is looked for under `dataset_prefix`."""
    points = {d.fusion: d.point for d in detectors}
    result = Detection(fusions=list(points), ensemble=has_ensemble(points))
    ensemble_at = ensemble_threshold(points) if result.ensemble else 0.0
    # Detectors that preprocess alike share one decode.
    groups: dict[str, list[Detector]] = {}
    for d in detectors:
        groups.setdefault(json.dumps(preprocessing_settings(d.data), sort_keys=True), []).append(d)
    reported: set[str] = set()
    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="fetch") as pool:
        for start in range(0, len(pairs), chunk):
            part = list(pairs[start : start + chunk])
            names = [n for pair in part for n in pair]
            fetched = dict(
                zip(names, pool.map(lambda n: fetch(store, n, dataset_prefix), names), strict=True)
            )
            scores: dict[str, dict[int, float]] = {}
            bad: set[int] = set()
            for members in groups.values():
                data = members[0].data
                kept, arrays = [], []
                for i, (audio_name, image_name) in enumerate(part):
                    (a, a_where), (b, b_where) = fetched[audio_name], fetched[image_name]
                    audio, image, problems = decode_pair(
                        a, b, (audio_name, image_name), (a_where, b_where), data
                    )
                    for p in problems:
                        if p["key"] not in reported:
                            reported.add(p["key"])
                            result.skipped.append(p)
                            log.warning("skipped %s: %s", p["key"], p["reason"])
                    if audio is None or image is None:
                        bad.add(i)
                        continue
                    kept.append(i)
                    arrays.append((audio, image))
                if not arrays:
                    continue
                samples = InMemoryShard(_shard(arrays, data))  # the samples the models saw
                for d in members:
                    preds = inference.predict(d.model, samples, device, BATCH)
                    calibrated = calibrated_scores(preds.logit, d.point.temperature)
                    scores[d.fusion] = dict(zip(kept, map(float, calibrated), strict=True))
            for i, (audio_name, image_name) in enumerate(part):
                if i in bad:
                    continue
                row: dict[str, Any] = {"audio_key": audio_name, "image_key": image_name}
                for d in detectors:
                    score = scores[d.fusion][i]
                    row[f"score_{d.fusion}"] = score
                    row[f"decision_{d.fusion}"] = LABEL_NAMES[
                        FAKE if score >= d.point.threshold else REAL
                    ]
                if result.ensemble:
                    one = {f: [row[f"score_{f}"]] for f in points}
                    score = float(ensemble_scores(one, points)[0])
                    row[f"score_{ENSEMBLE}"] = score
                    row[f"decision_{ENSEMBLE}"] = LABEL_NAMES[
                        FAKE if score >= ensemble_at else REAL
                    ]
                result.rows.append(row)
            done = min(start + chunk, len(pairs))
            log.info("%d of %d pairs done: %d scored", done, len(pairs), len(result.rows))
    return result


def columns(fusions: Sequence[str], ensemble: bool = False) -> list[str]:
    """The CSV's header: the two keys, then score_<fusion>, decision_<fusion> per fusion, and
    with `ensemble` the ensemble's two."""
    verdicts = [*fusions, *([ENSEMBLE] if ensemble else [])]
    return [*PAIR_COLUMNS, *(c for f in verdicts for c in (f"score_{f}", f"decision_{f}"))]


def csv_bytes(detection: Detection) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=columns(detection.fusions, detection.ensemble), lineterminator="\n"
    )
    writer.writeheader()
    for row in detection.rows:
        writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
    return out.getvalue().encode()


def new_detection_id() -> str:
    """A sortable, unique id: the UTC timestamp of a run id plus a random suffix."""
    return f"{new_run_id()}-{uuid.uuid4().hex[:6]}"


def write_detection(
    store: Storage, key: str, detection: Detection, detection_id: str, skipped_key: str
) -> tuple[str, str]:
    """Write the CSV at `key` and the skipped-file list at `skipped_key` (the shape of a run's
    skipped.json); returns both URIs."""
    uri = store.write_bytes(key, csv_bytes(detection), "text/csv")
    skipped_doc = {
        "run": detection_id,
        "n_skipped": len(detection.skipped),
        "skipped": list(detection.skipped),
    }
    return uri, records.write_json(store, skipped_key, skipped_doc)


# --- the whole step --------------------------------------------------------------------------


def check_inputs(
    audio: str | None, image: str | None, pairs: str | None, prefix: str | None
) -> None:
    """Exactly one of: `audio` with `image`, `pairs`, `prefix`; else a `ConfigError` saying so."""
    given = [
        name
        for name, value in (("--audio/--image", audio or image), ("--pairs", pairs),
                            ("--prefix", prefix))
        if value
    ]  # fmt: skip
    if len(given) != 1:
        raise ConfigError(
            "what to score: give exactly one of --audio A --image I, --pairs FILE, --prefix P "
            f"(given: {', '.join(given) or 'none'})"
        )
    if (audio or image) and not (audio and image):
        given_one, missing = ("--audio", "--image") if audio else ("--image", "--audio")
        raise ConfigError(f"{given_one} needs {missing}: a pair is one audio file and one image")


def detect(
    cfg: PipelineConfig,
    store: Storage,
    *,
    audio: str | None = None,
    image: str | None = None,
    pairs: str | None = None,
    prefix: str | None = None,
    run: str | None = None,
    out: str | None = None,
) -> DetectionRef:
    """Score one pair (`audio` + `image`), the pairs of a CSV (`pairs`: a local file or a bucket
    key) or those under a bucket `prefix` with the champions (or `run`'s models); write the CSV
    to `out` (a local path) or, without it, to `outputs/detections/<id>/` in the bucket."""
    check_inputs(audio, image, pairs, prefix)
    layout = Layout.from_config(cfg.storage)
    detectors = load_detectors(store, layout, cfg, run)

    skipped: list[dict[str, str]] = []
    todo: list[tuple[str, str]]
    if audio and image:
        todo = [(audio, image)]
    elif pairs:
        data, where = fetch(store, pairs)
        if isinstance(data, dict):
            raise DataError(f"{where}: the --pairs file: {data['reason']}")
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{where}: the --pairs file is not UTF-8 text ({exc})") from exc
        todo = read_pairs_csv(text, where)
    else:
        todo, skipped = pairs_under_prefix(store, cfg, str(prefix))

    device = inference.pick_device(cfg.evaluation.device)
    detection = score_pairs(
        store, detectors, todo, device, cfg.data.fetch_concurrency,
        dataset_prefix=cfg.storage.dataset_prefix,
    )  # fmt: skip
    detection.skipped[:0] = skipped

    detection_id = new_detection_id()
    if out:
        path = Path(out).expanduser().resolve()
        target: Storage = LocalStorage(str(path.parent))
        key, skipped_key = path.name, f"{path.stem}.skipped.json"
    else:
        target = store
        key, skipped_key = (
            layout.detection_scores(detection_id),
            layout.detection_skipped(detection_id),
        )
    uri, skipped_uri = write_detection(target, key, detection, detection_id, skipped_key)
    log.info(
        "detect %s: %d of %d pairs scored with %s -> %s (%d files skipped, listed in %s)",
        detection_id, len(detection.rows), len(todo), ", ".join(detection.fusions), uri,
        len(detection.skipped), skipped_uri,
    )  # fmt: skip
    if not detection.rows:
        which = "the pair has" if len(todo) == 1 else f"all {len(todo)} pairs have"
        raise DataError(
            f"no pair could be scored: {which} a file that is missing or cannot be decoded "
            f"(see {skipped_uri})"
        )
    return DetectionRef(
        id=detection_id,
        scores_uri=uri,
        skipped_uri=skipped_uri,
        models={d.fusion: d.model_key for d in detectors},
        thresholds={
            **{d.fusion: d.point.threshold for d in detectors},
            **(
                {ENSEMBLE: ensemble_threshold({d.fusion: d.point for d in detectors})}
                if detection.ensemble
                else {}
            ),
        },
        n_pairs=len(todo),
        n_scored=len(detection.rows),
        skipped=detection.skipped,
        preview=detection.rows[:PREVIEW_ROWS],
    )
