"""`python -m flows.evaluate --config ... [--run RUN]`: the evaluate-models flow's short name."""

from __future__ import annotations

import sys

from flows.common import run_cli
from flows.evaluate_models import evaluate_models, main, parser

__all__ = ["evaluate_models", "main", "parser"]

if __name__ == "__main__":
    sys.exit(run_cli(main, parser()))
