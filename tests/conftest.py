"""Shared fixtures: an S3-compatible HTTP server (moto's server mode, 127.0.0.1, port 0) that
counts the requests it serves, fresh buckets on it, and one Prefect test harness per session.

No test patches boto3 in-process: every S3 call in the suite crosses HTTP.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

# Fake credentials for the local servers; never real ones, never another address than 127.0.0.1.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,models,config,flows")
# Plain-function tests log through the project's loggers outside any flow run: not an error.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


@dataclass
class RequestLog:
    """Every request the S3 server served: (method, path, query)."""

    entries: list[tuple[str, str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, method: str, path: str, query: str) -> None:
        with self.lock:
            self.entries.append((method, path, query))

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()

    def count(self, method: str | None = None, path_contains: str = "") -> int:
        with self.lock:
            return sum(
                1
                for m, p, _ in self.entries
                if (method is None or m == method) and path_contains in p
            )


@dataclass
class S3Server:
    endpoint_url: str
    requests: RequestLog

    def new_bucket(self, prefix: str = "test") -> str:
        """Create a uniquely named bucket; returns its name."""
        import boto3

        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint_url).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto in server mode on 127.0.0.1 (a free port), with a request counter in front."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    log = RequestLog()
    wsgi = server._server  # the werkzeug server; wrap its app to count requests
    assert wsgi is not None
    inner = wsgi.app

    def counting_app(environ: dict[str, Any], start_response: Any) -> Any:
        log.add(
            environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
        )
        return inner(environ, start_response)

    wsgi.app = counting_app
    try:
        yield S3Server(endpoint_url=f"http://{host}:{port}", requests=log)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket on the moto server."""
    return s3_server.new_bucket()


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect API (SQLite) for every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny tensors gain nothing from more, and on a shared 2-core CPU extra
    threads only contend (several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
