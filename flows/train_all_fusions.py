"""`train-all-fusions`: the nightly pipeline, from bucket set-up to published evaluation.

python -m flows.train_all_fusions --config config/demo.yaml [--set training.epochs=1]

The flow's parameters are typed, so the UI's "Custom run" of `train-all-fusions/nightly` is a
form: the config path, the fusions to train (a choice of early, mid, late), the epochs, the
dataset prefix, and any other `section.key=value` overrides (what the CLI's --set takes). Each
typed parameter left empty keeps the config's value; one that is set becomes the override of its
setting (`PARAMETER_SETTINGS`), applied after `overrides`, so the form's field wins:

    prefect deployment run train-all-fusions/nightly -p epochs=1 -p 'fusions=["late"]'
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from config import load_config
from config.schema import FusionName, PipelineConfig
from flows.common import base_parser, enable_project_logging, run_cli
from flows.fanout import cancel_fan_out  # cancelling the run cancels its fan-out
from flows.steps import (
    build_features,
    build_manifest,
    check_unchanged,
    collect_losses,
    evaluate,
    fill_demo_dataset,
    finish_run,
    promote_champions,
    publish_report,
    set_up_folders,
    start_run,
    train_fusion_task,
)
from flows.train_fusion import epochs_text
from tasks.errors import ConfigError
from tasks.refs import FeatureRef, RunSummary, TrainedRef
from tasks.train.memory import plan_concurrency, plan_threads, torch_threads

# What the CLI's --set takes (config/load.py): a dotted setting, "=", a YAML value (may be empty).
Override = Annotated[
    str,
    Field(
        pattern=r"^\s*[A-Za-z_]\w*(\.[A-Za-z_]\w*)*\s*=",
        description="section.key=value, as the CLI's --set takes it, e.g. training.batch_size=8",
    ),
]
# The typed parameters and the setting each one overrides.
PARAMETER_SETTINGS = {
    "fusions": "training.fusions",
    "epochs": "training.epochs",
    "dataset_prefix": "storage.dataset_prefix",
}


def parameter_overrides(
    fusions: Sequence[str] | None, epochs: int | None, dataset_prefix: str | None
) -> dict[str, str]:
    """{parameter: "setting=value"} for each typed parameter that is set. Values are written
    as JSON, which YAML reads back unchanged ("yes/" stays a string, [..] a list)."""
    given = {
        "fusions": None if fusions is None else list(fusions),
        "epochs": epochs,
        "dataset_prefix": dataset_prefix,
    }
    return {
        name: f"{PARAMETER_SETTINGS[name]}={json.dumps(value)}"
        for name, value in given.items()
        if value is not None
    }


def load_run_config(
    config_path: str,
    overrides: list[str] | None,
    fusions: Sequence[str] | None = None,
    epochs: int | None = None,
    dataset_prefix: str | None = None,
) -> PipelineConfig:
    """The config file, then `overrides`, then the typed parameters, validated once. An error
    in a setting a typed parameter gave names the parameter first:
    "parameter dataset_prefix: storage.dataset_prefix: must be a relative prefix ..."."""
    typed = parameter_overrides(fusions, epochs, dataset_prefix)
    try:
        return load_config(config_path, [*(overrides or []), *typed.values()])
    except ConfigError as exc:
        lines = str(exc).splitlines()
        for name in typed:
            setting = PARAMETER_SETTINGS[name]
            lines = [f"parameter {name}: {ln}" if ln.startswith(setting) else ln for ln in lines]
        raise ConfigError("\n".join(lines)) from exc


def run_name() -> str:
    """The flow run's name in the UI: what started it, the day, the fusions and epochs, e.g.
    "nightly 2026-12-01 early,mid,late 5 epochs" ("local ..." outside a deployment)."""
    from prefect.runtime import deployment, flow_run

    p = flow_run.parameters
    try:
        cfg = load_run_config(
            p.get("config_path", "config/config.yaml"), p.get("overrides"), p.get("fusions"),
            p.get("epochs"), p.get("dataset_prefix"),
        )  # fmt: skip
        what = f"{','.join(cfg.training.fusions)} {epochs_text(cfg.training.epochs)}"
    except ConfigError:  # the flow itself fails on it, with the message
        what = "(invalid config)"
    return f"{deployment.name or 'local'} {datetime.now(UTC):%Y-%m-%d} {what}"


@flow(
    name="train-all-fusions",
    flow_run_name=run_name,
    log_prints=False,
    on_cancellation=[cancel_fan_out],
)
def train_all_fusions(
    config_path: str = "config/config.yaml",
    overrides: list[Override] | None = None,
    fusions: Annotated[list[FusionName], Field(min_length=1)] | None = None,
    epochs: Annotated[int, Field(ge=1)] | None = None,
    dataset_prefix: str | None = None,
) -> RunSummary:
    """Set up the bucket, build the manifest and features, train and evaluate every fusion.

    Args:
        config_path: YAML config file, relative to the project directory.
        overrides: further settings, "section.key=value" each (the CLI's --set).
        fusions: the fusions to train; empty: the config's training.fusions.
        epochs: passes over the training split; empty: the config's training.epochs.
        dataset_prefix: where the dataset lives in the bucket; empty: storage.dataset_prefix.
    """
    enable_project_logging()
    cfg = load_run_config(config_path, overrides, fusions, epochs, dataset_prefix)
    # fan-out children get the same settings, typed parameters included
    settings = [*(overrides or []), *parameter_overrides(fusions, epochs, dataset_prefix).values()]
    logger = get_run_logger()
    folders = set_up_folders(cfg)
    started = start_run(cfg)  # run id + config fingerprint, computed once
    run = started.run
    logger.info("run %s on %s (config %s)", run, folders.root_uri, config_path)
    if cfg.generator.fill_empty_dataset:
        fill_demo_dataset(cfg)
    manifest = build_manifest(cfg, run)
    if cfg.run.skip_if_unchanged:
        unchanged = check_unchanged(cfg, started, manifest)
        if unchanged.skip:
            finish_run(cfg, started, manifest)
            return RunSummary(run=run, root_uri=folders.root_uri, n_pairs=manifest.n_pairs,
                              notes=[f"skipped: {unchanged.reason}"])  # fmt: skip
    features = build_features(cfg, manifest)
    if cfg.training.fan_out:
        from flows.fanout import train_on_workers

        trained = train_on_workers(cfg, config_path, settings, run)
    else:
        trained = train_here(cfg, features, run)
    collect_losses(cfg, trained, run)
    evaluation = evaluate(cfg, features, trained, run, manifest)
    decisions = promote_champions(cfg, features, trained, evaluation, manifest)
    report_key = publish_report(cfg, features, trained, evaluation, manifest, decisions)
    finish_run(cfg, started, manifest)
    logger.info("run %s complete: report %s", run, report_key)
    return RunSummary(
        run=run,
        root_uri=folders.root_uri,
        n_pairs=manifest.n_pairs,
        fusions=[t.fusion for t in trained],
        report_key=report_key,
        metrics=evaluation.metrics,
        skipped=len(features.skipped),
        notes=[d.summary() for d in decisions],
    )


def train_here(cfg: PipelineConfig, features: FeatureRef, run: str) -> list[TrainedRef]:
    """Train the configured fusions on this worker, as many at once as memory allows."""
    fusions = list(cfg.training.fusions)
    at_once = plan_concurrency(cfg, len(fusions))
    threads = plan_threads(cfg, at_once)
    get_run_logger().info(
        "training %s, %d at a time, %d torch thread(s) each", ", ".join(fusions), at_once, threads
    )
    trained: list[TrainedRef] = []
    with torch_threads(threads):
        for start in range(0, len(fusions), at_once):
            wave = fusions[start : start + at_once]
            if len(wave) == 1:
                trained.append(train_fusion_task(cfg, features, wave[0], run))
            else:
                futures = [train_fusion_task.submit(cfg, features, f, run) for f in wave]
                trained.extend(f.result() for f in futures)
    return trained


def main(args: argparse.Namespace) -> RunSummary:
    load_config(args.config, args.overrides)  # a bad config fails here, before Prefect starts
    return train_all_fusions(config_path=args.config, overrides=args.overrides)


def cli() -> int:
    """The `deepfake-train` console script: parse sys.argv, run, return the exit code."""
    return run_cli(main, base_parser(__doc__ or ""))


if __name__ == "__main__":
    sys.exit(cli())
