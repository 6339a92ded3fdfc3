"""One storage interface, two backends picked by the URI.

`s3://bucket[/prefix]` goes through boto3 (bounded retries, streamed reads, multipart uploads,
paginated listing, any S3-compatible endpoint); a local path or `file://` URI is a folder standing
in for the bucket (atomic writes, keys that escape the root refused). Keys are always relative to
the storage root and use "/" separators, e.g. "dataset/audio/real/0001.wav".

Faults of the store (docs/reliability.md, F rows):
- Every request gets `storage.max_attempts` HTTP attempts (botocore's standard mode: 500, 503,
  SlowDown, resets and timeouts retried with capped, jittered backoff); an attempt is given up after
  `connect_timeout_s` to connect or `read_timeout_s` of silence.
- A body that stalls or breaks after the headers (which botocore never retries) is read on from
  where it broke (`Range`, `If-Match` the first reply's ETag, so two versions are never mixed),
  within the same budget of attempts; a body shorter than its Content-Length is never returned.
- Uploads carry a CRC32 checksum of the body (`x-amz-checksum-crc32`, or per part), so a store that
  gets fewer bytes than were sent refuses the object instead of storing it short; S3's PutObject is
  all or nothing, so the key keeps its previous version.
- `worst_case_wait_s` is how long a persistent fault can hold a step before it fails.

Reads make their first attempt over a lean GET (`_LeanGet`: botocore's signer, HTTP session,
streaming and checksum classes without its per-request pipeline, ~3x less CPU per GET,
measured); a failure other than a 404 is made again through botocore with the attempts left,
so the bounds above hold unchanged. A whole object's CRC32 (or SHA) is checked on both paths.

This module is the one place where botocore errors become `StorageError`s.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import quote

from config.schema import StorageConfig
from tasks.errors import (
    AccessDenied,
    BucketNotFound,
    ObjectNotFound,
    StorageError,
    StorageUnavailable,
    Throttled,
)

log = logging.getLogger(__name__)


def _file_mode() -> int:
    """The mode a plain `open()` would give (mkstemp's 0600 is too strict for a bucket)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


CHUNK = 1 << 20  # bytes per streamed chunk
DRAIN_BYTES = 256 << 10  # a stream closed with at most this much left is read out, not cut
# The "folders" created under outputs/ at set-up (every kind of product has its own).
OUTPUT_FOLDERS = (
    "models/",
    "plots/",
    "logs/",
    "manifests/",
    "cache/features/",
    "intermediates/",
    "reports/",
)


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the storage root, size in bytes, ETag (content hash)."""

    key: str
    size: int
    etag: str


class Storage(Protocol):
    """What every backend offers; see `LocalStorage` and `S3Storage`."""

    root_uri: str

    def uri(self, key: str) -> str: ...
    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str: ...
    def upload_file(self, path: Path, key: str) -> str: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def head(self, key: str) -> ObjectInfo: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def make_folder(self, prefix: str) -> None: ...
    def link(self, key: str) -> str: ...
    def check(self) -> None: ...


def open_storage(cfg: StorageConfig) -> Storage:
    """Open the backend named by `storage.uri`: S3 (AWS_ENDPOINT_URL wins over
    `storage.endpoint_url`) or a local folder."""
    if cfg.uri.startswith("s3://"):
        return S3Storage(
            cfg.uri,
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or cfg.endpoint_url,
            region=cfg.region,
            max_attempts=cfg.max_attempts,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            max_pool_connections=cfg.max_pool_connections,
            multipart_threshold=cfg.multipart_threshold_mb << 20,
        )
    return LocalStorage(cfg.uri)


# botocore's standard retry mode, as botocore 1.44 computes a delay (retries/standard.py): retry i
# (1-based) waits rand() * min(BACKOFF_BASE_S * 2 ** (i - 1), BACKOFF_CAP_S), base 1 s for
# throttling (0.05 s for other faults; the bound takes the larger), raised to a reply's
# `x-amz-retry-after` but by at most RETRY_AFTER_EXTRA_S. The body re-reads use the same rule.
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 20.0
RETRY_AFTER_EXTRA_S = 5.0


def backoff_bound_s(retry: int) -> float:
    """The longest wait before retry number `retry` (1-based) of one request."""
    return min(BACKOFF_BASE_S * 2 ** (retry - 1), BACKOFF_CAP_S) + RETRY_AFTER_EXTRA_S


def request_wait_s(cfg: StorageConfig) -> float:
    """Longest one request (or one streamed read) can take to fail on a store that stays silent
    or keeps refusing: every attempt given up after a connect timeout plus one read timeout of
    silence, plus the longest backoff before each retry. A store that trickles a byte now and
    then, each within the read timeout, is slow, not silent, and is not bounded by this."""
    attempts = cfg.max_attempts
    per_attempt = cfg.connect_timeout_s + cfg.read_timeout_s
    return attempts * per_attempt + sum(backoff_bound_s(i) for i in range(1, attempts))


def worst_case_wait_s(
    cfg: StorageConfig, task_delays_s: Sequence[float] = (), multipart: bool = False
) -> float:
    """Longest a step can wait on a persistent storage fault before it fails: one failing
    request per task attempt (the first failure ends the attempt), times the attempts the step
    gets (1 + len(task_delays_s)), plus its retry delays (their upper bounds, jitter included).
    A multipart upload that fails also sends AbortMultipartUpload, a second request under the
    same fault: `multipart=True` counts it."""
    per_task_attempt = request_wait_s(cfg) * (2 if multipart else 1)
    return (1 + len(task_delays_s)) * per_task_attempt + sum(task_delays_s)


def read(storage: Storage, key: str) -> io.BytesIO:
    """The whole object in memory, as a seekable file object (the seed's BytesIO reads)."""
    return io.BytesIO(storage.read_bytes(key))


def create_output_folders(storage: Storage, outputs_prefix: str = "outputs/") -> list[str]:
    """Create outputs/models/, outputs/plots/, ... (idempotent); returns the folder keys."""
    storage.check()
    folders = [outputs_prefix + name for name in OUTPUT_FOLDERS]
    for folder in folders:
        storage.make_folder(folder)
    return folders


# The seed's names, kept for readers of the original plan.
create_s3_folder = create_output_folders


def stream_from_s3(storage: Storage, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """Stream one object in chunks (works on both backends despite the seed's name)."""
    return storage.stream(key, chunk_size)


def upload_to_s3(storage: Storage, path: Path, key: str) -> str:
    """Upload a local file (multipart when large); returns the object's URI."""
    return storage.upload_file(path, key)


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key:
        raise StorageError(f"{key!r}: invalid key (must be a relative path with '/' separators)")
    if any(part in ("..", ".") for part in key.split("/")):
        raise StorageError(f"{key!r}: invalid key ('.' and '..' are not allowed)")
    return key


# --------------------------------------------------------------------------------------------
# Local folder backend


class LocalStorage:
    """A folder standing in for the bucket; writes are atomic (temp file, then rename)."""

    def __init__(self, uri: str) -> None:
        path = uri[len("file://") :] if uri.startswith("file://") else uri
        self.root = Path(path).expanduser().resolve()
        self.root_uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        _check_key(key.rstrip("/") or key)
        path = (self.root / key).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"{key!r}: key escapes the storage root {self.root}")
        return path

    def uri(self, key: str) -> str:
        return f"{self.root_uri}/{key}"

    def check(self) -> None:
        if not self.root.is_dir():
            # The embedded default creates its bucket folder; a missing parent is a real error.
            if not self.root.parent.is_dir():
                raise BucketNotFound(f"{self.root}: storage folder's parent does not exist")
            self.root.mkdir(exist_ok=True)

    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        path = self._path(key)
        try:
            fh = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.uri(key)}: no such object") from exc
        except IsADirectoryError as exc:
            raise ObjectNotFound(f"{self.uri(key)}: is a folder, not an object") from exc
        except PermissionError as exc:
            raise AccessDenied(f"{self.uri(key)}: permission denied") from exc
        with fh:
            while chunk := fh.read(chunk_size):
                yield chunk

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.stream(key))

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.uri(key)

    def upload_file(self, path: Path, key: str) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.chmod(tmp, _file_mode())
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.uri(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            raise BucketNotFound(f"{self.root}: storage folder does not exist")
        base = self.root
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith(".tmp-"):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield self._info(key, full)

    def head(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"{self.uri(key)}: no such object")
        return self._info(key, path)

    @staticmethod
    def _info(key: str, path: Path) -> ObjectInfo:
        digest = hashlib.md5(usedforsecurity=False)
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
        return ObjectInfo(key=key, size=path.stat().st_size, etag=digest.hexdigest())

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def make_folder(self, prefix: str) -> None:
        self._path(prefix).mkdir(parents=True, exist_ok=True)

    def link(self, key: str) -> str:
        return str(self._path(key))


# --------------------------------------------------------------------------------------------
# S3 backend

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
# The store failed, not the request: worth retrying later (botocore retries these too).
_STORE_FAILED = {"InternalError", "500", "502", "504", "BadGateway", "GatewayTimeout"}
_THROTTLED = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "503",
    "ServiceUnavailable",
    "RequestTimeout",
}


def _status(exc: Any) -> int | None:
    """The HTTP status of a botocore ClientError's reply."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


# Checksums a whole-object GET is checked against, in botocore's order of preference among those
# it computes without the CRT (crc32c and crc64nvme need awscrt, which is not installed).
_CHECKSUMS = ("crc32", "sha1", "sha256")
_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</(?:Code|Message)>")


@dataclass(frozen=True)
class _LeanGet:
    """A GetObject without botocore's request pipeline (events, parameter validation,
    endpoint rules, response parsing), from botocore's own parts: the URL its endpoint rules
    give the bucket (read once from a presigned URL; the region is the client's), its SigV4
    signer with the client's credentials (refreshed as they expire), the client's HTTP session
    (its connection pool, certificates, proxies and timeouts), its streaming body and checksum
    classes (a whole object's CRC32 or SHA is checked as the body ends, as botocore does) and
    its ClientError (error replies carry S3's code and message, translated by
    `S3Storage._translate`)."""

    base: str  # the URL of a key is base + the quoted key
    region: str  # the region botocore signs for
    credentials: Any
    http: Any

    @classmethod
    def setup(cls, client: Any, bucket: str) -> _LeanGet | None:
        from urllib.parse import urlsplit

        from botocore.exceptions import BotoCoreError

        marker = "lean-get-marker"
        try:
            url = client.generate_presigned_url(
                "get_object", Params={"Bucket": bucket, "Key": marker}, ExpiresIn=60
            )
            http = client._endpoint.http_session  # noqa: SLF001 - botocore's, see above
            credentials = client._request_signer._credentials  # noqa: SLF001
        except (BotoCoreError, AttributeError):  # no credentials (yet), an unknown botocore
            return None
        parts = urlsplit(url)
        version = getattr(client.meta.config, "signature_version", None)
        if (
            credentials is None
            or version not in (None, "s3v4")
            or not parts.path.endswith("/" + marker)
        ):
            return None  # another signature: botocore signs it
        region = client.meta.region_name
        region = "us-east-1" if region in (None, "aws-global") else region
        base = f"{parts.scheme}://{parts.netloc}{parts.path[: -len(marker)]}"
        return cls(base=base, region=region, credentials=credentials, http=http)

    def get(self, key: str) -> dict[str, Any]:
        """GetObject of the full `key`: {"Body", "ContentLength", "ETag"}, or a ClientError."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import ClientError
        from botocore.httpchecksum import (
            Crc32Checksum,
            Sha1Checksum,
            Sha256Checksum,
            StreamingChecksumBody,
        )
        from botocore.response import StreamingBody

        request = AWSRequest(
            method="GET",
            url=self.base + quote(key, safe="/~"),
            headers={"x-amz-checksum-mode": "ENABLED"},
        )
        S3SigV4Auth(self.credentials.get_frozen_credentials(), "s3", self.region).add_auth(request)
        prepared = request.prepare()
        prepared.stream_output = True
        reply = self.http.send(prepared)
        headers, raw = reply.headers, reply.raw
        length = headers.get("content-length")
        if reply.status_code != 200 or length is None:
            error = raw.read(1 << 16) if reply.status_code != 200 else b""
            raw.close()
            found = _ERROR_FIELD.findall(error)
            fields = {k.decode(): v.decode(errors="replace") for k, v in found}
            raise ClientError(
                {
                    "Error": {
                        "Code": fields.get("Code") or str(reply.status_code),
                        "Message": fields.get("Message") or ("" if length else "no Content-Length"),
                    },
                    "ResponseMetadata": {
                        "HTTPStatusCode": reply.status_code,
                        "HTTPHeaders": dict(headers),
                        "RetryAttempts": 0,
                    },
                },
                "GetObject",
            )
        size = int(length)
        checks = {"crc32": Crc32Checksum, "sha1": Sha1Checksum, "sha256": Sha256Checksum}
        body: Any = None
        for name in _CHECKSUMS:
            expected = headers.get(f"x-amz-checksum-{name}")
            if expected and "-" not in expected:  # "-": a multipart object's checksum of parts
                body = StreamingChecksumBody(raw, size, checks[name](), expected)
                break
        return {
            "Body": body or StreamingBody(raw, size),
            "ContentLength": size,
            "ETag": headers.get("etag"),
        }

    @staticmethod
    def redirected(exc: Any) -> bool:
        """A reply that says the bucket is elsewhere (another region or endpoint)."""
        code = exc.response.get("Error", {}).get("Code")
        return _status(exc) in {301, 307} or code in {
            "PermanentRedirect",
            "TemporaryRedirect",
            "AuthorizationHeaderMalformed",
        }


class S3Storage:
    """A bucket (and optional prefix) on S3 or any S3-compatible store, through boto3."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        max_attempts: int = 3,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 15.0,
        max_pool_connections: int = 16,
        multipart_threshold: int = 64 << 20,
    ) -> None:
        rest = uri[len("s3://") :]
        self.bucket, _, prefix = rest.partition("/")
        if not self.bucket:
            raise StorageError(f"{uri}: names no bucket")
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.root_uri = f"s3://{self.bucket}" + (
            f"/{self.prefix.rstrip('/')}" if self.prefix else ""
        )
        self.endpoint_url = endpoint_url
        self.region = region
        self.max_attempts = max_attempts
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.max_pool_connections = max_pool_connections
        self.multipart_threshold = multipart_threshold
        self._lock = threading.Lock()
        self._client: Any = None
        self._once: Any = None
        self._rest: Any = None
        self._lean: _LeanGet | None | Literal[False] = None  # None: not set up; False: unusable
        self._pid = os.getpid()

    # One client per process: boto3 clients are thread-safe (creating them is not, hence the
    # lock) but must not cross a fork, so a forked child builds its own.
    @property
    def client(self) -> Any:
        """The client every request goes through: `max_attempts` attempts per request."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    # A whole object's CRC32 is checked against the one stored with it.
                    self._client = self._build(self.max_attempts, "when_supported")
                    self._once = self._rest = self._lean = None
                    self._pid = os.getpid()
        return self._client

    @property
    def once(self) -> Any:
        """A client making one attempt per request, for the body re-reads of `stream`, which
        count their attempts themselves (so botocore's retries do not multiply them). Made on
        first use: most processes never need it."""
        _ = self.client  # built first: a forked child's resets `_once`
        if self._once is None:
            with self._lock:
                if self._once is None:
                    # Ranged re-reads: S3 keeps no checksum of a part of an object.
                    self._once = self._build(1, "when_required")
        return self._once

    @property
    def rest(self) -> Any:
        """A client with the attempts a read has left after its lean first attempt failed
        (`max_attempts` - 1, at least one), so the two together make `max_attempts`."""
        _ = self.client
        if self._rest is None:
            with self._lock:
                if self._rest is None:
                    self._rest = self._build(max(1, self.max_attempts - 1), "when_supported")
        return self._rest

    def lean(self) -> _LeanGet | None:
        """This process's lean GET, set up on first use; None where it cannot be used (no
        credentials at the first read, a signature version other than SigV4, a botocore
        without the pieces it uses, or a store that redirected it): every read of this process
        then goes through botocore."""
        client = self.client
        if self._lean is None:
            with self._lock:
                if self._lean is None:
                    self._lean = _LeanGet.setup(client, self.bucket) or False
        return self._lean or None

    def _build(self, attempts: int, response_checksums: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            config=Config(
                # Standard mode, not adaptive: its backoff is capped (`backoff_bound_s`), while
                # the adaptive mode's client-side rate limiter can hold a request for as long as
                # it judges the store busy, which no bound here could state.
                retries={"total_max_attempts": attempts, "mode": "standard"},
                max_pool_connections=self.max_pool_connections,
                connect_timeout=self.connect_timeout_s,
                read_timeout=self.read_timeout_s,
                # Uploads always carry a CRC32 of their body (also where an environment sets
                # AWS_REQUEST_CHECKSUM_CALCULATION=when_required), so a store that receives fewer
                # bytes refuses the object rather than storing it short.
                request_checksum_calculation="when_supported",
                response_checksum_validation=response_checksums,
            ),
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_client"] = None
        state["_once"] = None
        state["_rest"] = None
        state["_lean"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key.rstrip("/") or key) + ("/" if key.endswith("/") else "")

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}"

    def _attempts(self, exc: Exception, spent: int | None = None) -> str:
        """ "after N attempts": botocore's count where the reply carries it, else the budget."""
        if spent is None:
            meta = getattr(exc, "response", None) or {}
            retried = meta.get("ResponseMetadata", {}).get("RetryAttempts")
            spent = retried + 1 if isinstance(retried, int) else self.max_attempts
        return f"after {spent} attempt{'s' if spent != 1 else ''} (storage.max_attempts)"

    def _translate(self, exc: Exception, key: str | None, spent: int | None = None) -> StorageError:
        """Map a botocore error to our tree, naming bucket, key, the fault and the attempts."""
        from botocore.exceptions import (
            ClientError,
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            FlexibleChecksumError,
            IncompleteReadError,
            NoCredentialsError,
            ReadTimeoutError,
            ResponseStreamingError,
        )
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )

        where = self.uri(key) if key is not None else f"s3://{self.bucket}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            message = err.get("Message") or ""
            fault = f"{code or status}{': ' + message if message else ''}"
            if code in _NO_BUCKET or (key is None and code in _NOT_FOUND):
                return BucketNotFound(f"s3://{self.bucket}: bucket does not exist")
            if code in _NOT_FOUND:
                return ObjectNotFound(f"{where}: no such object (bucket {self.bucket})")
            if code in _DENIED or status == "403":
                return AccessDenied(
                    f"{where}: access denied ({code}; check the credentials and IAM policy)"
                )
            if code in _THROTTLED or status in {"429", "503"}:
                return Throttled(
                    f"{where}: throttled by the store ({fault}) {self._attempts(exc, spent)}"
                )
            if code in _STORE_FAILED or status in _STORE_FAILED:
                return StorageUnavailable(
                    f"{where}: the store failed ({fault}) {self._attempts(exc, spent)}"
                )
            if code in {"BadDigest", "XAmzContentSHA256Mismatch"}:
                return StorageUnavailable(
                    f"{where}: the store refused the upload ({fault}): the body it received does "
                    "not match the checksum sent with it (cut or corrupted in transit); the key "
                    "keeps its previous version"
                )
            if code == "PreconditionFailed":
                return StorageUnavailable(
                    f"{where}: the object changed while it was being read (its ETag no longer "
                    "matches); read it again"
                )
            return StorageError(f"{where}: {fault or exc}")
        if isinstance(exc, NoCredentialsError):
            return AccessDenied(
                f"{where}: no AWS credentials found (environment, profile or instance role)"
            )
        if isinstance(exc, FlexibleChecksumError):
            return StorageUnavailable(
                f"{where}: checksum mismatch, the bytes received are not the object's ({exc}); "
                "read it again"
            )
        if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError)):
            return StorageUnavailable(
                f"{where}: the store went silent ({exc}; connect_timeout_s "
                f"{self.connect_timeout_s:g}, read_timeout_s {self.read_timeout_s:g}) "
                f"{self._attempts(exc, spent)}"
            )
        if isinstance(exc, (IncompleteReadError, ResponseStreamingError)):
            return StorageUnavailable(
                f"{where}: the reply's body was cut short ({exc}) {self._attempts(exc, spent)}"
            )
        if isinstance(exc, (EndpointConnectionError, ConnectionClosedError, BotoConnectionError)):
            return StorageUnavailable(
                f"{where}: cannot reach the store ({exc}) {self._attempts(exc, spent)}"
            )
        return StorageError(f"{where}: {exc}")

    def check(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, None) from exc

    def stream(self, key: str, chunk_size: int = CHUNK) -> Iterator[bytes]:
        """The object in chunks. A body that stalls or breaks after the reply's headers is read
        on from the byte where it broke (the same version: `If-Match` its ETag), the re-reads
        counted in the same `max_attempts` as the first request's own retries; the chunks add
        up to the reply's Content-Length or the read fails (never a short object)."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        resp, spent = self._get(key, full)
        size, etag = int(resp["ContentLength"]), resp["ETag"]
        done = 0
        while True:
            body = resp["Body"]
            fault: Exception | None = None
            try:
                for chunk in body.iter_chunks(chunk_size):
                    done += len(chunk)
                    yield chunk
            except GeneratorExit:  # the reader has what it needs (an audio file's first bytes)
                if size - done <= DRAIN_BYTES:
                    # Reading the little left keeps the connection for the next GET; closing
                    # mid-body would drop it (a new connection: CPU, and on S3 a TLS handshake).
                    with contextlib.suppress(Exception):
                        body.read()
                raise
            except (ClientError, BotoCoreError) as exc:
                fault = exc
            finally:
                body.close()
            if fault is None and done == size:
                return
            from botocore.exceptions import FlexibleChecksumError

            if isinstance(fault, FlexibleChecksumError):  # the bytes already given were wrong
                raise self._translate(fault, key) from fault
            what = f"{fault}" if fault is not None else "the body ended early"
            if spent >= self.max_attempts:
                raise StorageUnavailable(
                    f"{self.uri(key)}: the reply's body broke at byte {done} of {size} ({what}) "
                    f"{self._attempts(fault or Exception(), spent)}"
                ) from fault
            log.warning(
                "%s: body broke at byte %d of %d (%s); reading on (attempt %d of %d)",
                self.uri(key),
                done,
                size,
                what,
                spent + 1,
                self.max_attempts,
            )
            # The re-reads make one attempt each (`once`) and count them here.
            while True:
                time.sleep(random.random() * (backoff_bound_s(spent) - RETRY_AFTER_EXTRA_S))
                spent += 1
                try:
                    resp = self.once.get_object(
                        Bucket=self.bucket, Key=full, Range=f"bytes={done}-", IfMatch=etag
                    )
                    break
                except (ClientError, BotoCoreError) as exc:
                    error = self._translate(exc, key, spent)
                    changed = isinstance(exc, ClientError) and (
                        exc.response.get("Error", {}).get("Code") == "PreconditionFailed"
                    )
                    transient = isinstance(error, (Throttled, StorageUnavailable))
                    if changed or not transient or spent >= self.max_attempts:
                        raise error from exc

    def _get(self, key: str, full: str) -> tuple[dict[str, Any], int]:
        """The first reply of a read (headers in, body to stream) and the attempts it took.

        The first attempt goes over the lean GET (`_LeanGet`): botocore's request pipeline
        costs ~2 ms of CPU per GET (measured), several times the rest of the request, and a
        feature build makes two GETs per pair on the cores that decode. A 404 there is final;
        any other failure is made again through botocore (`rest`: the attempts left, after
        the same backoff), so retries and the errors' wording stay botocore's and a read still
        makes at most `max_attempts` attempts. A redirect (the bucket in another region) hands
        the read, and every later one, to botocore whole.
        """
        from botocore.exceptions import BotoCoreError, ClientError

        client, before = self.client, 0
        lean = self.lean()
        if lean is not None:
            try:
                return lean.get(full), 1
            except (ClientError, BotoCoreError) as exc:
                if isinstance(exc, ClientError) and lean.redirected(exc):
                    # Another region or endpoint: botocore finds the way (its redirects are no
                    # retry), with the whole budget; this store reads through botocore from now.
                    self._lean = False
                else:
                    final = isinstance(exc, ClientError) and _status(exc) == 404
                    if final or self.max_attempts == 1:
                        raise self._translate(exc, key, 1) from exc
                    if isinstance(self._translate(exc, key, 1), (Throttled, StorageUnavailable)):
                        time.sleep(random.random() * (backoff_bound_s(1) - RETRY_AFTER_EXTRA_S))
                    client, before = self.rest, 1
        try:
            resp = client.get_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as exc:
            spent = None
            if before:
                meta = (getattr(exc, "response", None) or {}).get("ResponseMetadata", {})
                retried = meta.get("RetryAttempts")
                spent = 1 + (retried + 1 if isinstance(retried, int) else self.max_attempts - 1)
            raise self._translate(exc, key, spent) from exc
        return resp, before + resp["ResponseMetadata"].get("RetryAttempts", 0) + 1

    def read_bytes(self, key: str) -> bytes:
        return b"".join(self.stream(key))

    def write_bytes(self, key: str, data: bytes, content_type: str | None = None) -> str:
        return self._upload(io.BytesIO(data), key, content_type)

    def upload_file(self, path: Path, key: str) -> str:
        with Path(path).open("rb") as fh:
            return self._upload(fh, key, None)

    def _upload(self, fh: Any, key: str, content_type: str | None) -> str:
        from boto3.exceptions import S3UploadFailedError
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"ContentType": content_type} if content_type else None
        config = TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=max(8 << 20, self.multipart_threshold // 8),
            use_threads=True,
        )
        try:
            self.client.upload_fileobj(
                fh, self.bucket, self._key(key), ExtraArgs=extra, Config=config
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc
        except S3UploadFailedError as exc:
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, (ClientError, BotoCoreError)):
                raise self._translate(cause, key) from exc
            raise StorageError(f"{self.uri(key)}: upload failed ({exc})") from exc
        return self.uri(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", []):
                    key = obj["Key"][len(self.prefix) :]
                    if key.endswith("/"):  # folder marker
                        continue
                    yield ObjectInfo(key=key, size=obj["Size"], etag=obj["ETag"].strip('"'))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, prefix) from exc

    def head(self, key: str) -> ObjectInfo:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc
        return ObjectInfo(key=key, size=resp["ContentLength"], etag=resp["ETag"].strip('"'))

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, key) from exc

    def make_folder(self, prefix: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        folder = prefix if prefix.endswith("/") else prefix + "/"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(folder), Body=b"")
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, folder) from exc

    def link(self, key: str) -> str:
        """A URL of the object that carries no credentials, for links in reports and Prefect
        artifacts: on AWS the S3 console's page of the object (opened under the viewer's own
        login), on another store `{endpoint_url}/{bucket}/{key}`. Never a presigned URL: one
        holds the signer's access key id, and under an instance role its session token too."""
        full = self._key(key)
        if self.endpoint_url:
            return f"{self.endpoint_url.rstrip('/')}/{self.bucket}/{quote(full)}"
        region = self.region or self.client.meta.region_name or "us-east-1"
        return (
            f"https://console.aws.amazon.com/s3/object/{self.bucket}"
            f"?region={region}&prefix={quote(full, safe='')}"
        )
