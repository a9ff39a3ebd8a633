"""Artifact stores: a local directory (embedded default) and S3-compatible object storage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from jobs.storage.base import ArtifactInfo, ArtifactStore, StorageError

if TYPE_CHECKING:
    from jobs.settings import Settings

__all__ = ["ArtifactInfo", "ArtifactStore", "StorageError", "make_store"]


def make_store(settings: Settings) -> ArtifactStore:
    """The artifact store the settings select (the local directory under PRUNE_HOME for now)."""
    from jobs.signing import Signer
    from jobs.storage.local import LocalArtifactStore

    return LocalArtifactStore(settings.artifacts_dir, Signer(settings.secret()), settings.public_url)
