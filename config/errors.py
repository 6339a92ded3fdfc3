"""The root of the project's error tree and the configuration error, importable without `tasks/`.

`tasks/errors.py` draws the whole tree and re-exports both classes; `config/` needs only these two.
"""

from __future__ import annotations


class DetectorError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(DetectorError):
    """A configuration file or override is invalid; nothing has been done yet."""
