"""What every flow's command line shares: --config, --set, logging set-up, error exit codes.

The parser and the exit-code rule live in `config/cli.py` (the generator's CLI in `tasks/` uses
them too, and `tasks/` must not import `flows/`); they are re-exported here for the flows.
"""

from __future__ import annotations

import logging

from config.cli import base_parser, run_cli

__all__ = ["PROJECT_LOGGERS", "base_parser", "enable_project_logging", "run_cli"]

PROJECT_LOGGERS = ("tasks", "models", "config", "flows")


def enable_project_logging(level: int = logging.INFO) -> None:
    """Set the project's loggers to INFO: Prefect may leave extra loggers at WARNING."""
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
