"""Typed configuration: `load_config(path, overrides)` returns a frozen `PipelineConfig`."""

from config.load import load_config
from config.schema import PipelineConfig

__all__ = ["PipelineConfig", "load_config"]
