"""Evaluate a run's models on the test split and publish everything to the bucket.

    evaluate_run(cfg, store, layout, run, features, trained, manifest) -> EvaluationRef
        writes  outputs/reports/<run>/refs.json      what the run evaluated (config, refs)
                outputs/reports/<run>/metrics.json   deterministic: same models + shards = same file
                outputs/reports/<run>/predictions.csv  every test pair's calibrated score and
                                                     decision per fusion (`predictions_csv`)
                outputs/plots/<run>/<name>.png       the 19 plots (plots.plot_names)
    write_report(cfg, store, layout, evaluation, features, trained, manifest, decisions,
                 history) -> key
        writes  outputs/reports/<run>/report.html    the self-contained report, rendered once from
                                                     metrics.json, the plots, the champion
                                                     decisions and the run history (when given)
    score_model(store, storage_cfg, model_key, features, device) -> Predictions
        one model file scored on the test split (the evaluation, and champion re-scoring)
    operating_point(store, model_key, metadata, ev) -> OperatingPoint
        the temperature and threshold the model file carries (fitted on validation by training);
        a file without one is scored at temperature 1 and `evaluation.threshold` (rule "fixed")

Each fusion's test scores are the calibrated ones, sigmoid(logit / temperature); metrics.json
holds the metrics at the fixed `evaluation.threshold` ("metrics", "confusion", "families") and at
the fitted point ("operating_point", "metrics_at_operating_point"). Temperature scaling is
monotonic, so the ranking metrics (ROC-AUC, AP, EER) do not depend on it. With two fusions or
more whose model files keep their validation reals' scores, metrics.json also holds "ensemble"
(`ensemble_entry`): the fusions' combined verdict (`calibration.ensemble_scores`), its ranking
metrics, its threshold and the metrics there, per family; predictions.csv its score and decision.

`refs.json` is written first, so `python -m flows.evaluate --run RUN` can redo the evaluation from
the bucket alone: it names the feature shards of the test split, the model files and the run's
settings. Training history plots read the run's epoch and step logs, and the embedding projection
reads the run's emotion vectors, so every plot can be redrawn from the bucket.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from config.load import validate_config
from config.schema import EvaluationConfig, MemoryConfig, PipelineConfig, StorageConfig
from tasks import progress
from tasks.data.shards import DeepfakeDataset
from tasks.errors import DataError, ObjectNotFound
from tasks.evaluate import inference, plots
from tasks.evaluate import metrics as evaluation
from tasks.evaluate.calibration import (
    ENSEMBLE,
    OperatingPoint,
    calibrated_scores,
    ensemble_scores,
    ensemble_threshold,
    fixed_point,
    has_ensemble,
    operating_point_of,
)
from tasks.evaluate.report import render_report
from tasks.io import records
from tasks.io.layout import FAKE, LABEL_NAMES, REAL, Layout
from tasks.io.storage import Storage
from tasks.refs import EvaluationRef, FeatureRef, ManifestRef, TrainedRef

if TYPE_CHECKING:
    from tasks.runs.champions import ChampionDecision
    from tasks.runs.trend import RunHistory

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # of metrics.json and refs.json
VECTOR_FIELDS = ("audio_emb", "image_emb", "label", "epoch")  # emotion_vectors-<fusion>.npz


# --- what a run evaluated (refs.json) ------------------------------------------------------------


class RunRefs(BaseModel):
    """What a re-evaluation needs, from `refs.json`: the run's settings (with today's storage and
    evaluation sections) and its references."""

    model_config = ConfigDict(frozen=True)

    run: str
    config: PipelineConfig
    features: FeatureRef
    trained: list[TrainedRef]
    manifest: ManifestRef | None


def save_refs(
    store: Storage,
    layout: Layout,
    run: str,
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    manifest: ManifestRef | None,
) -> str:
    doc = {
        "format_version": FORMAT_VERSION,
        "run": run,
        "config": cfg.model_dump(mode="json"),
        "features": features.model_dump(mode="json"),
        "trained": [t.model_dump(mode="json") for t in trained],
        "manifest": manifest.model_dump(mode="json") if manifest is not None else None,
    }
    key = layout.refs(run)
    records.write_json(store, key, doc)
    return key


def load_refs(store: Storage, layout: Layout, run: str, current: PipelineConfig) -> RunRefs:
    """Read `refs.json` of `run`. The run's settings are kept (they describe how it was trained)
    except `storage` and `evaluation`, which come from `current`: where the bucket is today and
    how to evaluate. A missing or foreign file is a clear error."""
    key = layout.refs(run)
    try:
        doc = records.read_json(store, key)
    except ObjectNotFound as exc:
        raise ObjectNotFound(
            f"{store.uri(key)}: no such object; run {run!r} was never evaluated by "
            "train-all-fusions (its evaluation writes this file first), so it cannot be "
            "re-evaluated"
        ) from exc
    try:
        if not isinstance(doc, dict) or doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"expected a JSON object with format_version {FORMAT_VERSION}")
        settings = dict(doc["config"])
        manifest = doc.get("manifest")
        features = FeatureRef.model_validate(doc["features"])
        trained = [TrainedRef.model_validate(t) for t in doc["trained"]]
        manifest_ref = ManifestRef.model_validate(manifest) if manifest is not None else None
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{store.uri(key)}: not a readable refs file ({exc})") from exc
    settings["storage"] = current.storage.model_dump(mode="json")
    settings["evaluation"] = current.evaluation.model_dump(mode="json")
    config = validate_config(settings, source=f"{store.uri(key)} (the run's settings)")
    return RunRefs(
        run=run, config=config, features=features, trained=trained, manifest=manifest_ref
    )


def runs_with_models(store: Storage, layout: Layout) -> list[str]:
    """Run ids that have at least one final model file (outputs/models/<fusion>/<run>/model.pt)."""
    prefix = layout.models_root()
    runs = set()
    for info in store.list(prefix):
        parts = info.key[len(prefix) :].split("/")
        if len(parts) == 3 and parts[2] == "model.pt":
            runs.add(parts[1])
    return sorted(runs)


def latest_run(store: Storage, layout: Layout) -> str:
    """The newest run (largest id: run ids are UTC timestamps) with models and a refs.json."""
    runs = runs_with_models(store, layout)
    for run in reversed(runs):
        if store.exists(layout.refs(run)):
            return run
    where = store.uri(layout.models_root())
    if runs:
        raise DataError(
            f"{where}: runs {', '.join(runs)} have models but none was evaluated "
            "(no refs.json); run train-all-fusions"
        )
    raise DataError(f"{where}: no trained models in the bucket; run train-all-fusions first")


# --- inference ---------------------------------------------------------------------------------


def score_model(
    store: Storage,
    storage_cfg: StorageConfig,
    model_key: str,
    features: FeatureRef,
    device: torch.device,
) -> inference.Predictions:
    """Load the model at `model_key` (weights only, never pickled code); score the test split."""
    return score_model_file(store, storage_cfg, model_key, features, device)[0]


def score_model_file(
    store: Storage,
    storage_cfg: StorageConfig,
    model_key: str,
    features: FeatureRef,
    device: torch.device,
) -> tuple[inference.Predictions, dict[str, Any]]:
    """`score_model`, with the model file's metadata (its operating point, when it has one)."""
    if not features.shards.get("test"):
        raise DataError(f"{features.prefix}: the test split has no feature shards to evaluate on")
    model, meta = inference.load_fusion_model(store, model_key)
    expected = sum(features.counts.get("test", {}).values())
    dataset = DeepfakeDataset(
        storage_cfg, features.shards.get("test", []), shuffle=False, n_samples=expected
    )
    bar = progress.track(dataset, total=expected, description=f"test {meta.get('fusion', '')}")
    predictions = inference.predict(model, bar, device)
    if len(predictions.score) != expected:
        log.warning(
            "%s: scored %d test pairs, the feature set lists %d",
            store.uri(model_key),
            len(predictions.score),
            expected,
        )
    return predictions, meta


def operating_point(
    store: Storage, model_key: str, metadata: Mapping[str, Any], ev: EvaluationConfig
) -> OperatingPoint:
    """The model file's fitted operating point, or `ev.threshold` at temperature 1 (rule
    "fixed") for a file from before operating points."""
    try:
        point = operating_point_of(dict(metadata), ev.threshold)
    except ValueError as exc:
        raise DataError(f"{store.uri(model_key)}: unreadable operating point ({exc})") from exc
    log.info(
        "%s: operating point %s, threshold %.4f, temperature %.4f",
        store.uri(model_key),
        point.rule,
        point.threshold,
        point.temperature,
    )
    return point


# --- metrics -----------------------------------------------------------------------------------


def _check_classes(fusion: str, label: np.ndarray, run: str) -> None:
    for value, name in ((REAL, "real"), (FAKE, "fake")):
        if not np.any(label == value):
            raise DataError(
                f"run {run}, {fusion}: the test split has no {name} pairs; "
                "metrics need both classes (more data or another split)"
            )


def points_or_fixed(
    ev: EvaluationConfig,
    fusions: Sequence[str],
    points: Mapping[str, OperatingPoint] | None,
) -> dict[str, OperatingPoint]:
    """Each fusion's operating point; a fusion without one gets the fixed `ev.threshold`."""
    given = points or {}
    return {f: given.get(f) or fixed_point(ev.threshold) for f in fusions}


def calibrated_test(
    predictions: Mapping[str, inference.Predictions], points: Mapping[str, OperatingPoint]
) -> dict[str, np.ndarray]:
    """Each fusion's calibrated test scores: sigmoid(logit / temperature), float64."""
    return {f: calibrated_scores(predictions[f].logit, points[f].temperature) for f in points}


def aligned_scores(
    predictions: Mapping[str, inference.Predictions], points: Mapping[str, OperatingPoint]
) -> dict[str, np.ndarray]:
    """Each fusion's calibrated test scores in the first fusion's order (the test shards'),
    matched by pair id; a pair one fusion did not score is a `DataError`."""
    fusions = list(points)
    scores = calibrated_test(predictions, points)
    order = [str(p) for p in predictions[fusions[0]].pair_id]
    out = {}
    for f in fusions:
        index = {str(p): i for i, p in enumerate(predictions[f].pair_id)}
        missing = [p for p in order if p not in index]
        if missing:
            raise DataError(f"{f}: scored no test pair {missing[0]} (the other fusions did)")
        out[f] = scores[f][[index[p] for p in order]]
    return out


def predictions_csv(
    predictions: Mapping[str, inference.Predictions], points: Mapping[str, OperatingPoint]
) -> bytes:
    """predictions.csv: one row per test pair (pair_id, label, family), then per fusion its
    calibrated `score_<fusion>` and `decision_<fusion>` (fake when score >= the threshold), and
    with an ensemble (`has_ensemble`) `score_ensemble` and `decision_ensemble`: the columns
    `detect` writes for new media. Rows in the first fusion's order (the test shards')."""
    fusions = list(points)
    scores = aligned_scores(predictions, points)
    thresholds = {f: points[f].threshold for f in fusions}
    if has_ensemble(points):
        scores[ENSEMBLE] = ensemble_scores(scores, points)
        thresholds[ENSEMBLE] = ensemble_threshold(points)
    first = predictions[fusions[0]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["pair_id", "label", "family"]
        + [c for f in thresholds for c in (f"score_{f}", f"decision_{f}")]
    )
    for i, pid in enumerate(map(str, first.pair_id)):
        row: list[Any] = [pid, LABEL_NAMES[int(first.label[i])], str(first.family[i])]
        for f, threshold in thresholds.items():
            score = float(scores[f][i])
            row += [repr(score), LABEL_NAMES[FAKE if score >= threshold else REAL]]
        writer.writerow(row)
    return out.getvalue().encode()


def ensemble_entry(
    predictions: Mapping[str, inference.Predictions], points: Mapping[str, OperatingPoint]
) -> dict[str, Any]:
    """metrics.json's "ensemble": the fusions it combines, its threshold, its ranking metrics
    (ROC-AUC, AP, EER, TPR at 1% FPR), the metrics at its threshold and per family. No
    probability metrics: its score is a rank, not a probability."""
    scores = aligned_scores(predictions, points)
    combined = ensemble_scores(scores, points)
    threshold = ensemble_threshold(points)
    first = predictions[next(iter(points))]
    label = np.asarray(first.label).astype(np.int64)
    return {
        "fusions": list(points),
        "threshold": threshold,
        "n": int(len(label)),
        "n_real": int(np.sum(label == REAL)),
        "n_fake": int(np.sum(label == FAKE)),
        "metrics": evaluation.ranking_metrics(label, combined),
        "metrics_at_operating_point": evaluation.threshold_metrics(label, combined, threshold),
        "families": evaluation.family_metrics(
            label, combined, list(map(str, first.family)), threshold
        ),
    }


def metrics_document(
    run: str,
    ev: EvaluationConfig,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    predictions: Mapping[str, inference.Predictions],
    points: Mapping[str, OperatingPoint] | None = None,
) -> dict[str, Any]:
    """The content of metrics.json: only inputs and results, no clock, so reruns match exactly.
    `points`: each fusion's operating point (missing: the fixed `ev.threshold`, temperature 1)."""
    ops = points_or_fixed(ev, [t.fusion for t in trained], points)
    scores = calibrated_test(predictions, ops)
    fusions: dict[str, Any] = {}
    for t in trained:
        p = predictions[t.fusion]
        label = np.asarray(p.label).astype(np.int64)
        _check_classes(t.fusion, label, run)
        op = ops[t.fusion]
        fusions[t.fusion] = {
            "model_key": t.model_key,
            "epochs": t.epochs,
            "best_epoch": t.best_epoch,
            **evaluation.evaluate_scores(
                label, scores[t.fusion], list(map(str, p.family)), ev.threshold, ev.calibration_bins
            ),
            "operating_point": op.as_dict(),
            "metrics_at_operating_point": evaluation.threshold_metrics(
                label, scores[t.fusion], op.threshold
            ),
        }
    doc = {
        "format_version": FORMAT_VERSION,
        "run": run,
        "split": "test",
        "threshold": ev.threshold,
        "calibration_bins": ev.calibration_bins,
        "device": ev.device,
        "feature_hash": features.feature_hash,
        "test_shards": list(features.shards.get("test", [])),
        "fusions": fusions,
    }
    if has_ensemble(ops):
        doc[ENSEMBLE] = ensemble_entry(predictions, ops)
    return doc


def differences(old: Mapping[str, Any], new: Mapping[str, Any], path: str = "") -> list[str]:
    """Where two metrics documents differ, as "a.b.c: old -> new" lines (empty = identical)."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        where = f"{path}{key}"
        if key not in old or key not in new:
            out.append(f"{where}: {'missing before' if key not in old else 'missing now'}")
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            out += differences(old[key], new[key], where + ".")
        elif old[key] != new[key]:
            out.append(f"{where}: {old[key]!r} -> {new[key]!r}")
    return out


def compare_with_stored(store: Storage, key: str, doc: Mapping[str, Any]) -> bool | None:
    """Whether `doc` equals the metrics.json already at `key` (None: there is none); differences
    are logged. An unreadable stored file counts as different."""
    if not store.exists(key):
        return None
    try:
        stored = records.read_json(store, key)
    except DataError as exc:
        stored = {"unreadable": str(exc)}
    changed = differences(stored, doc) if isinstance(stored, dict) else ["not a JSON object"]
    if changed:
        log.warning("%s: the new metrics differ: %s", store.uri(key), "; ".join(changed[:10]))
    else:
        log.info("%s: reproduced exactly", store.uri(key))
    return not changed


# --- inputs of the plots -------------------------------------------------------------------------


def read_vectors(store: Storage, key: str) -> dict[str, np.ndarray]:
    """A fusion's emotion vectors (.npz, loaded without pickle)."""
    try:
        with np.load(io.BytesIO(store.read_bytes(key)), allow_pickle=False) as npz:
            return {name: npz[name] for name in VECTOR_FIELDS}
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{store.uri(key)}: not a readable emotion-vector file ({exc})") from exc


def projection(vectors: Mapping[str, np.ndarray]) -> plots.Projection:
    """Audio and image embeddings projected together onto their first two principal axes."""
    audio, image = vectors["audio_emb"], vectors["image_emb"]
    label = np.asarray(vectors["label"]).astype(np.int64)
    xy = evaluation.project_2d(np.concatenate([audio, image]))  # (2N, 2)
    return plots.Projection(
        xy=xy,
        label=np.concatenate([label, label]),
        modality=np.array(["audio"] * len(audio) + ["image"] * len(image)),
        source=f"validation split, best epoch {int(vectors['epoch'])}",
    )


def plot_inputs(
    ev: EvaluationConfig,
    memory: MemoryConfig,
    store: Storage,
    layout: Layout,
    run: str,
    doc: Mapping[str, Any],
    predictions: Mapping[str, inference.Predictions],
    scores: Mapping[str, np.ndarray],
) -> plots.PlotInputs:
    """Gather what the plots draw: test-split results (`scores`: the calibrated test scores),
    and the run's logs and vectors."""
    fusions = list(doc["fusions"])
    labels = {f: np.asarray(predictions[f].label).astype(np.int64) for f in fusions}
    return plots.PlotInputs(
        history={f: records.read_jsonl(store, layout.epoch_log(f, run)) for f in fusions},
        steps={f: records.read_jsonl(store, layout.step_log(f, run)) for f in fusions},
        curves={f: evaluation.curves(labels[f], scores[f], ev.calibration_bins) for f in fusions},
        metrics={f: doc["fusions"][f]["metrics"] for f in fusions},
        confusion={f: doc["fusions"][f]["confusion"] for f in fusions},
        families={f: doc["fusions"][f]["families"] for f in fusions},
        scores={f: (labels[f], scores[f]) for f in fusions},
        similarity={
            f: (
                labels[f],
                evaluation.cosine_similarity(predictions[f].audio_emb, predictions[f].image_emb),
            )
            for f in fusions
        },
        projections={
            f: projection(read_vectors(store, layout.emotion_vectors(f, run))) for f in fusions
        },
        threshold=ev.threshold,
        memory_cap=memory.cap,
        shrink_threshold=memory.shrink_threshold,
    )


# --- the whole evaluation ------------------------------------------------------------------------


def evaluate_run(
    cfg: PipelineConfig,
    store: Storage,
    layout: Layout,
    run: str,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    manifest: ManifestRef | None,
) -> EvaluationRef:
    """Score every trained model on the test split, then write refs.json, metrics and plots."""
    if not trained:
        raise DataError(f"run {run}: no trained models to evaluate")
    save_refs(store, layout, run, cfg, features, trained, manifest)
    device = inference.pick_device(cfg.evaluation.device)
    predictions: dict[str, inference.Predictions] = {}
    points: dict[str, OperatingPoint] = {}
    for t in trained:
        preds, meta = score_model_file(store, cfg.storage, t.model_key, features, device)
        predictions[t.fusion] = preds
        points[t.fusion] = operating_point(store, t.model_key, meta, cfg.evaluation)
    return write_evaluation(cfg, store, layout, run, features, trained, predictions, points)


def write_evaluation(
    cfg: PipelineConfig,
    store: Storage,
    layout: Layout,
    run: str,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    predictions: Mapping[str, inference.Predictions],
    points: Mapping[str, OperatingPoint] | None = None,
) -> EvaluationRef:
    """metrics.json and the plots from test-split predictions (one entry per trained fusion) and
    the models' operating points (missing: the fixed `evaluation.threshold`). The returned ref
    names the report's key too: `write_report` renders it there."""
    ops = points_or_fixed(cfg.evaluation, [t.fusion for t in trained], points)
    doc = metrics_document(run, cfg.evaluation, features, trained, predictions, ops)
    metrics_key = layout.metrics(run)
    reproduced = compare_with_stored(store, metrics_key, doc)
    records.write_json(store, metrics_key, doc)

    predictions_key = layout.predictions(run)
    store.write_bytes(predictions_key, predictions_csv(predictions, ops), "text/csv")
    scores = calibrated_test(predictions, ops)
    inputs = plot_inputs(cfg.evaluation, cfg.memory, store, layout, run, doc, predictions, scores)
    plot_keys = []
    for name, fig in plots.draw_all(inputs).items():
        key = layout.plot(run, name)
        store.write_bytes(key, plots.render_png(fig), "image/png")
        plot_keys.append(key)
    log.info("run %s: metrics and %d plots written", run, len(plot_keys))
    return EvaluationRef(
        run=run,
        metrics_key=metrics_key,
        report_key=layout.report(run),
        plot_keys=plot_keys,
        metrics={f: dict(v["metrics"]) for f, v in doc["fusions"].items()},
        reproduced=reproduced,
    )


def write_report(
    cfg: PipelineConfig,
    store: Storage,
    layout: Layout,
    evaluation: EvaluationRef,
    features: FeatureRef,
    trained: Sequence[TrainedRef],
    manifest: ManifestRef | None,
    decisions: Sequence[ChampionDecision] | None,
    history: RunHistory | None = None,
) -> str:
    """Render report.html once, from the run's metrics.json, its plots, its champion decisions
    (None: the run has none) and its run history (tasks/runs/trend.py, its trend plot already
    written; None: no such section); returns the report's key."""
    run = evaluation.run
    doc = records.read_json(store, evaluation.metrics_key)
    pngs = {
        name: store.read_bytes(layout.plot(run, name))
        for name in plots.plot_names(list(doc["fusions"]))
    }
    html = render_report(
        run=run,
        doc=doc,
        plots=pngs,
        settings=cfg.model_dump(mode="json"),
        features=features,
        trained=trained,
        manifest=manifest,
        model_links={t.fusion: (store.uri(t.model_key), store.link(t.model_key)) for t in trained},
        metrics_link=(store.uri(evaluation.metrics_key), store.link(evaluation.metrics_key)),
        generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        champions=decisions,
        history=history,
        history_png=store.read_bytes(history.plot_key) if history and history.plot_key else None,
    )
    key = layout.report(run)
    store.write_bytes(key, html.encode("utf-8"), "text/html; charset=utf-8")
    log.info("run %s: report %s", run, store.uri(key))
    return key
