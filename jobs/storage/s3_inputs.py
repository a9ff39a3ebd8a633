"""Read a job's inputs (a model directory, a GGUF file, a calibration text) from S3 to local disk.

The API has already checked the `s3://bucket/key` URI against the deployment's allowed prefixes
(`jobs.sources`); this module only copies it. `s3://b/models/smol` is a *directory* when objects
exist below `models/smol/` (every object is copied, keeping its relative path), else a single
object. Object names that would land outside the destination (`..`, absolute, empty segments) are
refused, as is an input above the configured size cap; a failed fetch leaves no partial copy.

Credentials: PRUNE_S3_SOURCE_{ENDPOINT,REGION,ACCESS_KEY,SECRET_KEY}, each falling back to the
artifact store's PRUNE_S3_* value (one object store for both is the common case); empty means
boto3's default chain. PRUNE_MAX_SOURCE_GB caps the bytes one input may hold (default 500).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from jobs.storage.base import StorageError
from jobs.storage.s3 import is_missing, list_objects, retrying, s3_session, unsafe_key_path

if TYPE_CHECKING:
    from jobs.settings import Settings

GIB = 1024**3


class InputNotFound(StorageError):
    """The URI names neither an object nor a non-empty prefix."""


class InputRefused(StorageError):
    """The input is unsafe to copy (an object name escaping the destination) or too large."""


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key/part` -> (`bucket`, `key/part`), without a trailing slash."""
    if not uri.startswith("s3://"):
        raise InputRefused(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    key = key.rstrip("/")
    if not bucket or not key:
        raise InputRefused(f"S3 URI needs a bucket and a key: {uri!r}")
    return bucket, key


def relative_name(key: str, base: str) -> str | None:
    """The path of object `key` below prefix `base/`, checked to stay below it; None for a
    'directory marker' (a key ending in '/'). Raises InputRefused for an escaping name."""
    rel = key[len(base) + 1 :]
    if not rel or rel.endswith("/"):
        return None
    if unsafe_key_path(rel):
        raise InputRefused(f"refusing S3 object {key!r}: its name would leave the model directory")
    return rel


@dataclass(frozen=True)
class _Object:
    key: str
    size: int


class S3InputFetcher:
    """Copies s3:// job inputs to local directories."""

    def __init__(
        self,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        max_bytes: int = 500 * GIB,
        max_attempts: int = 4,
        backoff: float = 0.5,
    ) -> None:
        from boto3.s3.transfer import TransferConfig

        session, config = s3_session(region, access_key, secret_key, endpoint_url)
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self._transfer = TransferConfig(max_concurrency=4)
        self.max_bytes = max_bytes
        self.max_attempts = max_attempts
        self.backoff = backoff

    @classmethod
    def from_settings(cls, settings: Settings) -> S3InputFetcher:
        """From PRUNE_S3_SOURCE_* (each falling back to its PRUNE_S3_* counterpart) and
        PRUNE_MAX_SOURCE_GB."""
        s = settings
        return cls(
            endpoint_url=s.s3_source_endpoint or s.s3_endpoint,
            region=s.s3_source_region or s.s3_region,
            access_key=s.s3_source_access_key or s.s3_access_key,
            secret_key=s.s3_source_secret_key or s.s3_secret_key,
            max_bytes=int(s.max_source_gb * GIB),
        )

    def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        return retrying(what, fn, self.max_attempts, self.backoff)

    def _objects(self, bucket: str, key: str) -> list[_Object]:
        listed = self._retry(
            f"list of s3://{bucket}/{key}/", lambda: list_objects(self._client, bucket, key + "/")
        )
        return [_Object(k, size) for k, size in listed]

    def _single(self, bucket: str, key: str) -> _Object | None:
        from botocore.exceptions import ClientError

        def run() -> _Object | None:
            try:
                head = self._client.head_object(Bucket=bucket, Key=key)
            except ClientError as exc:
                if is_missing(exc):
                    return None
                raise
            return _Object(key, int(head["ContentLength"]))

        return self._retry(f"lookup of s3://{bucket}/{key}", run)

    def fetch(self, uri: str, dest: Path, should_cancel: Callable[[], bool] | None = None) -> Path:
        """Copy `uri` below the new directory `dest`; return the local path to load (the copied
        directory, or the copied file for a single object). Cancellation is checked between files
        and raises `InterruptedError`; any failure removes `dest`."""
        bucket, key = split_uri(uri)
        dest = Path(dest)
        listed = self._objects(bucket, key)
        files = [(o, rel) for o in listed if (rel := relative_name(o.key, key)) is not None]
        if files:
            target, plan = dest, [(o, dest / rel) for o, rel in files]
        else:
            single = self._single(bucket, key)
            if single is None:
                raise InputNotFound(f"no S3 object or prefix at {uri}")
            target = dest / PurePosixPath(key).name
            plan = [(single, target)]
        total = sum(o.size for o, _ in plan)
        if total > self.max_bytes:
            raise InputRefused(
                f"{uri} holds {total / GIB:.1f} GiB, above this service's input limit of "
                f"{self.max_bytes / GIB:g} GiB"
            )
        dest.mkdir(parents=True, exist_ok=False)
        try:
            for obj, path in plan:
                if should_cancel is not None and should_cancel():
                    raise InterruptedError(f"cancelled while copying {uri}")
                path.parent.mkdir(parents=True, exist_ok=True)
                self._retry(
                    f"download of s3://{bucket}/{obj.key}",
                    lambda obj=obj, path=path: self._client.download_file(
                        bucket, obj.key, str(path), Config=self._transfer
                    ),
                )
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return target
