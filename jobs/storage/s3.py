"""Artifact store on S3-compatible object storage (AWS S3, MinIO, Ceph RGW, nanio), via boto3.

Layout: every file of a job lives at `{key_prefix}{prefix}/{name}`; after all files are uploaded
an index object `{key_prefix}{prefix}/.artifacts.json` (names, sizes, sha256) is written last.
The index is the commit marker: `list()` reads it, so a half-finished upload is never visible,
and a failed upload deletes every key it wrote.
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from jobs.storage.base import INDEX_NAME, ArtifactInfo, StorageError, decode_index, encode_index

if TYPE_CHECKING:
    from jobs.settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
T = TypeVar("T")


def _transient_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError

    return (BotoConnectionError, HTTPClientError, ConnectionError, TimeoutError)


def s3_session(
    region: str,
    access_key: str | None,
    secret_key: str | None,
    endpoint_url: str | None,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> tuple[Any, Any]:
    """A boto3 session and client config: SigV4, path-style addressing for custom endpoints, and a
    single botocore attempt (retries are `retrying`'s: exponential backoff, then StorageError)."""
    import boto3
    from botocore.config import Config

    config = Config(
        signature_version="s3v4",
        region_name=region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = boto3.session.Session(
        aws_access_key_id=access_key, aws_secret_access_key=secret_key, region_name=region
    )
    return session, config


def retrying(what: str, fn: Callable[[], T], max_attempts: int, backoff: float) -> T:
    """Run `fn`, retrying transient (connection/timeout) errors with exponential backoff; every
    failure ends as StorageError naming `what` (a refusal such as NoSuchKey is not retried)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError

    transient = _transient_errors()
    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except transient as exc:
            if attempt == max_attempts:
                raise StorageError(
                    f"S3 {what} failed after {attempt} attempts: {type(exc).__name__}: {exc}"
                ) from exc
            delay = backoff * 2 ** (attempt - 1)
            log.warning("S3 %s attempt %d failed (%s); retrying in %.2fs", what, attempt, exc, delay)
            time.sleep(delay)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            raise StorageError(f"S3 {what} refused: {err.get('Code')}: {err.get('Message')}") from exc
        except (BotoCoreError, S3UploadFailedError) as exc:
            raise StorageError(f"S3 {what} failed: {exc}") from exc
    raise AssertionError("unreachable")


class _HashingReader(io.RawIOBase):
    """A file wrapper that feeds sha256 with each byte the first time it is read.

    Readers may seek back and re-read (retries, checksums); only bytes beyond the furthest
    position read so far are hashed, so every byte is hashed exactly once, in order. If a
    reader ever skips ahead, `complete` is False and the caller must hash the file separately.
    """

    def __init__(self, raw: io.BufferedReader, size: int) -> None:
        super().__init__()
        self._raw = raw
        self._size = size
        self._hash = hashlib.sha256()
        self._high = 0
        self._gap = False
        self._lock = threading.Lock()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._raw.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def read(self, size: int = -1) -> bytes:
        with self._lock:
            pos = self._raw.tell()
            data = self._raw.read(size)
            end = pos + len(data)
            if end > self._high:
                if pos > self._high:
                    self._gap = True
                else:
                    self._hash.update(data[self._high - pos :])
                self._high = end
            return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    @property
    def complete(self) -> bool:
        return not self._gap and self._high == self._size

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            h.update(chunk)
    return h.hexdigest()


def unsafe_key_path(value: str) -> bool:
    """Whether a relative object path is empty, absolute, or has '', '.', '..' segments, backslashes
    or NULs (it could not be mapped safely onto a local directory)."""
    parts = value.split("/")
    return (
        not value
        or value.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or "\\" in value
        or "\x00" in value
    )


def is_missing(exc: Exception) -> bool:
    """Whether a botocore ClientError says the object does not exist."""
    return exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")  # type: ignore[attr-defined]


def list_objects(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object below `prefix` in `bucket` (all pages; not retried)."""
    found: list[tuple[str, int]] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.extend((obj["Key"], int(obj["Size"])) for obj in page.get("Contents", []))
    return found


def _check_part(value: str, what: str) -> str:
    if unsafe_key_path(value):
        raise StorageError(f"invalid artifact {what}: {value!r}")
    return value


class S3ArtifactStore:
    """ArtifactStore on an S3 bucket: multipart uploads, sha256 index, presigned (SigV4) GET URLs."""

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        key_prefix: str = "",
        *,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = 64 * MIB,
        multipart_chunksize: int = 16 * MIB,
        max_concurrency: int = 4,
        max_attempts: int = 4,
        backoff: float = 0.5,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        if not bucket:
            raise StorageError("S3 bucket name is empty")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.max_attempts = max_attempts
        self.backoff = backoff
        session, config = s3_session(
            region, access_key, secret_key, endpoint_url, connect_timeout, read_timeout
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        # SigV4 signs the Host header: URLs handed to clients must be signed for the public host.
        self._presign_client = (
            session.client("s3", endpoint_url=public_endpoint_url, config=config)
            if public_endpoint_url and public_endpoint_url != endpoint_url
            else self._client
        )
        self._transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> S3ArtifactStore:
        """Build from the PRUNE_S3_* settings (BUCKET required; ENDPOINT, REGION, ACCESS_KEY,
        SECRET_KEY, PREFIX, PUBLIC_ENDPOINT, MULTIPART_THRESHOLD_MB optional)."""
        if not settings.s3_bucket:
            raise StorageError("PRUNE_S3_BUCKET is not set")
        threshold = settings.s3_multipart_threshold_mb * MIB
        return cls(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint,
            region=settings.s3_region,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            key_prefix=settings.s3_prefix,
            public_endpoint_url=settings.s3_public_endpoint,
            multipart_threshold=threshold,
            multipart_chunksize=max(5 * MIB, min(threshold, 64 * MIB)),
        )

    # -- helpers -----------------------------------------------------------------------------

    def _base(self, prefix: str) -> str:
        return f"{self.key_prefix}{_check_part(prefix.strip('/'), 'prefix')}/"

    def _key(self, prefix: str, name: str) -> str:
        return self._base(prefix) + _check_part(name, "name")

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        return retrying(what, fn, self.max_attempts, self.backoff)

    def _list_keys(self, base: str) -> list[str]:
        return [k for k, _ in self._retry("list", lambda: list_objects(self._client, self.bucket, base))]

    def _delete_keys(self, keys: list[str]) -> None:
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            self._retry(
                "delete",
                lambda batch=batch: self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )

    def _upload_file(self, path: Path, key: str) -> ArtifactInfo:
        size = path.stat().st_size

        def run() -> str:
            with path.open("rb") as raw:
                reader = _HashingReader(raw, size)
                self._client.upload_fileobj(reader, self.bucket, key, Config=self._transfer)
                return reader.hexdigest() if reader.complete else _file_sha256(path)

        digest = self._retry(f"upload of {key}", run)
        return ArtifactInfo(name="", size=size, sha256=digest)

    # -- ArtifactStore -----------------------------------------------------------------------

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ArtifactInfo]:
        """Upload every regular file under `local_dir` below `prefix`; on any failure delete what was
        written and raise StorageError. Returns the artifacts sorted by name."""
        local_dir = Path(local_dir)
        if not local_dir.is_dir():
            raise StorageError(f"not a directory: {local_dir}")
        files = sorted(p for p in local_dir.rglob("*") if p.is_file())
        written: list[str] = []
        infos: list[ArtifactInfo] = []
        try:
            for path in files:
                name = path.relative_to(local_dir).as_posix()
                if name == INDEX_NAME:
                    continue
                key = self._key(prefix, name)
                written.append(key)  # a failed multipart upload is aborted; a PUT may have landed
                info = self._upload_file(path, key)
                infos.append(ArtifactInfo(name=name, size=info.size, sha256=info.sha256))
            index = encode_index(infos)
            index_key = self._key(prefix, INDEX_NAME)
            written.append(index_key)
            self._retry(
                "index upload",
                lambda: self._client.put_object(
                    Bucket=self.bucket, Key=index_key, Body=index, ContentType="application/json"
                ),
            )
        except BaseException as exc:
            try:
                self._delete_keys(written)
            except StorageError as cleanup:
                log.error("cleanup after failed upload to %s left keys behind: %s", prefix, cleanup)
            if isinstance(exc, StorageError):
                raise
            if isinstance(exc, OSError):
                raise StorageError(f"upload of {local_dir} failed: {exc}") from exc
            raise
        return infos

    def list(self, prefix: str) -> list[ArtifactInfo]:
        """The artifacts of a completed upload below `prefix` (empty if none or incomplete)."""
        from botocore.exceptions import ClientError

        index_key = self._key(prefix, INDEX_NAME)

        def run() -> bytes | None:
            try:
                return self._client.get_object(Bucket=self.bucket, Key=index_key)["Body"].read()
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise

        body = self._retry("index read", run)
        return [] if body is None else decode_index(body, index_key)

    def download_dir(self, prefix: str, local_dir: Path) -> list[ArtifactInfo]:
        """Download the indexed artifacts of `prefix` into `local_dir`, checking each one's sha256."""
        infos = self.list(prefix)
        for info in infos:
            dest = Path(local_dir) / _check_part(info.name, "name")
            dest.parent.mkdir(parents=True, exist_ok=True)
            key = self._key(prefix, info.name)
            self._retry(f"download of {key}", lambda key=key, dest=dest: self._client.download_file(
                self.bucket, key, str(dest), Config=self._transfer))  # fmt: skip
            if _file_sha256(dest) != info.sha256:
                raise StorageError(f"{key}: content differs from the index")
        return infos

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object below `prefix`, the index first (idempotent)."""
        base = self._base(prefix)
        keys = self._list_keys(base)
        index_key = base + INDEX_NAME
        if index_key in keys:
            self._delete_keys([index_key])
            keys.remove(index_key)
        self._delete_keys(keys)

    def download_url(self, prefix: str, name: str, expires_in: int) -> str:
        """A presigned (SigV4, query-string) GET URL valid for `expires_in` seconds (1 s .. 7 days)."""
        if not 1 <= expires_in <= 7 * 24 * 3600:
            raise StorageError(f"expires_in must be between 1 s and 7 days, got {expires_in}")
        key = self._key(prefix, name)
        try:
            return self._presign_client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_in
            )
        except Exception as exc:  # presigning is local; failures are configuration errors
            raise StorageError(f"cannot presign {key}: {exc}") from exc

    def check(self) -> None:
        """Readiness: the bucket exists and the credentials may access it."""
        self._retry("bucket check", lambda: self._client.head_bucket(Bucket=self.bucket))
