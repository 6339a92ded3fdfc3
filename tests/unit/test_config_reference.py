"""The README's configuration reference stays in sync with the schema: every setting of
`config/schema.py` has a row with its default, and no row names a setting that is gone.

The reference is hand-written; this test only compares it with the pydantic models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from config.schema import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
SECTION = "## Configuration reference"
ROW = re.compile(r"^\| `([a-z0-9_.]+)` \| `([^`]*)` \| (.+) \|$")


def schema_defaults(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf setting of `model` as a dotted key, with its default as YAML would spell it."""
    out: dict[str, Any] = {}
    defaults = model().model_dump(mode="json")
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out |= schema_defaults(kind, f"{prefix}{name}.")
        else:
            out[f"{prefix}{name}"] = defaults[name]
    return out


def reference_rows(text: str) -> dict[str, str]:
    """The README's reference table: dotted key -> default as written (without backticks)."""
    if SECTION not in text:
        raise AssertionError(f"README.md has no {SECTION!r} section")
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    for line in body.splitlines():
        if not line.startswith("| `"):
            continue
        match = ROW.match(line)
        assert match, f"README.md reference row is not '| `key` | `default` | meaning |': {line!r}"
        key, default, _ = match.groups()
        assert key not in rows, f"README.md documents {key} twice"
        rows[key] = default
    return rows


README_ROWS = reference_rows((ROOT / "README.md").read_text())
SCHEMA = schema_defaults(PipelineConfig)


def test_schema_walk_finds_every_section() -> None:
    sections = {k.split(".", 1)[0] for k in SCHEMA}
    assert sections == set(PipelineConfig.model_fields)
    assert "training.epochs" in SCHEMA and "data.max_audio_seconds" not in SCHEMA


def test_every_schema_setting_is_documented_and_every_documented_one_exists() -> None:
    undocumented = sorted(SCHEMA.keys() - README_ROWS.keys())
    gone = sorted(README_ROWS.keys() - SCHEMA.keys())
    assert not undocumented, f"settings missing from README.md's {SECTION}: {undocumented}"
    assert not gone, f"README.md's {SECTION} documents settings the schema lacks: {gone}"


@pytest.mark.parametrize("key", sorted(SCHEMA))
def test_documented_default_is_the_schema_default(key: str) -> None:
    if key not in README_ROWS:
        pytest.skip("undocumented: reported by the key-set test")
    written = yaml.safe_load(README_ROWS[key])
    assert written == SCHEMA[key], f"README.md gives {key} default {README_ROWS[key]!r}"
