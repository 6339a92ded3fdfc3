"""What every command line shares: --config and --set, and our own errors as exit code 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from config.errors import DetectorError


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--config", default="config/config.yaml", help="YAML config file (default: %(default)s)"
    )
    add_overrides(parser)
    return parser


def add_overrides(
    parser: argparse.ArgumentParser,
    help: str = "override one setting, e.g. --set training.epochs=3 (repeatable)",
) -> None:
    """`--set SECTION.KEY=VALUE` (repeatable) into `args.overrides`, as `load_config` takes them."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help,
    )


def run_cli(
    main: Callable[[argparse.Namespace], Any],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> int:
    """Parse, run, and turn our own errors into one clear line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        main(args)
    except DetectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
