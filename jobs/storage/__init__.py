"""Artifact stores: a local directory (embedded default) and S3-compatible object storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.storage.base import ArtifactInfo, ArtifactStore, StorageError

if TYPE_CHECKING:
    from jobs.settings import Settings

__all__ = ["ArtifactInfo", "ArtifactStore", "StorageError", "make_store"]


def make_store(settings: Settings) -> ArtifactStore:
    """The store PRUNE_STORAGE selects: `s3` (S3ArtifactStore from the PRUNE_S3_* settings; keys
    `{PRUNE_S3_PREFIX}{tenant}/{job}/{name}`) or `local` (a directory under PRUNE_HOME, served by
    the API through HMAC-signed URLs)."""
    if settings.storage == "s3":
        from jobs.storage.s3 import S3ArtifactStore

        return S3ArtifactStore.from_settings(settings)
    if settings.storage != "local":
        raise ValueError(f"PRUNE_STORAGE must be 'local' or 's3', got {settings.storage!r}")
    from jobs.signing import Signer
    from jobs.storage.local import LocalArtifactStore

    return LocalArtifactStore(settings.artifacts_dir, Signer(settings.secret()), settings.public_url)
