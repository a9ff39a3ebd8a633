"""Artifact stores: a local directory (embedded default) and S3-compatible object storage."""

from jobs.storage.base import ArtifactInfo, ArtifactStore, StorageError

__all__ = ["ArtifactInfo", "ArtifactStore", "StorageError"]
