"""The interface every artifact store implements."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

INDEX_NAME = ".artifacts.json"
"""The per-job index (names, sizes, sha256) every store writes at upload, after every artifact; the
listing reads it instead of the files. Never listed as an artifact."""


class StorageError(Exception):
    """The store could not complete an operation (unreachable, refused, corrupted)."""


@dataclass(frozen=True)
class ArtifactInfo:
    """One stored file: its key relative to the job prefix, size in bytes and sha256 hex digest."""

    name: str
    size: int
    sha256: str


def encode_index(infos: list[ArtifactInfo]) -> bytes:
    """The index document of an upload: `{"files": {name: {"size", "sha256"}}}`."""
    files = {a.name: {"size": a.size, "sha256": a.sha256} for a in infos}
    return json.dumps({"files": files}, sort_keys=True).encode()


def decode_index(body: bytes, where: str) -> list[ArtifactInfo]:
    """The artifacts an index lists, sorted by name; StorageError when it is not a valid index."""
    try:
        files = json.loads(body)["files"]
        return [
            ArtifactInfo(name=n, size=int(v["size"]), sha256=str(v["sha256"]))
            for n, v in sorted(files.items())
        ]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"corrupted artifact index at {where}") from exc


class ArtifactStore(Protocol):
    """Where finished jobs' files live. Keys are '/'-separated; `prefix` is per tenant and job."""

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ArtifactInfo]:
        """Upload every file under `local_dir` below `prefix`; all-or-nothing (cleans up on failure)."""
        ...

    def list(self, prefix: str) -> list[ArtifactInfo]:
        """The artifacts stored below `prefix`, from the index written at upload (no file is read)."""
        ...

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything below `prefix` (idempotent)."""
        ...

    def download_dir(self, prefix: str, local_dir: Path) -> list[ArtifactInfo]:
        """Copy every artifact of `prefix` (its index) into `local_dir`, checking sizes; the list."""
        ...

    def download_url(self, prefix: str, name: str, expires_in: int) -> str:
        """A URL that serves the artifact until `expires_in` seconds from now."""
        ...

    def check(self) -> None:
        """Raise StorageError if the store is not usable (readiness probe)."""
        ...
