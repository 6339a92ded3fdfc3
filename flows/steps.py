"""Thin Prefect task wrappers: call the plain code, log to the run logger, return a reference.

Retries are for transient storage faults only (`is_transient`): a bad config, a corrupt file or
running out of memory fails at once.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from config.schema import PipelineConfig
from flows import artifacts
from tasks.data import features as preprocess
from tasks.data import manifest as manifests
from tasks.data import synthetic as make_dataset
from tasks.errors import is_transient_error
from tasks.evaluate import inference, publish
from tasks.evaluate import metrics as evaluation_metrics
from tasks.io import storage
from tasks.io.layout import Layout
from tasks.refs import EvaluationRef, FeatureRef, FoldersRef, ManifestRef, TrainedRef
from tasks.runs import champions as champion
from tasks.runs import ids as runs
from tasks.train import fit as training


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """`retry_condition_fn`: retry throttling and connection faults, nothing else."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            exc = state.result(raise_on_failure=False)
        except Exception as err:  # the result itself could not be read: judge that error
            exc = err
    return isinstance(exc, BaseException) and is_transient_error(exc)


IO_RETRIES: dict[str, Any] = dict(
    retries=4,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=is_transient,
)


# --- set-up ----------------------------------------------------------------------------------


@task(name="set-up-folders", **IO_RETRIES)
def set_up_folders(cfg: PipelineConfig) -> FoldersRef:
    """Create the outputs/ folders in the bucket (idempotent)."""
    store = storage.open_storage(cfg.storage)
    folders = storage.create_output_folders(store, cfg.storage.outputs_prefix)
    get_run_logger().info("output folders ready in %s: %s", store.root_uri, ", ".join(folders))
    return FoldersRef(root_uri=store.root_uri, folders=folders)


# --- data ------------------------------------------------------------------------------------


@task(name="build-manifest", **IO_RETRIES)
def build_manifest(cfg: PipelineConfig, run: str) -> ManifestRef:
    """List dataset/, pair audio with images, assign splits, store the manifest."""
    store = storage.open_storage(cfg.storage)
    ref = manifests.build_manifest(store, cfg, run)
    logger = get_run_logger()
    logger.info("manifest %s: %d pairs, data hash %s", ref.uri, ref.n_pairs, ref.data_hash[:12])
    for split, counts in ref.counts.items():
        logger.info("  %s: %d real, %d fake", split, counts["real"], counts["fake"])
    if ref.skipped:
        logger.warning("%d files or pairs.csv rows skipped at listing:", len(ref.skipped))
        for item in ref.skipped[:20]:
            logger.warning("  %s: %s", item["key"], item["reason"])
    return ref


@task(name="build-features", **IO_RETRIES)
def build_features(cfg: PipelineConfig, manifest: ManifestRef) -> FeatureRef:
    """Preprocess every pair into feature shards, or reuse the cached shards of the same content."""
    store = storage.open_storage(cfg.storage)
    ref = preprocess.build_features(store, cfg, manifest)
    logger = get_run_logger()
    n_usable = sum(sum(c.values()) for c in ref.counts.values())
    logger.info(
        "features %s: %d usable pairs, %d shards, cache %s, %d skipped (list: %s)",
        store.uri(ref.prefix),
        n_usable,
        sum(len(keys) for keys in ref.shards.values()),
        "hit" if ref.cache_hit else "miss",
        len(ref.skipped),
        store.uri(ref.skipped_key) if ref.skipped_key else "-",
    )
    for item in ref.skipped[:20]:
        logger.warning("  skipped %s: %s", item["key"], item["reason"])
    return ref


# --- evaluation ------------------------------------------------------------------------------


@task(name="load-run-refs", **IO_RETRIES)
def load_run_refs(cfg: PipelineConfig, run: str | None) -> publish.RunRefs:
    """Find the run to re-evaluate (default: the newest with models) and read its refs.json."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    chosen = run or publish.latest_run(store, layout)
    refs = publish.load_refs(store, layout, chosen, cfg)
    get_run_logger().info(
        "run %s: %d models, %d test shards",
        chosen,
        len(refs.trained),
        len(refs.features.shards.get("test", [])),
    )
    return refs


@task(name="evaluate-and-publish", **IO_RETRIES)
def evaluate_and_publish(
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: list[TrainedRef],
    run: str,
    manifest: ManifestRef | None,
) -> EvaluationRef:
    """Score every model on the test split; write metrics, 19 plots, report; create artifacts."""
    store = storage.open_storage(cfg.storage)
    ref = publish.evaluate_run(cfg, store, run, features, trained, manifest)
    keys = artifacts.publish_artifacts(store, ref, trained)
    logger = get_run_logger()
    for fusion, m in ref.metrics.items():
        logger.info(
            "%s: ROC-AUC %.4f, EER %.4f, accuracy %.4f, F1 %.4f",
            fusion,
            m["roc_auc"],
            m["eer"],
            m["accuracy"],
            m["f1"],
        )
    logger.info("report %s; artifacts %s", store.uri(ref.report_key), ", ".join(keys))
    return ref


# --- training --------------------------------------------------------------------------------


@task(name="train-fusion-model", task_run_name="train-{fusion}", **IO_RETRIES)
def train_fusion_task(
    cfg: PipelineConfig, features: FeatureRef, fusion: str, run: str
) -> TrainedRef:
    """Train one fusion; a retry (or a rerun of the same run id) resumes from its last checkpoint.

    A storage fault mid-epoch is retried here; a killed process cannot retry itself, so its next
    run with the same run id picks up the newest checkpoint in the bucket instead.
    """
    ref = training.fit(cfg, features, fusion, run)
    get_run_logger().info(
        "%s: %d epochs%s, best epoch %d (val loss %.4f) -> %s",
        fusion,
        ref.epochs,
        f" (resumed after epoch {ref.resumed_from})" if ref.resumed_from else "",
        ref.best_epoch,
        ref.best_val_loss,
        ref.model_key,
    )
    return ref


# --- run bookkeeping and nightly decisions ---------------------------------------------------


@task(name="start-run", **IO_RETRIES)
def start_run(cfg: PipelineConfig) -> str:
    """Pick the run id: run.name, else an interrupted run with the same settings, else new."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    fingerprint = champion.config_fingerprint(cfg.model_dump(mode="json"))
    run, resumed = runs.begin_run(store, layout, fingerprint, cfg.run.name)
    logger = get_run_logger()
    if resumed:
        logger.info("run %s was interrupted; resuming it from its checkpoints", run)
    else:
        logger.info("run %s", run)
    return run


@task(name="fill-demo-dataset", **IO_RETRIES)
def fill_demo_dataset(cfg: PipelineConfig) -> int:
    """Write the synthetic benchmark into an empty dataset/ (generator.fill_empty_dataset)."""
    written = make_dataset.ensure_demo_dataset(cfg)
    if written:
        get_run_logger().info(
            "dataset/ was empty: wrote the synthetic benchmark (%d pairs)", written
        )
    return written


@task(name="collect-losses", **IO_RETRIES)
def collect_losses(cfg: PipelineConfig, trained: list[TrainedRef], run: str) -> str:
    """Rebuild the run's losses.csv from the fusions' epoch logs (one writer, after training)."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    key = training.rebuild_losses(store, layout, run, [t.fusion for t in trained])
    get_run_logger().info("losses of %d fusions -> %s", len(trained), store.uri(key))
    return key


@task(name="check-unchanged", **IO_RETRIES)
def check_unchanged(cfg: PipelineConfig, manifest: ManifestRef) -> champion.SkipDecision:
    """Nightly: has anything changed since the last completed run?"""
    store = storage.open_storage(cfg.storage)
    fingerprint = champion.config_fingerprint(cfg.model_dump(mode="json"))
    decision = champion.skip_unchanged(
        store, Layout.from_config(cfg.storage), manifest.data_hash, fingerprint
    )
    get_run_logger().info("%s: %s", "skipping" if decision.skip else "training", decision.reason)
    return decision


@task(name="promote-champions", **IO_RETRIES)
def promote_champions(
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: list[TrainedRef],
    evaluation: EvaluationRef,
    manifest: ManifestRef,
) -> list[champion.ChampionDecision]:
    """Make each new model its fusion's champion when its test AUC is not worse on the same split.

    When the champion was scored on another test split (the data grew), its model is re-scored on
    this run's test split first, so the two AUCs compare like with like.
    """
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    rows = manifests.read_manifest(store, manifest.key)
    split = champion.split_hash(r.pair_id for r in rows if r.split == "test")
    logger = get_run_logger()
    decisions = []
    for ref in trained:
        current = champion.read_champion(store, layout, ref.fusion)
        rescored = None
        if current is not None and current.split_hash != split and store.exists(current.model_key):
            old = TrainedRef(
                fusion=ref.fusion, run=current.run, model_key=current.model_key,
                epochs=0, best_epoch=0, best_val_loss=float("nan"),
            )  # fmt: skip
            device = inference.pick_device(cfg.evaluation.device)
            preds = publish.predict_fusion(cfg, store, old, features, device)
            rescored = evaluation_metrics.calculate_metrics(preds.label, preds.score)["roc_auc"]
            logger.info(
                "%s: champion %s re-scored on this split: AUC %.4f (recorded %.4f on its own)",
                ref.fusion, current.run, rescored, current.auc,
            )  # fmt: skip
        decision = champion.update_champion(
            store, layout, ref.fusion, run=ref.run,
            auc=evaluation.metrics[ref.fusion]["roc_auc"], model_key=ref.model_key,
            split_hash=split, champion_auc_on_split=rescored,
        )  # fmt: skip
        logger.info("champion %s", decision.summary())
        decisions.append(decision)
    run = evaluation.run
    store.write_bytes(
        layout.reports(run) + "champions.json",
        runs.json_bytes([d.model_dump(mode="json") for d in decisions]),
        "application/json",
    )
    runs.add_report_section(store, layout, run, "Champions", [d.summary() for d in decisions])
    return decisions


@task(name="finish-run", **IO_RETRIES)
def finish_run(cfg: PipelineConfig, run: str, manifest: ManifestRef) -> None:
    """Record the completed run (data hash, settings) and clear its in-progress record."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    fingerprint = champion.config_fingerprint(cfg.model_dump(mode="json"))
    champion.record_run(store, layout, run, manifest.data_hash, fingerprint)
    runs.end_run(store, layout, run)
