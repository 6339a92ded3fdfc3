"""`python -m flows.evaluate --config ... [--run RUN]`: the evaluate-models flow's short name."""

from __future__ import annotations

import sys

from flows.evaluate_models import cli, evaluate_models, main, parser

__all__ = ["cli", "evaluate_models", "main", "parser"]

if __name__ == "__main__":
    sys.exit(cli())
