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
from flows.common import IO_RETRY_BACKOFF_S, IO_RETRY_JITTER, IO_TASK_RETRIES
from tasks.data import features as preprocess
from tasks.data import manifest as manifests
from tasks.data import synthetic as make_dataset
from tasks.errors import DataError, ObjectNotFound, is_transient_error
from tasks.evaluate import publish
from tasks.io import storage
from tasks.io.layout import Layout
from tasks.refs import EvaluationRef, FeatureRef, FoldersRef, ManifestRef, TrainedRef
from tasks.runs import champions, history, ids, trend
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


# The storage steps' retries, from the constants whose worst case flows/common.py adds up.
IO_RETRIES: dict[str, Any] = dict(
    retries=IO_TASK_RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=IO_RETRY_BACKOFF_S),
    retry_jitter_factor=IO_RETRY_JITTER,
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
    layout = Layout.from_config(cfg.storage)
    ref = manifests.build_manifest(store, layout, cfg.data, cfg.run.seed, run)
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
    layout = Layout.from_config(cfg.storage)
    ref = preprocess.build_features(store, layout, cfg.data, manifest)
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


@task(name="evaluate", **IO_RETRIES)
def evaluate(
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: list[TrainedRef],
    run: str,
    manifest: ManifestRef | None,
) -> EvaluationRef:
    """Score every model on the test split; write refs.json, metrics.json and the 19 plots."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    ref = publish.evaluate_run(cfg, store, layout, run, features, trained, manifest)
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
    logger.info("metrics %s, %d plots", store.uri(ref.metrics_key), len(ref.plot_keys))
    return ref


@task(name="publish-report", **IO_RETRIES)
def publish_report(
    cfg: PipelineConfig,
    features: FeatureRef,
    trained: list[TrainedRef],
    evaluation: EvaluationRef,
    manifest: ManifestRef | None,
    decisions: list[champions.ChampionDecision] | None,
) -> str:
    """Render report.html once (metrics, plots, champion decisions, run history); create the
    artifacts (the story, the tables, the key plots, the run history)."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    logger = get_run_logger()
    runs = run_history(store, layout, evaluation, features, manifest)
    logger.info(
        "run history: %d runs (%s)%s",
        len(runs.runs),
        store.uri(runs.plot_key or ""),
        f", {len(runs.left_out)} left out" if runs.left_out else "",
    )
    key = publish.write_report(
        cfg, store, layout, evaluation, features, trained, manifest, decisions, history=runs
    )
    keys = artifacts.publish_artifacts(
        store, evaluation, trained, decisions, manifest=manifest, features=features, history=runs
    )
    logger.info("report %s; artifacts %s", store.uri(key), ", ".join(keys))
    return key


def run_history(
    store: storage.Storage,
    layout: Layout,
    evaluation: EvaluationRef,
    features: FeatureRef,
    manifest: ManifestRef | None,
) -> trend.RunHistory:
    """The last runs' test metrics (this run's included) and their trend plot, written."""
    split = None
    if manifest is not None:
        try:
            split = history.split_hash_of_test(store, manifest)
        except (ObjectNotFound, DataError, ValueError) as exc:  # no split: runs unmarked
            get_run_logger().warning("%s: test split unknown (%s)", manifest.uri, exc)
    runs = trend.read_history(store, layout, evaluation, features, split)
    return trend.write_plot(store, layout, runs)


@task(name="load-champion-decisions", **IO_RETRIES)
def load_champion_decisions(
    cfg: PipelineConfig, run: str
) -> list[champions.ChampionDecision] | None:
    """The run's stored champion decisions (None: it made none), for its re-rendered report."""
    store = storage.open_storage(cfg.storage)
    decisions = champions.read_decisions(store, Layout.from_config(cfg.storage), run)
    get_run_logger().info(
        "run %s: %s", run, "no champion decisions" if decisions is None else "champion decisions"
    )
    return decisions


# --- training --------------------------------------------------------------------------------


@task(name="train-fusion-model", task_run_name="train-{fusion}", **IO_RETRIES)
def train_fusion_task(
    cfg: PipelineConfig, features: FeatureRef, fusion: str, run: str
) -> TrainedRef:
    """Train one fusion; a retry (or a rerun of the same run id) resumes from its last checkpoint.

    A storage fault mid-epoch is retried here; a killed process cannot retry itself, so its next
    run with the same run id picks up the newest checkpoint in the bucket instead.
    """
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    progress = artifacts.TrainingProgress(fusion, run)
    ref = training.fit(store, layout, cfg, features, fusion, run, on_epoch=progress)
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


# States of a flow run that may still be working on its run (tasks/runs/ids.py: never adopt it).
LIVE_STATES = frozenset({"RUNNING", "PENDING", "PAUSED", "CANCELLING"})


def live_flow_run_state(flow_run_id: str) -> str | None:
    """The state name of flow run `flow_run_id` when it is live, else None (also when the API
    no longer knows it). `ids.Liveness`, asked through this flow run's Prefect client."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound as FlowRunNotFound

    try:
        run_id = UUID(flow_run_id)
    except ValueError:
        return None  # not a flow run id: no flow run can hold the record
    with get_client(sync_client=True) as client:
        try:
            flow_run = client.read_flow_run(run_id)
        except FlowRunNotFound:
            return None
    state = flow_run.state
    if state is None or state.type.value not in LIVE_STATES:
        return None
    return f"{state.name} ({flow_run.name})"


@task(name="start-run", **IO_RETRIES)
def start_run(cfg: PipelineConfig) -> ids.RunRef:
    """Pick the run id: run.name, else an interrupted run with the same settings, else new;
    refuses (RunInProgress) while another live flow run holds the in-progress record."""
    from prefect.runtime import flow_run

    store = storage.open_storage(cfg.storage)
    holder = flow_run.get_id()
    layout = Layout.from_config(cfg.storage)
    started = ids.start_run(store, layout, cfg, holder=holder, live=live_flow_run_state)
    if started.resumed:
        get_run_logger().info(
            "run %s was interrupted; resuming it from its checkpoints", started.run
        )
    else:
        get_run_logger().info("run %s", started.run)
    return started


@task(name="fill-demo-dataset", **IO_RETRIES)
def fill_demo_dataset(cfg: PipelineConfig) -> int:
    """Write the synthetic benchmark into an empty dataset/ (generator.fill_empty_dataset)."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    written = make_dataset.ensure_demo_dataset(store, layout, cfg.generator)
    if written:
        get_run_logger().info(
            "dataset/ was empty: wrote the synthetic benchmark (%d pairs)", written
        )
    return written


@task(name="collect-losses", **IO_RETRIES)
def collect_losses(cfg: PipelineConfig, trained: list[TrainedRef], run: str) -> str:
    """Write the run's losses.csv from the fusions' epoch logs (its one writer, after training)."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    key = training.write_losses(store, layout, run, [t.fusion for t in trained])
    get_run_logger().info("losses of %d fusions -> %s", len(trained), store.uri(key))
    return key


@task(name="check-unchanged", **IO_RETRIES)
def check_unchanged(
    cfg: PipelineConfig, started: ids.RunRef, manifest: ManifestRef
) -> history.SkipDecision:
    """Nightly: has anything changed since the last completed run?"""
    store = storage.open_storage(cfg.storage)
    decision = history.skip_unchanged(
        store, Layout.from_config(cfg.storage), manifest.data_hash, started.config_hash
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
) -> list[champions.ChampionDecision]:
    """Make each new model its fusion's champion when its test AUC is not worse on the same split
    (a champion scored on another split is re-scored on this one first); write champions.json."""
    store = storage.open_storage(cfg.storage)
    layout = Layout.from_config(cfg.storage)
    split = history.split_hash_of_test(store, manifest)
    decisions = champions.promote_all(
        store, layout, cfg, features, trained, evaluation.metrics, split
    )
    logger = get_run_logger()
    for decision in decisions:
        logger.info("champion %s", decision.summary())
    return decisions


@task(name="finish-run", **IO_RETRIES)
def finish_run(cfg: PipelineConfig, started: ids.RunRef, manifest: ManifestRef) -> None:
    """Record the completed run (data hash, settings) and clear its in-progress record."""
    store = storage.open_storage(cfg.storage)
    key = ids.finish_run(store, Layout.from_config(cfg.storage), started, manifest.data_hash)
    get_run_logger().info("run %s complete: %s", started.run, store.uri(key))
