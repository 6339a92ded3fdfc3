"""The project's errors, one tree, translated from third-party errors at one boundary each.

    DetectorError
    ├── ConfigError              a setting is missing, unknown, mistyped or out of range
    ├── StorageError             anything the bucket (S3 or local folder) refused
    │   ├── BucketNotFound       the bucket or root folder does not exist
    │   ├── ObjectNotFound       no object at that key
    │   ├── AccessDenied         credentials or IAM policy refuse the request
    │   ├── Throttled            the store kept saying "slow down" after our retries (transient)
    │   └── StorageUnavailable   unreachable, silent, a body cut short, a 500, an upload
    │                            refused for its checksum (transient)
    ├── CorruptSample            one input file cannot be decoded; skipped and reported
    ├── DataError                no usable data left (e.g. an empty class in a split)
    ├── CheckpointError          a model or checkpoint file is missing, foreign or unsafe
    └── RunInProgress            another live flow run holds the in-progress run record

`DetectorError` and `ConfigError` are defined in `config/errors.py` (the config loader raises
them and `config/` imports nothing from `tasks/`) and re-exported here with the rest of the tree.
Messages lead with the subject (a URI, a key, a setting), then the problem, then a hint.
"""

from __future__ import annotations

from config.errors import ConfigError, DetectorError  # defined in config/ (it imports no tasks/)

__all__ = [
    "AccessDenied",
    "BucketNotFound",
    "CheckpointError",
    "ConfigError",
    "CorruptSample",
    "DataError",
    "DetectorError",
    "ObjectNotFound",
    "RunInProgress",
    "StorageError",
    "StorageUnavailable",
    "Throttled",
    "TRANSIENT_ERRORS",
    "is_transient_error",
]


class StorageError(DetectorError):
    """The storage backend refused or failed a request."""


class BucketNotFound(StorageError):
    """The bucket (or the local root folder) does not exist."""


class ObjectNotFound(StorageError):
    """No object exists at the requested key."""


class AccessDenied(StorageError):
    """The credentials in use may not perform this request."""


class Throttled(StorageError):
    """The store throttled us even after botocore's own retries; worth retrying later."""


class StorageUnavailable(StorageError):
    """The store could not be reached or failed the request after our retries: connection
    refused or reset, silent past the timeouts, a reply's body cut short, an internal error
    (500), an upload whose checksum no longer matched what arrived; worth retrying later."""


class CorruptSample(DetectorError):
    """One audio or image file cannot be decoded; the caller skips and reports it."""


class DataError(DetectorError):
    """The data cannot support the run (no usable pairs, an empty class in a split)."""


class CheckpointError(DetectorError):
    """A model or checkpoint file is missing, of another format, or not safe to load."""


class RunInProgress(DetectorError):
    """Another live flow run holds the in-progress run record; this one must not start beside
    it nor adopt its run id (tasks/runs/ids.py)."""


TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    Throttled,
    StorageUnavailable,
    ConnectionError,
    TimeoutError,
)


def is_transient_error(exc: BaseException | None) -> bool:
    """True when retrying could help: throttling or a connection fault, never bad input or OOM."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, TRANSIENT_ERRORS):
            return True
        if isinstance(exc, (ConfigError, CorruptSample, DataError, CheckpointError, MemoryError)):
            return False
        seen.add(id(exc))
        exc = exc.__cause__
    return False
