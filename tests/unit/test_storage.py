"""One contract, two backends: the local folder and S3 over HTTP (moto's server mode)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from config.schema import StorageConfig
from tasks.errors import AccessDenied, BucketNotFound, ObjectNotFound, StorageError
from tasks.io import storage
from tasks.io.storage import S3Storage, Storage, open_storage


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return open_storage(StorageConfig(uri=str(tmp_path / "bucket")))
    server = request.getfixturevalue("s3_server")
    bucket = server.new_bucket()
    return open_storage(StorageConfig(uri=f"s3://{bucket}", endpoint_url=server.endpoint_url))


def test_write_read_roundtrip_and_uri(store: Storage) -> None:
    store.check()
    uri = store.write_bytes("outputs/logs/run1/a.txt", b"hello")
    assert uri == store.uri("outputs/logs/run1/a.txt")
    assert uri.startswith(("s3://", "file://"))
    assert store.read_bytes("outputs/logs/run1/a.txt") == b"hello"
    assert storage.read(store, "outputs/logs/run1/a.txt").read() == b"hello"
    store.write_bytes("outputs/logs/run1/a.txt", b"replaced")
    assert store.read_bytes("outputs/logs/run1/a.txt") == b"replaced"


def test_stream_yields_chunks(store: Storage) -> None:
    store.check()
    data = os.urandom(300_000)
    store.write_bytes("dataset/audio/real/x.wav", data)
    chunks = list(storage.stream_from_s3(store, "dataset/audio/real/x.wav", chunk_size=65536))
    assert len(chunks) >= 5
    assert all(len(c) <= 65536 for c in chunks)
    assert b"".join(chunks) == data


def test_list_is_recursive_sorted_and_has_size_and_etag(store: Storage) -> None:
    store.check()
    for key in ["dataset/images/fake/2.png", "dataset/audio/real/1.wav", "outputs/x.txt"]:
        store.write_bytes(key, key.encode())
    listed = list(store.list("dataset/"))
    assert [o.key for o in listed] == ["dataset/audio/real/1.wav", "dataset/images/fake/2.png"]
    assert listed[0].size == len(b"dataset/audio/real/1.wav")
    assert len(listed[0].etag) == 32  # md5 of the content, as S3 gives for single-part uploads
    same = store.head("dataset/audio/real/1.wav")
    assert same == listed[0]


def test_etag_changes_with_content(store: Storage) -> None:
    store.check()
    store.write_bytes("dataset/a.wav", b"one")
    first = store.head("dataset/a.wav").etag
    store.write_bytes("dataset/a.wav", b"two")
    assert store.head("dataset/a.wav").etag != first


def test_listing_paginates(store: Storage) -> None:
    store.check()
    keys = [f"dataset/audio/fake/{i:04d}.wav" for i in range(1050)]  # > one S3 page (1000)
    for key in keys:
        store.write_bytes(key, b"x")
    assert [o.key for o in store.list("dataset/audio/")] == keys


def test_missing_key_names_the_key(store: Storage) -> None:
    store.check()
    with pytest.raises(ObjectNotFound, match=r"dataset/nope\.wav: no such object"):
        store.read_bytes("dataset/nope.wav")
    with pytest.raises(ObjectNotFound, match=r"dataset/nope\.wav"):
        store.head("dataset/nope.wav")
    assert not store.exists("dataset/nope.wav")


def test_folders_are_idempotent_and_not_listed_as_objects(store: Storage) -> None:
    made = storage.create_output_folders(store, "outputs/")
    again = storage.create_s3_folder(store, "outputs/")
    assert made == again
    for name in ("models/", "plots/", "logs/", "manifests/", "cache/features/", "reports/"):
        assert f"outputs/{name}" in made
    assert list(store.list("outputs/")) == []


def test_upload_file_and_delete(store: Storage, tmp_path: Path) -> None:
    store.check()
    local = tmp_path / "model.pt"
    local.write_bytes(b"weights" * 1000)
    uri = storage.upload_to_s3(store, local, "outputs/models/mid/r1/model.pt")
    assert uri.endswith("outputs/models/mid/r1/model.pt")
    assert store.read_bytes("outputs/models/mid/r1/model.pt") == local.read_bytes()
    store.delete("outputs/models/mid/r1/model.pt")
    assert not store.exists("outputs/models/mid/r1/model.pt")


@pytest.mark.parametrize("key", ["../escape.txt", "a/../../b", "/abs/key", "a\\b", ""])
def test_bad_keys_are_refused(store: Storage, key: str) -> None:
    with pytest.raises(StorageError):
        store.write_bytes(key, b"x")


def test_link_points_at_the_object(store: Storage) -> None:
    store.check()
    store.write_bytes("outputs/reports/r/report.html", b"<html></html>")
    link = store.link("outputs/reports/r/report.html")
    assert "outputs/reports/r/report.html" in link


def test_s3_links_carry_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a presigned URL (it holds the access key id and any session token): the console's
    page of the object on AWS, the plain object URL on another store."""
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-that-must-not-appear")
    aws = S3Storage("s3://bkt/pre", region="eu-west-1")
    assert aws.link("outputs/a b+é.html") == (
        "https://console.aws.amazon.com/s3/object/bkt?region=eu-west-1"
        "&prefix=pre%2Foutputs%2Fa%20b%2B%C3%A9.html"
    )
    other = S3Storage("s3://bkt", endpoint_url="http://127.0.0.1:8333/")
    assert other.link("outputs/a b.html") == "http://127.0.0.1:8333/bkt/outputs/a%20b.html"
    for link in (aws.link("k"), other.link("k")):
        assert "token" not in link and os.environ["AWS_ACCESS_KEY_ID"] not in link


# ---- backend-specific behaviour -------------------------------------------------------------


def test_local_writes_are_atomic(tmp_path: Path) -> None:
    store = open_storage(StorageConfig(uri=f"file://{tmp_path}"))
    store.write_bytes("outputs/a.bin", b"x" * 10)
    leftovers = [p.name for p in (tmp_path / "outputs").iterdir()]
    assert leftovers == ["a.bin"]


def test_local_missing_parent_is_bucket_not_found(tmp_path: Path) -> None:
    store = open_storage(StorageConfig(uri=str(tmp_path / "no" / "such" / "bucket")))
    with pytest.raises(BucketNotFound, match="does not exist"):
        store.check()


def test_s3_missing_bucket_names_the_bucket(s3_server) -> None:  # type: ignore[no-untyped-def]
    store = open_storage(
        StorageConfig(uri="s3://no-such-bucket-xyz", endpoint_url=s3_server.endpoint_url)
    )
    with pytest.raises(BucketNotFound, match="s3://no-such-bucket-xyz: bucket does not exist"):
        storage.create_output_folders(store)
    with pytest.raises(BucketNotFound, match="no-such-bucket-xyz"):
        list(store.list("dataset/"))
    with pytest.raises(BucketNotFound, match="no-such-bucket-xyz"):
        store.read_bytes("dataset/a.wav")


def test_s3_prefix_in_uri_scopes_every_key(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    store = open_storage(
        StorageConfig(uri=f"s3://{s3_bucket}/team/a", endpoint_url=s3_server.endpoint_url)
    )
    store.write_bytes("outputs/x.txt", b"1")
    raw = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys == ["team/a/outputs/x.txt"]
    assert [o.key for o in store.list("outputs/")] == ["outputs/x.txt"]
    assert store.uri("outputs/x.txt") == f"s3://{s3_bucket}/team/a/outputs/x.txt"


def test_s3_large_upload_goes_multipart(s3_server, s3_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store = S3Storage(
        f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url, multipart_threshold=5 << 20
    )
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(12 << 20))
    s3_server.requests.clear()
    store.upload_file(local, "outputs/models/big.bin")
    assert s3_server.requests.count("POST", "/outputs/models/big.bin") >= 2  # create + complete
    assert store.head("outputs/models/big.bin").size == 12 << 20
    assert "-" in store.head("outputs/models/big.bin").etag  # multipart ETag


def test_s3_bad_credentials_are_access_denied(s3_server, s3_bucket: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # moto accepts any key by default; a bucket policy denying everything gives a real 403.
    raw = boto3.client("s3", endpoint_url=s3_server.endpoint_url)
    raw.put_object(Bucket=s3_bucket, Key="dataset/secret.wav", Body=b"x")
    policy = (
        '{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Principal":"*",'
        f'"Action":"s3:GetObject","Resource":"arn:aws:s3:::{s3_bucket}/dataset/*"}}]}}'
    )
    raw.put_bucket_policy(Bucket=s3_bucket, Policy=policy)
    store = open_storage(
        StorageConfig(uri=f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    )
    try:
        store.read_bytes("dataset/secret.wav")
    except AccessDenied as exc:
        assert f"s3://{s3_bucket}/dataset/secret.wav: access denied" in str(exc)
    else:
        pytest.skip("this moto version does not enforce bucket policies")


def test_s3_unreachable_endpoint_is_transient() -> None:
    from tasks.errors import StorageUnavailable, is_transient_error

    store = S3Storage("s3://b", endpoint_url="http://127.0.0.1:9", max_attempts=1)
    with pytest.raises(StorageUnavailable, match="cannot reach the store") as err:
        store.check()
    assert is_transient_error(err.value)


def test_env_endpoint_wins_over_config(s3_server, s3_bucket: str, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_storage(StorageConfig(uri=f"s3://{s3_bucket}", endpoint_url="http://127.0.0.1:9"))
    store.check()  # reaches moto, not the dead port


def test_local_files_get_ordinary_permissions(tmp_path: Path) -> None:
    store = open_storage(StorageConfig(uri=str(tmp_path)))
    store.write_bytes("outputs/reports/r/report.html", b"<html></html>")
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    store.upload_file(src, "outputs/models/m.pt")
    umask = os.umask(0)
    os.umask(umask)
    for rel in ("outputs/reports/r/report.html", "outputs/models/m.pt"):
        assert (tmp_path / rel).stat().st_mode & 0o777 == 0o666 & ~umask


def test_s3_client_is_shared_by_threads_and_survives_pickling(s3_server, s3_bucket: str) -> None:  # type: ignore[no-untyped-def]
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    store = S3Storage(f"s3://{s3_bucket}", endpoint_url=s3_server.endpoint_url)
    with ThreadPoolExecutor(4) as pool:
        clients = set(pool.map(lambda _: id(store.client), range(8)))
    assert len(clients) == 1
    copy = pickle.loads(pickle.dumps(store))
    copy.write_bytes("outputs/p.txt", b"ok")
    assert store.read_bytes("outputs/p.txt") == b"ok"
