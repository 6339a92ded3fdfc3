"""Prefect flows; each also runs as `python -m flows.<name> --config ...`."""

import os

# Before Prefect is imported anywhere: let the project's own loggers reach the Prefect UI.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models,config,flows")
