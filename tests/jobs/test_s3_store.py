"""S3ArtifactStore against a real S3-compatible server (nanio, SigV4-verifying) on loopback."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx
import pytest

pytest.importorskip("boto3")
pytest.importorskip("nanio")

from jobs.settings import Settings
from jobs.storage.base import StorageError
from jobs.storage.s3 import INDEX_NAME, S3ArtifactStore
from scripts.stack import free_port
from tests.service_fixtures import nanio_server

ACCESS, SECRET, BUCKET = "prunetest", "prunetest-secret-key", "artifacts"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nanio_server(tmp_path_factory.mktemp("nanio-data"), ACCESS, SECRET) as url:
        yield url


@pytest.fixture(scope="module")
def store(endpoint: str) -> S3ArtifactStore:
    s = S3ArtifactStore(
        BUCKET,
        endpoint_url=endpoint,
        access_key=ACCESS,
        secret_key=SECRET,
        key_prefix="svc/",
        multipart_threshold=5 * MIB,
        multipart_chunksize=5 * MIB,
        max_attempts=2,
        backoff=0.05,
    )
    s._client.create_bucket(Bucket=BUCKET)
    return s


def _make_job_dir(root: Path) -> dict[str, bytes]:
    files = {
        "report.json": b'{"ok": true}',
        "manifest.json": b'{"files": {}}',
        "model/config.json": b"{}",
        "model/model.safetensors": os.urandom(11 * MIB + 123),  # 3 parts of 5 MiB
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def _tamper(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    q = dict(parse_qsl(parts.query))
    path = changes.pop("path", parts.path)
    q.update(changes)
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(q), ""))


def test_upload_list_and_presigned_download(store: S3ArtifactStore, tmp_path: Path) -> None:
    files = _make_job_dir(tmp_path)
    infos = store.upload_dir(tmp_path, "tenant-a/job-1")
    assert [i.name for i in infos] == sorted(files)
    for info in infos:
        assert info.size == len(files[info.name])
        assert info.sha256 == hashlib.sha256(files[info.name]).hexdigest()
    assert store.list("tenant-a/job-1") == infos
    # key layout {key_prefix}{prefix}/{name}, and the big file went multipart (ETag "<md5>-<parts>")
    head = store._client.head_object(Bucket=BUCKET, Key="svc/tenant-a/job-1/model/model.safetensors")
    assert head["ETag"].strip('"').endswith("-3")

    url = store.download_url("tenant-a/job-1", "model/model.safetensors", expires_in=300)
    assert "X-Amz-Signature=" in url and "X-Amz-Expires=300" in url
    r = httpx.get(url)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(files["model/model.safetensors"]).digest()


def test_listing_reads_only_the_index(store: S3ArtifactStore, tmp_path: Path) -> None:
    """Issue 13, item 4: the listing is one small GET of the upload's index, never the artifacts."""
    files = _make_job_dir(tmp_path)
    infos = store.upload_dir(tmp_path, "tenant-e/job-1")
    calls: list[tuple[str, str]] = []

    def record(model, params, **_: object) -> None:
        calls.append((model.name, params.get("Key", "")))

    store._client.meta.events.register("before-parameter-build.s3", record)
    try:
        listed = store.list("tenant-e/job-1")
    finally:
        store._client.meta.events.unregister("before-parameter-build.s3", record)
    assert listed == infos and sorted(i.name for i in listed) == sorted(files)
    assert calls == [("GetObject", f"svc/tenant-e/job-1/{INDEX_NAME}")]


def test_tampered_urls_are_refused(store: S3ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"alpha")
    (tmp_path / "b.txt").write_bytes(b"bravo")
    store.upload_dir(tmp_path, "tenant-a/job-2")
    url = store.download_url("tenant-a/job-2", "a.txt", expires_in=300)
    assert httpx.get(url).content == b"alpha"
    sig = dict(parse_qsl(urlsplit(url).query))["X-Amz-Signature"]
    bad_sig = _tamper(url, **{"X-Amz-Signature": ("0" if sig[0] != "0" else "1") + sig[1:]})
    other_key = _tamper(url, path=urlsplit(url).path.replace("a.txt", "b.txt"))
    longer = _tamper(url, **{"X-Amz-Expires": "3600"})
    for bad in (bad_sig, other_key, longer):
        r = httpx.get(bad)
        assert r.status_code == 403, (bad, r.status_code)
        assert b"bravo" not in r.content and b"alpha" not in r.content


def test_expired_url_is_refused(store: S3ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"x" * 10)
    store.upload_dir(tmp_path, "tenant-a/job-3")
    url = store.download_url("tenant-a/job-3", "x.bin", expires_in=1)
    time.sleep(2.2)
    r = httpx.get(url)
    assert r.status_code == 403
    assert r.content != b"x" * 10


def test_delete_prefix_is_idempotent_and_scoped(store: S3ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"1")
    store.upload_dir(tmp_path, "tenant-b/job-1")
    store.upload_dir(tmp_path, "tenant-b/job-10")
    store.delete_prefix("tenant-b/job-1")
    store.delete_prefix("tenant-b/job-1")
    assert store.list("tenant-b/job-1") == []
    assert [i.name for i in store.list("tenant-b/job-10")] == ["f"]
    keys = store._list_keys("svc/tenant-b/job-1/")
    assert keys == []


def test_failed_upload_leaves_nothing(store: S3ArtifactStore, tmp_path: Path, monkeypatch) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(name.encode() * 100)
    real = store._upload_file
    calls = []

    def flaky(path: Path, key: str):
        calls.append(key)
        if path.name == "c":
            raise StorageError("injected failure")
        return real(path, key)

    monkeypatch.setattr(store, "_upload_file", flaky)
    with pytest.raises(StorageError, match="injected"):
        store.upload_dir(tmp_path, "tenant-c/job-1")
    assert len(calls) == 3
    assert store._list_keys("svc/tenant-c/") == []
    assert store.list("tenant-c/job-1") == []


def test_index_is_commit_marker(store: S3ArtifactStore, tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"1")
    store.upload_dir(tmp_path, "tenant-d/job-1")
    store._client.delete_object(Bucket=BUCKET, Key=f"svc/tenant-d/job-1/{INDEX_NAME}")
    assert store.list("tenant-d/job-1") == []


def test_invalid_names_are_refused(store: S3ArtifactStore) -> None:
    for prefix, name in (("../x", "a"), ("t/j", "../a"), ("t/j", "/abs"), ("", "a")):
        with pytest.raises(StorageError):
            store.download_url(prefix, name, 60)


def test_check_ok_and_missing_bucket(store: S3ArtifactStore, endpoint: str) -> None:
    store.check()
    missing = S3ArtifactStore("no-such-bucket", endpoint, access_key=ACCESS, secret_key=SECRET)
    with pytest.raises(StorageError):
        missing.check()
    wrong_secret = S3ArtifactStore(BUCKET, endpoint, access_key=ACCESS, secret_key="wrong")
    with pytest.raises(StorageError):
        wrong_secret.check()


def test_unreachable_endpoint_retries_then_storage_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    s = S3ArtifactStore(
        BUCKET,
        f"http://127.0.0.1:{port}",
        access_key=ACCESS,
        secret_key=SECRET,
        max_attempts=3,
        backoff=0.05,
        connect_timeout=1,
    )
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="after 3 attempts"):
        s.check()
    assert time.monotonic() - t0 >= 0.05 + 0.1  # backoff 0.05 then 0.1
    (tmp_path / "f").write_bytes(b"1")
    with pytest.raises(StorageError):
        s.upload_dir(tmp_path, "t/j")


def test_from_settings() -> None:
    s = S3ArtifactStore.from_settings(
        Settings.from_env(
            {
                "PRUNE_S3_BUCKET": "b",
                "PRUNE_S3_ENDPOINT": "http://127.0.0.1:9",
                "PRUNE_S3_ACCESS_KEY": "a",
                "PRUNE_S3_SECRET_KEY": "s",
                "PRUNE_S3_PREFIX": "p/",
                "PRUNE_S3_PUBLIC_ENDPOINT": "https://files.example.com",
            }
        )
    )
    assert s.bucket == "b" and s.key_prefix == "p/"
    assert s.download_url("t/j", "f", 60).startswith("https://files.example.com/b/p/t/j/f?")
    with pytest.raises(StorageError):
        S3ArtifactStore.from_settings(Settings())


def test_download_dir_copies_the_indexed_files(store: S3ArtifactStore, tmp_path: Path) -> None:
    """What the gather step of a fanned-out sweep uses: every indexed file back, checked."""
    files = _make_job_dir(tmp_path / "up")
    store.upload_dir(tmp_path / "up", "tenant-a~sweep/job-v1")
    got = store.download_dir("tenant-a~sweep/job-v1", tmp_path / "down")
    assert sorted(i.name for i in got) == sorted(files)
    for name, data in files.items():
        assert (tmp_path / "down" / name).read_bytes() == data
    assert store.download_dir("tenant-a~sweep/none", tmp_path / "none") == []
