"""Thin Prefect task wrappers: call the plain code, log to the run logger, return a reference.

Retries are for transient storage faults only (`is_transient`): a bad config, a corrupt file or
running out of memory fails at once.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from config.schema import PipelineConfig
from tasks import storage
from tasks.errors import is_transient_error
from tasks.refs import FoldersRef


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
