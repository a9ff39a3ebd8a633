"""The interface every artifact store implements."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class StorageError(Exception):
    """The store could not complete an operation (unreachable, refused, corrupted)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """One stored file: its key relative to the job prefix, size in bytes and sha256 hex digest."""

    name: str
    size: int
    sha256: str


class ArtifactStore(Protocol):
    """Where finished jobs' files live. Keys are '/'-separated; `prefix` is per tenant and job."""

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ArtifactInfo]:
        """Upload every file under `local_dir` below `prefix`; all-or-nothing (cleans up on failure)."""
        ...

    def list(self, prefix: str) -> list[ArtifactInfo]:
        """The artifacts stored below `prefix`."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below `prefix` (idempotent)."""
        ...

    def download_url(self, prefix: str, name: str, expires_in: int) -> str:
        """A URL that serves the artifact until `expires_in` seconds from now."""
        ...

    def check(self) -> None:
        """Raise StorageError if the store is not usable (readiness probe)."""
        ...
