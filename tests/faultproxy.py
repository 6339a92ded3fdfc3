"""A fault-injecting HTTP proxy for the S3 tests: 127.0.0.1, a free port, in front of the moto
server, so every fault crosses a real socket as boto3 would meet it.

    proxy = FaultProxy(upstream="http://127.0.0.1:5000").start()
    proxy.add(Fault("503"), method="GET", key=r"models/.*\\.pt$", nth={1, 2})
    S3Storage("s3://bkt", endpoint_url=proxy.url).read_bytes("models/m.pt")   # 3rd GET succeeds
    proxy.attempts("GET", r"models/")   # -> 3: the HTTP attempts that reached the proxy

A rule matches requests by method and a regular expression searched in the path (the bucket and
key, URL-decoded); it fires on the matching requests numbered in `nth` (1-based, counted per rule),
or on every matching one when `nth` is None. Faults (`Fault.kind`):

    500, 503        an S3 XML error (InternalError, ServiceUnavailable), the request unforwarded
    slowdown        503 with S3's `SlowDown` XML error body
    redirect        301 `PermanentRedirect` (what S3 answers for a bucket in another region)
    reset           the connection closed with a TCP reset before any reply
    stall_headers   the request forwarded, no reply for `stall_s` (then closed)
    stall_body      the reply's headers and the first `keep` bytes of its body, then no byte for
                    `stall_s` (then closed)
    cut_body        the reply's headers (full Content-Length) and `keep` bytes, then closed
    corrupt_body    the reply whole, one byte in the middle of its body flipped (only the
                    object's checksum can tell)
    cut_upload      the request's headers (full Content-Length) and `keep` bytes of its body sent to
                    the server, then both connections closed (a network cut mid-upload)
    short_upload    the request forwarded with its body cut to `keep` bytes and Content-Length
                    rewritten to match (a broken middlebox): only a checksum can tell

`keep` < 1 is a share of the body (0.5 = half). A stall ends early when the proxy stops or the
client goes away, so no test waits the whole `stall_s`.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import re
import socket
import socketserver
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "ServiceUnavailable", "Service is unable to handle request."),
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "redirect": (
        301,
        "PermanentRedirect",
        "The bucket you are attempting to access must be addressed using the specified endpoint.",
    ),
}
KINDS = set(ERRORS) | {
    "reset",
    "stall_headers",
    "stall_body",
    "cut_body",
    "corrupt_body",
    "cut_upload",
    "short_upload",
}


@dataclass(frozen=True)
class Fault:
    """One fault to inject (see the module docstring for the kinds)."""

    kind: str
    keep: float = 0.5  # bytes of the body passed on: a share (< 1) or a count
    stall_s: float = 30.0  # how long a stall lasts at most

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault {self.kind!r}; known: {sorted(KINDS)}")

    def kept(self, size: int) -> int:
        n = int(size * self.keep) if self.keep < 1 else int(self.keep)
        return max(0, min(n, size - 1)) if size else 0


@dataclass
class Rule:
    fault: Fault
    method: str | None
    key: re.Pattern[str]
    nth: set[int] | None
    share: float | None
    seen: int = 0
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.key.search(path))


@dataclass
class Seen:
    """One request that reached the proxy and the fault it met (None: forwarded untouched)."""

    method: str
    path: str
    query: str
    fault: str | None
    headers: dict[str, str]  # the request's headers, names in lower case
    connection: int = 0  # which client connection it came on (1, 2, ... in the order opened)


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    log: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        parts = urlsplit(self.upstream)
        self._up = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server: socketserver.ThreadingTCPServer | None = None
        self._connections = 0

    # --- set-up ------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.connection, self.rfile)

        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("proxy not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(
        self,
        fault: Fault,
        method: str | None = None,
        key: str = "",
        nth: set[int] | None = None,
        share: float | None = None,
    ) -> Rule:
        """Inject `fault` into matching requests: the `nth` ones, a `share` of them (every
        1/share-th, deterministic), or all when both are None."""
        rule = Rule(fault, method, re.compile(key), nth, share)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def seen(self, method: str | None = None, key: str = "") -> list[Seen]:
        """The requests that reached the proxy, of one method and path matching `key`."""
        pattern = re.compile(key)
        with self._lock:
            return [
                s
                for s in self.log
                if (method is None or s.method == method) and pattern.search(s.path)
            ]

    def attempts(self, method: str | None = None, key: str = "", fault: str | None = "") -> int:
        """Requests that reached the proxy (optionally: of one method, path matching `key`, and
        meeting one fault kind; `fault=None` counts the untouched ones)."""
        pattern = re.compile(key)
        with self._lock:
            return sum(
                1
                for s in self.log
                if (method is None or s.method == method)
                and pattern.search(s.path)
                and (fault == "" or s.fault == fault)
            )

    # --- serving -----------------------------------------------------------------------------

    def _pick(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for rule in self.rules:
                if not rule.matches(method, path):
                    continue
                rule.seen += 1
                if rule.nth is not None:
                    hit = rule.seen in rule.nth
                elif rule.share is not None:
                    hit = int(rule.seen * rule.share) > int((rule.seen - 1) * rule.share)
                else:
                    hit = True
                if hit:
                    rule.fired += 1
                    return rule.fault
        return None

    def _serve(self, client: socket.socket, rfile: object) -> None:
        reader = rfile  # a buffered reader over the client socket
        with self._lock:
            self._connections += 1
            connection = self._connections
        while not self._stop.is_set():
            line = reader.readline()  # type: ignore[attr-defined]
            if not line or not line.strip():
                return
            method, target, _ = line.decode("latin-1").split(" ", 2)
            headers: list[tuple[str, str]] = []
            while True:
                h = reader.readline()  # type: ignore[attr-defined]
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers.append((name.strip(), value.strip()))
            lower = {k.lower(): v for k, v in headers}
            if lower.get("expect", "").lower() == "100-continue":
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                headers = [(k, v) for k, v in headers if k.lower() != "expect"]
            size = int(lower.get("content-length", "0") or 0)
            body = reader.read(size) if size else b""  # type: ignore[attr-defined]
            path, _, query = target.partition("?")
            fault = self._pick(method, unquote(path))
            with self._lock:
                self.log.append(
                    Seen(
                        method,
                        unquote(path),
                        query,
                        fault.kind if fault else None,
                        lower,
                        connection,
                    )  # fmt: skip
                )
            if not self._answer(client, method, target, headers, body, fault):
                return

    def _answer(
        self,
        client: socket.socket,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: Fault | None,
    ) -> bool:
        """Reply to one request; False when the connection is closed afterwards."""
        kind = fault.kind if fault else None
        if fault is not None and kind in ERRORS:
            status, code, message = ERRORS[fault.kind]
            xml = (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Error><Code>{code}</Code><Message>{message}</Message>"
                f"<RequestId>faultproxy</RequestId></Error>"
            ).encode()
            reason = http.client.responses.get(status, "Error")
            client.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(xml)}\r\n\r\n".encode()
                + (xml if method != "HEAD" else b"")
            )
            return True
        if kind == "reset":
            _reset(client)
            return False
        if fault is not None and kind == "cut_upload":
            up = http.client.HTTPConnection(*self._up, timeout=30)
            up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                up.putheader(k, v)
            up.endheaders()
            up.send(body[: fault.kept(len(body))])
            up.close()
            _reset(client)
            return False
        if fault is not None and kind == "short_upload":
            body = body[: fault.kept(len(body))]
            headers = [
                (k, str(len(body)) if k.lower() == "content-length" else v) for k, v in headers
            ]
        status, reason, resp_headers, resp_body = self._forward(method, target, headers, body)
        if fault is not None and kind == "stall_headers":
            self._stall(client, fault.stall_s)
            return False
        head = f"HTTP/1.1 {status} {reason}\r\n"
        for k, v in resp_headers:
            if k.lower() in ("transfer-encoding", "connection", "content-length"):
                continue
            head += f"{k}: {v}\r\n"
        length = resp_headers_length(resp_headers, resp_body, method)
        head += f"Content-Length: {length}\r\n\r\n"
        payload = b"" if method == "HEAD" else resp_body
        if fault is not None and kind == "corrupt_body" and payload:
            middle = len(payload) // 2  # one byte flipped, the length kept
            payload = payload[:middle] + bytes([payload[middle] ^ 0xFF]) + payload[middle + 1 :]
        if fault is not None and kind in ("stall_body", "cut_body") and payload:
            client.sendall(head.encode("latin-1") + payload[: fault.kept(len(payload))])
            if kind == "stall_body":
                self._stall(client, fault.stall_s)
            client.close()
            return False
        client.sendall(head.encode("latin-1") + payload)
        return True

    def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, str, list[tuple[str, str]], bytes]:
        up = http.client.HTTPConnection(*self._up, timeout=60)
        try:
            up.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
            for k, v in headers:
                up.putheader(k, v)
            up.endheaders(body if body else None)
            resp = up.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            up.close()

    def _stall(self, client: socket.socket, seconds: float) -> None:
        """Send nothing for `seconds`, ending early when the proxy stops or the client hangs up."""
        client.settimeout(0.05)
        waited = 0.0
        while waited < seconds and not self._stop.is_set():
            try:
                if client.recv(1, socket.MSG_PEEK) == b"":
                    return  # the client gave up (its read timeout) and closed
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                return
            waited += 0.05


def resp_headers_length(headers: list[tuple[str, str]], body: bytes, method: str) -> int:
    """The Content-Length to promise: the upstream's for a HEAD (no body), else the body's."""
    if method == "HEAD":
        for k, v in headers:
            if k.lower() == "content-length":
                return int(v)
        return 0
    return len(body)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0) instead of an orderly FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


# --- a store that checks upload checksums, as S3 does ---------------------------------------


def checking_checksums(app: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap moto's WSGI app so that an upload whose body does not match its `Content-MD5` or
    `x-amz-checksum-crc32` header is refused with S3's 400 `BadDigest`, as S3 refuses it.

    moto 5.2.5 stores the body it receives and echoes the checksum it was given without checking
    it (moto/s3/responses.py `_get_checksum`: "TODO: AWS computes the provided value and
    verifies it's the same"), so without this a body cut short in transit would be stored."""

    def checked(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        if environ["REQUEST_METHOD"] not in ("PUT", "POST") or not size:
            return app(environ, start_response)
        body = environ["wsgi.input"].read(size)
        environ["wsgi.input"] = io.BytesIO(body)
        want_md5 = environ.get("HTTP_CONTENT_MD5")
        want_crc = environ.get("HTTP_X_AMZ_CHECKSUM_CRC32")
        bad = (want_md5 and want_md5 != base64.b64encode(hashlib.md5(body).digest()).decode()) or (
            want_crc and want_crc != base64.b64encode(zlib.crc32(body).to_bytes(4, "big")).decode()
        )
        CHECKED.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), bool(want_crc)))
        if not bad:
            return app(environ, start_response)
        xml = (
            b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>BadDigest</Code><Message>'
            b"The CRC32 you specified did not match the calculated checksum.</Message></Error>"
        )
        start_response(
            "400 Bad Request",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(xml)))],
        )
        return [xml]

    return checked


# (method, path, carried x-amz-checksum-crc32) of every upload the checking store saw.
CHECKED: list[tuple[str, str, bool]] = []


@contextmanager
def checking_moto() -> Iterator[str]:
    """moto's server on 127.0.0.1 (a free port), checking upload checksums as S3 does
    (`checking_checksums`); yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    wsgi = server._server
    if wsgi is None:
        raise RuntimeError("moto's server did not start")
    wsgi.app = checking_checksums(wsgi.app)
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
