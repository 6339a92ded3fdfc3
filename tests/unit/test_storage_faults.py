"""Storage faults through a fault-injecting proxy (tests/faultproxy.py) in front of moto's server:
500, 503 and SlowDown replies, reset connections, stalled and cut bodies on reads and writes.

Transient faults are retried and the operation succeeds; a persistent one fails after exactly
`storage.max_attempts` HTTP attempts (counted at the proxy) with an error naming the bucket, the
key and the fault; a short body is never returned as the object, and an upload cut in transit
never leaves a short object under its key. Nothing here reads a clock: attempts are counted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from config.schema import StorageConfig
from tasks.errors import StorageError, StorageUnavailable, Throttled, is_transient_error
from tasks.io import storage
from tasks.io.storage import S3Storage, open_storage, request_wait_s, worst_case_wait_s
from tests import faultproxy
from tests.faultproxy import Fault, FaultProxy

DATA = bytes(range(256)) * 2000  # 512 KB: several chunks, a body worth cutting
FAST = dict(connect_timeout_s=2.0, read_timeout_s=0.5)  # a stall is given up at once


@pytest.fixture(scope="module")
def checking_server() -> Iterator[str]:
    """moto's server on 127.0.0.1, refusing uploads whose checksum does not match (as S3 does)."""
    with faultproxy.checking_moto() as url:
        yield url


@pytest.fixture
def proxy(checking_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(checking_server).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def bucket(checking_server: str) -> str:
    import uuid

    name = f"faults-{uuid.uuid4().hex[:12]}"
    direct(checking_server).create_bucket(Bucket=name)
    return name


def direct(endpoint: str) -> Any:
    """A plain client straight to the server (no proxy), to plant and check objects."""
    return boto3.client("s3", endpoint_url=endpoint)


def store_via(proxy: FaultProxy, bucket: str, attempts: int = 3, **kw: Any) -> S3Storage:
    return S3Storage(
        f"s3://{bucket}", endpoint_url=proxy.url, max_attempts=attempts, **{**FAST, **kw}
    )


READ_FAULTS = ["500", "503", "slowdown", "reset", "stall_headers", "stall_body", "cut_body"]
WRITE_FAULTS = ["500", "503", "slowdown", "reset", "stall_headers", "cut_upload", "short_upload"]


@pytest.mark.parametrize("kind", READ_FAULTS)
def test_a_transient_fault_on_a_read_is_retried_and_the_read_succeeds(
    proxy: FaultProxy, bucket: str, checking_server: str, kind: str
) -> None:
    direct(checking_server).put_object(Bucket=bucket, Key="models/m.pt", Body=DATA)
    proxy.add(Fault(kind), method="GET", key=r"/models/m\.pt$", nth={1})
    store = store_via(proxy, bucket)
    assert store.read_bytes("models/m.pt") == DATA
    assert proxy.attempts("GET", "models/m.pt") == 2  # the faulted one, then one that worked
    assert proxy.attempts("GET", "models/m.pt", fault=kind) == 1


def test_a_body_cut_midway_is_read_on_from_the_byte_it_reached_of_the_same_version(
    proxy: FaultProxy, bucket: str, checking_server: str
) -> None:
    put = direct(checking_server).put_object(Bucket=bucket, Key="k.bin", Body=DATA)
    proxy.add(Fault("cut_body", keep=100_000), method="GET", key="k.bin", nth={1})
    store = store_via(proxy, bucket)
    chunks = list(store.stream("k.bin", chunk_size=10_000))
    assert b"".join(chunks) == DATA
    first, again = proxy.seen("GET", "k.bin")
    assert "range" not in first.headers
    assert again.headers["range"] == "bytes=100000-"
    assert again.headers["if-match"] == put["ETag"]


def test_an_object_replaced_while_its_body_broke_is_not_spliced(
    proxy: FaultProxy, bucket: str, checking_server: str
) -> None:
    s3 = direct(checking_server)
    s3.put_object(Bucket=bucket, Key="k.bin", Body=DATA)
    proxy.add(Fault("cut_body", keep=100_000), method="GET", key="k.bin", nth={1})
    chunks = store_via(proxy, bucket).stream("k.bin", chunk_size=10_000)
    got = next(chunks)  # the reply is under way (and cut) ...
    s3.put_object(Bucket=bucket, Key="k.bin", Body=b"new version" * 1000)  # ... and replaced
    with pytest.raises(StorageUnavailable, match="changed while it was being read") as exc:
        for chunk in chunks:
            got += chunk
    assert f"s3://{bucket}/k.bin" in str(exc.value) and is_transient_error(exc.value)
    assert DATA.startswith(got) and len(got) == 100_000  # never bytes of the other version


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("500", StorageUnavailable, "InternalError"),
        ("503", Throttled, "ServiceUnavailable"),
        ("slowdown", Throttled, "SlowDown"),
        ("reset", StorageUnavailable, "cannot reach the store"),
        ("stall_headers", StorageUnavailable, "went silent"),
        ("stall_body", StorageUnavailable, "body broke at byte"),
        ("cut_body", StorageUnavailable, "body broke at byte"),
    ],
)
@pytest.mark.parametrize("attempts", [1, 3])
def test_a_persistent_fault_on_a_read_fails_after_the_configured_attempts_naming_it(
    proxy: FaultProxy,
    bucket: str,
    checking_server: str,
    kind: str,
    error: type[StorageError],
    words: str,
    attempts: int,
) -> None:
    direct(checking_server).put_object(Bucket=bucket, Key="models/m.pt", Body=DATA)
    proxy.add(Fault(kind), method="GET", key="models/m.pt")
    store = store_via(proxy, bucket, attempts=attempts)
    with pytest.raises(error) as exc:
        store.read_bytes("models/m.pt")  # a short body is never returned
    message = str(exc.value)
    assert f"s3://{bucket}/models/m.pt" in message and words in message, message
    assert f"after {attempts} attempt" in message, message
    assert is_transient_error(exc.value)  # the step retries it later
    assert proxy.attempts("GET", "models/m.pt") == attempts


def botocore_gets(store: S3Storage) -> list[str]:
    """The GetObject calls that go through botocore's request pipeline, seen with botocore's
    own event hooks (the lean GET makes none)."""
    calls: list[str] = []
    store.client.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: calls.append(params["url_path"])
    )
    store.rest.meta.events.register(
        "before-call.s3.GetObject", lambda params, **_: calls.append(params["url_path"])
    )
    return calls


def test_reads_take_the_lean_get_and_botocore_only_the_attempts_after_a_fault(
    proxy: FaultProxy, bucket: str, checking_server: str
) -> None:
    s3 = direct(checking_server)
    s3.put_object(Bucket=bucket, Key="dataset/a b+c.wav", Body=DATA)
    s3.put_object(Bucket=bucket, Key="models/m.pt", Body=DATA)
    store = store_via(proxy, bucket)
    calls = botocore_gets(store)
    assert store.read_bytes("dataset/a b+c.wav") == DATA  # a key that needs quoting, signed
    assert b"".join(store.stream("models/m.pt", chunk_size=10_000)) == DATA
    assert calls == [] and proxy.attempts("GET", "models/m.pt") == 1
    proxy.add(Fault("503"), method="GET", key="models/m.pt", nth={1})
    assert store.read_bytes("models/m.pt") == DATA
    assert len(calls) == 1  # the retry, through botocore
    assert proxy.attempts("GET", "models/m.pt") == 3
    with pytest.raises(storage.ObjectNotFound, match="no such object"):
        store.read_bytes("models/gone.pt")
    assert len(calls) == 1  # a 404 is final: no retry


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_redirect_hands_the_read_and_every_later_one_to_botocore(
    proxy: FaultProxy, bucket: str, checking_server: str, attempts: int
) -> None:
    direct(checking_server).put_object(Bucket=bucket, Key="models/m.pt", Body=DATA)
    proxy.add(Fault("redirect"), method="GET", key="models/m.pt", nth={1})
    store = store_via(proxy, bucket, attempts=attempts)
    calls = botocore_gets(store)
    assert store.read_bytes("models/m.pt") == DATA  # even with a single attempt
    assert store.read_bytes("models/m.pt") == DATA
    assert len(calls) == 2 and store.lean() is None  # both through botocore
    assert proxy.attempts("GET", "models/m.pt") == 3


def test_a_stream_closed_near_its_end_keeps_the_connection_and_one_closed_early_drops_it(
    proxy: FaultProxy, bucket: str, checking_server: str
) -> None:
    big = DATA * 4  # 2 MB: closed after its first 100 KB, most of it is never fetched
    s3 = direct(checking_server)
    s3.put_object(Bucket=bucket, Key="near.bin", Body=DATA)
    s3.put_object(Bucket=bucket, Key="big.bin", Body=big)
    s3.put_object(Bucket=bucket, Key="next.bin", Body=b"x")
    store = store_via(proxy, bucket)

    def first_chunk_then_close(key: str, size: int) -> bytes:
        chunks = store.stream(key, chunk_size=size)
        try:
            return next(chunks)
        finally:
            chunks.close()

    # 512 KB read in 400 KB: 112 KB left, within DRAIN_BYTES
    assert first_chunk_then_close("near.bin", 400_000) == DATA[:400_000]
    assert store.read_bytes("next.bin") == b"x"
    near, after = proxy.seen("GET", "near.bin")[0], proxy.seen("GET", "next.bin")[0]
    assert after.connection == near.connection  # read out, so the connection was kept
    assert first_chunk_then_close("big.bin", 100_000) == big[:100_000]
    assert store.read_bytes("next.bin") == b"x"
    cut, again = proxy.seen("GET", "big.bin")[0], proxy.seen("GET", "next.bin")[1]
    assert again.connection != cut.connection  # 1.9 MB left: cut, not read


@pytest.mark.parametrize("attempts", [1, 3])
def test_a_body_corrupted_in_transit_is_refused_by_its_checksum(
    proxy: FaultProxy, bucket: str, checking_server: str, attempts: int
) -> None:
    direct(checking_server).put_object(Bucket=bucket, Key="models/m.pt", Body=DATA)
    proxy.add(Fault("corrupt_body"), method="GET", key="models/m.pt", nth={1})
    store = store_via(proxy, bucket, attempts=attempts)
    with pytest.raises(StorageUnavailable, match="checksum mismatch") as exc:
        store.read_bytes("models/m.pt")
    assert f"s3://{bucket}/models/m.pt" in str(exc.value) and is_transient_error(exc.value)
    assert store.read_bytes("models/m.pt") == DATA  # the next read is not corrupted


@pytest.mark.parametrize("kind", WRITE_FAULTS)
def test_a_transient_fault_on_a_write_is_retried_and_the_whole_object_is_stored(
    proxy: FaultProxy, bucket: str, checking_server: str, kind: str
) -> None:
    proxy.add(Fault(kind), method="PUT", key="reports/r.html", nth={1})
    store = store_via(proxy, bucket)
    if kind == "short_upload":
        # The store refuses the short body (BadDigest, not retried by botocore); the step's
        # retry writes it again.
        with pytest.raises(StorageUnavailable, match="does not match the checksum") as exc:
            store.write_bytes("reports/r.html", DATA)
        assert is_transient_error(exc.value)
        assert "Contents" not in direct(checking_server).list_objects_v2(Bucket=bucket)
    store.write_bytes("reports/r.html", DATA)
    body = direct(checking_server).get_object(Bucket=bucket, Key="reports/r.html")["Body"]
    assert body.read() == DATA
    assert proxy.attempts("PUT", "reports/r.html") == 2


@pytest.mark.parametrize(
    ("kind", "error", "words"),
    [
        ("503", Throttled, "ServiceUnavailable"),
        ("slowdown", Throttled, "SlowDown"),
        ("reset", StorageUnavailable, "cannot reach the store"),
        ("cut_upload", StorageUnavailable, "cannot reach the store"),
        ("short_upload", StorageUnavailable, "BadDigest"),
    ],
)
def test_a_failed_upload_leaves_the_previous_version_under_the_key(
    proxy: FaultProxy,
    bucket: str,
    checking_server: str,
    kind: str,
    error: type[StorageError],
    words: str,
) -> None:
    s3 = direct(checking_server)
    s3.put_object(Bucket=bucket, Key="models/mid/champion.json", Body=b'{"run": "r1"}')
    proxy.add(Fault(kind), method="PUT", key="models/")
    store = store_via(proxy, bucket)
    with pytest.raises(error, match=words) as exc:
        store.write_bytes("models/mid/champion.json", DATA)
    assert f"s3://{bucket}/models/mid/champion.json" in str(exc.value)
    with pytest.raises(error, match=words):
        store.write_bytes("models/mid/r2/model.pt", DATA)
    got = s3.get_object(Bucket=bucket, Key="models/mid/champion.json")["Body"].read()
    assert got == b'{"run": "r1"}'  # the previous complete version
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert "models/mid/r2/model.pt" not in listed  # absent, never a short one


@pytest.mark.parametrize("kind", ["cut_upload", "short_upload"])
def test_a_multipart_upload_cut_in_one_part_never_stores_a_short_object(
    proxy: FaultProxy, bucket: str, checking_server: str, tmp_path: Path, kind: str
) -> None:
    s3 = direct(checking_server)
    s3.put_object(Bucket=bucket, Key="models/big.pt", Body=b"previous")
    path = tmp_path / "big.pt"
    path.write_bytes(os.urandom(12 << 20))  # two parts of 8 MB and 4 MB
    store = store_via(proxy, bucket, multipart_threshold=5 << 20, read_timeout_s=10.0)
    faultproxy.CHECKED.clear()
    # The second part's every attempt is cut: the upload fails and is aborted.
    proxy.add(Fault(kind), method="PUT", key="models/big.pt", nth={2, 3, 4})
    with pytest.raises(StorageUnavailable):
        store.upload_file(path, "models/big.pt")
    assert s3.get_object(Bucket=bucket, Key="models/big.pt")["Body"].read() == b"previous"
    assert proxy.attempts("DELETE", "models/big.pt") == 1  # AbortMultipartUpload
    # Once the fault is gone the same upload stores the whole file, every part with its CRC32.
    proxy.clear()
    faultproxy.CHECKED.clear()
    store.upload_file(path, "models/big.pt")
    assert s3.get_object(Bucket=bucket, Key="models/big.pt")["Body"].read() == path.read_bytes()
    parts = [c for c in faultproxy.CHECKED if c[0] == "PUT"]
    assert len(parts) == 2 and all(crc for _, _, crc in parts)


def test_every_upload_carries_a_crc32_even_where_the_environment_asks_for_none(
    proxy: FaultProxy, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
    store = store_via(proxy, bucket)
    store.write_bytes("a.json", b"{}")
    store.write_bytes("b.bin", DATA)
    assert all("x-amz-checksum-crc32" in s.headers for s in proxy.seen("PUT"))


def test_a_share_of_requests_failing_slows_reads_but_loses_nothing(
    proxy: FaultProxy, bucket: str, checking_server: str
) -> None:
    s3 = direct(checking_server)
    for i in range(12):
        s3.put_object(Bucket=bucket, Key=f"dataset/audio/real/{i}.wav", Body=DATA[: 1000 + i])
    proxy.add(Fault("503"), method="GET", key="dataset/", share=0.25)  # every 4th GET
    proxy.add(Fault("cut_body"), method="GET", key="dataset/", share=0.25)
    store = store_via(proxy, bucket)
    for i in range(12):
        assert store.read_bytes(f"dataset/audio/real/{i}.wav") == DATA[: 1000 + i]
    faulted = proxy.attempts("GET", "dataset/", fault="503") + proxy.attempts(
        "GET", "dataset/", fault="cut_body"
    )
    assert faulted > 0 and proxy.attempts("GET", "dataset/") == 12 + faulted


def test_settings_reach_the_client(bucket: str, checking_server: str) -> None:
    cfg = StorageConfig(
        uri=f"s3://{bucket}",
        endpoint_url=checking_server,
        max_attempts=4,
        connect_timeout_s=3.0,
        read_timeout_s=7.0,
    )
    store = open_storage(cfg)
    assert isinstance(store, S3Storage)
    config = store.client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (3.0, 7.0)
    assert config.retries == {"total_max_attempts": 4, "mode": "standard"}
    assert store.once.meta.config.retries["total_max_attempts"] == 1


def test_worst_case_wait_adds_up_the_settings() -> None:
    cfg = StorageConfig(max_attempts=3, connect_timeout_s=5.0, read_timeout_s=15.0)
    # 3 attempts x (5 + 15) s of silence, then the backoff before retries 1 and 2: (1 + 5), (2 + 5)
    assert request_wait_s(cfg) == 3 * 20 + 6 + 7 == 73
    # Five step attempts with Prefect's delays between them.
    assert worst_case_wait_s(cfg, [3.0, 6.0, 12.0, 24.0]) == 5 * 73 + 45
    assert worst_case_wait_s(cfg, [3.0, 6.0, 12.0, 24.0], multipart=True) == 5 * 146 + 45
    assert worst_case_wait_s(StorageConfig(max_attempts=1), []) == (
        StorageConfig().connect_timeout_s + StorageConfig().read_timeout_s
    )
    # botocore's cap: retries past the 6th wait at most 20 s (+ 5 s of retry-after) each
    assert storage.backoff_bound_s(10) == 25.0


def test_a_local_upload_failing_half_way_keeps_the_previous_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = open_storage(StorageConfig(uri=str(tmp_path / "bucket")))
    store.check()
    store.write_bytes("outputs/models/mid/champion.json", b'{"run": "r1"}')
    source = tmp_path / "new.json"
    source.write_bytes(DATA)

    def half_then_fail(src: Path, dst: str) -> None:
        Path(dst).write_bytes(Path(src).read_bytes()[: len(DATA) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(storage.shutil, "copyfile", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        store.upload_file(source, "outputs/models/mid/champion.json")
    assert store.read_bytes("outputs/models/mid/champion.json") == b'{"run": "r1"}'
    folder = tmp_path / "bucket" / "outputs" / "models" / "mid"
    assert [p.name for p in folder.iterdir()] == ["champion.json"]  # no temp file left
