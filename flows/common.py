"""What every flow's command line shares: --config, --set, logging set-up, error exit codes; and
the storage steps' retry settings with the longest a persistent storage fault can hold a step.

The parser and the exit-code rule live in `config/cli.py` (the generator's CLI in `tasks/` uses
them too, and `tasks/` must not import `flows/`); they are re-exported here for the flows.
"""

from __future__ import annotations

import logging

from config.cli import base_parser, run_cli
from config.schema import StorageConfig
from tasks.io.storage import worst_case_wait_s

__all__ = [
    "IO_RETRY_BACKOFF_S",
    "IO_RETRY_JITTER",
    "IO_STEP_WAIT_LIMIT_S",
    "IO_TASK_RETRIES",
    "PROJECT_LOGGERS",
    "base_parser",
    "enable_project_logging",
    "io_retry_delay_bounds_s",
    "io_step_worst_case_wait_s",
    "run_cli",
]

PROJECT_LOGGERS = ("tasks", "models", "config", "flows")

# The storage steps' Prefect retries (`IO_RETRIES` in flows/steps.py; a test keeps the two
# alike). A transient storage fault reaches Prefect only once botocore has spent its
# `storage.max_attempts`; the step then runs again after 2, 4, 8 and 16 s, each delay up to
# IO_RETRY_JITTER longer (Prefect's clamped jitter), so the two retry layers multiply.
IO_TASK_RETRIES = 4  # step attempts after the first
IO_RETRY_BACKOFF_S = 2.0  # first delay; each next one doubles (prefect exponential_backoff)
IO_RETRY_JITTER = 0.5  # a delay lasts at most (1 + IO_RETRY_JITTER) times its nominal value
# The longest a persistent storage fault may hold one step before the step fails, a multipart
# upload (its abort included) being the worst; the defaults stay under it (the test says how far).
IO_STEP_WAIT_LIMIT_S = 15 * 60


def io_retry_delay_bounds_s() -> list[float]:
    """The longest wait before each retry of a storage step: [3.0, 6.0, 12.0, 24.0] s."""
    return [IO_RETRY_BACKOFF_S * 2**r * (1 + IO_RETRY_JITTER) for r in range(IO_TASK_RETRIES)]


def io_step_worst_case_wait_s(cfg: StorageConfig, multipart: bool = True) -> float:
    """How long a persistent storage fault can hold one storage step before it fails: every step
    attempt spends `storage.max_attempts` silent or refused attempts on its first failing
    request (and on AbortMultipartUpload after a failed multipart upload), then Prefect waits.
    On the defaults: 410 s, 775 s with a multipart upload (docs/reliability.md, F rows)."""
    return worst_case_wait_s(cfg, io_retry_delay_bounds_s(), multipart=multipart)


def enable_project_logging(level: int = logging.INFO) -> None:
    """Set the project's loggers to INFO: Prefect may leave extra loggers at WARNING."""
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
