"""Load a YAML file, apply `--set a.b=value` overrides, validate into a `PipelineConfig`.

Every failure is a `ConfigError` whose message names the setting's full path and the file, so a
typo or a wrong type stops the run before any work starts.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from config.errors import ConfigError
from config.schema import PipelineConfig


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Read `path`, apply `overrides` ("section.key=value", value parsed as YAML), validate."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        _apply_override(raw, item, path)
    return validate_config(raw, source=str(path))


def validate_config(raw: dict[str, Any], source: str = "<dict>") -> PipelineConfig:
    """Validate an already-parsed mapping; errors name the key path and `source`."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(err, source) for err in exc.errors()]
        raise ConfigError("\n".join(lines)) from None


def _apply_override(raw: dict[str, Any], item: str, path: Path) -> None:
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected section.key=value ({path})")
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: {part} is not a section ({path})")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse override value {value!r} ({exc})") from exc


def _describe(err: Any, source: str) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        hint = _suggest(loc)
        return f"{dotted}: unknown setting{hint} ({source})"
    msg = str(err["msg"])
    for old, new in (("Input should be", "must be"), ("Value error, ", ""), ("Field", "setting")):
        msg = msg.replace(old, new)
    if err["type"] == "missing":
        return f"{dotted}: required setting is missing ({source})"
    value = err.get("input")
    shown = f'"{value}"' if isinstance(value, str) else repr(value)
    if isinstance(value, dict):
        return f"{dotted}: {msg} ({source})"
    return f"{dotted}: {msg}, got {shown} ({source})"


def _suggest(loc: list[str]) -> str:
    model: type[BaseModel] = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
