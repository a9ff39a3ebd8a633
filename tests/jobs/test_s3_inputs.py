"""S3InputFetcher against a real S3-compatible server (nanio) on loopback: job inputs copied to disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("boto3")
pytest.importorskip("nanio")

from jobs.settings import Settings
from jobs.storage.base import StorageError
from jobs.storage.s3_inputs import InputNotFound, InputRefused, S3InputFetcher, relative_name, split_uri
from tests.service_fixtures import nanio_server

ACCESS, SECRET, BUCKET = "prunein", "prunein-secret-key", "models"
FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x01" * 70_000,
    "tokenizer/tokenizer.json": b'{"v": 1}',
}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with nanio_server(tmp_path_factory.mktemp("nanio-in"), ACCESS, SECRET) as url:
        yield url


@pytest.fixture(scope="module")
def fetcher(endpoint: str) -> S3InputFetcher:
    f = S3InputFetcher(
        endpoint_url=endpoint, access_key=ACCESS, secret_key=SECRET, max_attempts=2, backoff=0.05
    )
    client = f._client
    client.create_bucket(Bucket=BUCKET)
    for name, body in FILES.items():
        client.put_object(Bucket=BUCKET, Key=f"team/smol/{name}", Body=body)
    client.put_object(Bucket=BUCKET, Key="team/smolx/decoy.bin", Body=b"not part of smol")
    client.put_object(Bucket=BUCKET, Key="team/model.gguf", Body=b"GGUF" + b"\0" * 100)
    return f


def test_directory_is_copied_with_its_layout(fetcher: S3InputFetcher, tmp_path: Path) -> None:
    got = fetcher.fetch(f"s3://{BUCKET}/team/smol/", tmp_path / "model")
    assert got == tmp_path / "model"
    copied = {p.relative_to(got).as_posix(): p.read_bytes() for p in got.rglob("*") if p.is_file()}
    assert copied == FILES  # the sibling prefix team/smolx/ is not copied


def test_single_object_is_copied_as_a_file(fetcher: S3InputFetcher, tmp_path: Path) -> None:
    got = fetcher.fetch(f"s3://{BUCKET}/team/model.gguf", tmp_path / "model")
    assert got == tmp_path / "model" / "model.gguf"
    assert got.read_bytes() == b"GGUF" + b"\0" * 100


def test_missing_input_is_not_found_and_writes_nothing(fetcher: S3InputFetcher, tmp_path: Path) -> None:
    with pytest.raises(InputNotFound, match=f"s3://{BUCKET}/team/nope"):
        fetcher.fetch(f"s3://{BUCKET}/team/nope", tmp_path / "model")
    assert not (tmp_path / "model").exists()
    with pytest.raises(StorageError, match="NoSuchBucket"):
        fetcher.fetch("s3://no-such-bucket/x", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_input_above_the_size_cap_is_refused_before_copying(endpoint: str, tmp_path: Path) -> None:
    small = S3InputFetcher(endpoint_url=endpoint, access_key=ACCESS, secret_key=SECRET, max_bytes=50_000)
    with pytest.raises(InputRefused, match="input limit"):
        small.fetch(f"s3://{BUCKET}/team/smol", tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_cancel_between_files_removes_the_partial_copy(fetcher: S3InputFetcher, tmp_path: Path) -> None:
    calls = []

    def cancel_on_second() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(InterruptedError):
        fetcher.fetch(f"s3://{BUCKET}/team/smol", tmp_path / "model", cancel_on_second)
    assert len(calls) == 2
    assert not (tmp_path / "model").exists()


def test_wrong_credentials_are_a_storage_error(endpoint: str, tmp_path: Path) -> None:
    bad = S3InputFetcher(
        endpoint_url=endpoint, access_key=ACCESS, secret_key="wrong-secret-key", max_attempts=1
    )
    with pytest.raises(StorageError, match="refused"):
        bad.fetch(f"s3://{BUCKET}/team/smol", tmp_path / "model")
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("key", ["m/x/../../etc/passwd", "m/x/./a", "m/x//a", "m/x/a\\b", "m/x/.."])
def test_escaping_object_names_are_refused(key: str) -> None:
    with pytest.raises(InputRefused, match="leave the model directory"):
        relative_name(key, "m/x")


def test_relative_names_and_uris() -> None:
    assert relative_name("m/x/a/b.json", "m/x") == "a/b.json"
    assert relative_name("m/x/dir/", "m/x") is None
    assert split_uri("s3://b/k/p/") == ("b", "k/p")
    for bad in ("s3://b", "s3:///k", "http://b/k"):
        with pytest.raises(InputRefused):
            split_uri(bad)


def test_from_settings_falls_back_to_the_artifact_store_settings() -> None:
    env = {
        "PRUNE_S3_ENDPOINT": "http://store:9000",
        "PRUNE_S3_SOURCE_ENDPOINT": "http://models:9000",
        "PRUNE_S3_ACCESS_KEY": "a",
        "PRUNE_S3_SECRET_KEY": "s",
        "PRUNE_MAX_SOURCE_GB": "2",
    }
    f = S3InputFetcher.from_settings(Settings.from_env(env))
    assert f._client.meta.endpoint_url == "http://models:9000"
    assert f.max_bytes == 2 * 1024**3
    creds = f._client._request_signer._credentials
    assert (creds.access_key, creds.secret_key) == ("a", "s")
    store_only = Settings.from_env({"PRUNE_S3_ENDPOINT": "http://store:9000"})
    assert S3InputFetcher.from_settings(store_only)._client.meta.endpoint_url == "http://store:9000"
