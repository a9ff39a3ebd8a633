"""Artifact store on a local directory, served by the API through signed URLs."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urlencode

from core.artifacts.digest import sha256_file
from jobs.signing import Signer
from jobs.storage.base import INDEX_NAME, ArtifactInfo, StorageError, decode_index, encode_index


def safe_name(name: str) -> str:
    """Validate a '/'-separated relative key; raise ValueError on path escapes."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        raise ValueError(f"invalid artifact name: {name!r}")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".", "") for p in parts) or name != "/".join(parts) or ":" in parts[0]:
        raise ValueError(f"invalid artifact name: {name!r}")
    return name


def split_prefix(prefix: str) -> tuple[str, str]:
    """(tenant, job_id) of a '<tenant>/<job_id>' prefix."""
    safe_name(prefix)
    parts = prefix.split("/")
    if len(parts) != 2:
        raise ValueError(f"prefix must be '<tenant>/<job_id>', got {prefix!r}")
    return parts[0], parts[1]


class LocalArtifactStore:
    """Files under `<root>/<tenant>/<job_id>/`; URLs point at the API's `/v1/artifacts` route.

    Each job directory holds the index `.artifacts.json` (names, sizes, sha256 of the copied files,
    computed once at upload); `list()` reads only that file."""

    def __init__(self, root: Path, signer: Signer, public_base_url: str) -> None:
        self.root = Path(root)
        self.signer = signer
        self.public_base_url = public_base_url.rstrip("/")

    def _dir(self, prefix: str) -> Path:
        split_prefix(prefix)
        return self.root / prefix

    def path(self, prefix: str, name: str) -> Path:
        """Local path of an artifact (it may not exist)."""
        return self._dir(prefix) / safe_name(name)

    def upload_dir(self, local_dir: Path, prefix: str) -> list[ArtifactInfo]:
        """Copy every file under `local_dir` into a temp dir, then rename it to the job's prefix."""
        dest = self._dir(prefix)
        tmp = self.root / ".tmp" / f"{self._tmp_stem(prefix)}.{uuid.uuid4().hex}"
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local_dir, tmp, symlinks=False)
            (tmp / INDEX_NAME).unlink(missing_ok=True)  # never taken from the job's own files
            infos = self._scan(tmp)
            (tmp / INDEX_NAME).write_bytes(encode_index(infos))
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                self._remove(dest)
            os.replace(tmp, dest)
            return infos
        except OSError as e:
            raise StorageError(f"could not store artifacts under {prefix}: {e}") from e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _scan(self, base: Path) -> list[ArtifactInfo]:
        out = []
        for p in sorted(base.rglob("*")):
            if p.is_file():
                name = p.relative_to(base).as_posix()
                if name == INDEX_NAME:
                    continue
                out.append(ArtifactInfo(name=name, size=p.stat().st_size, sha256=sha256_file(p)))
        return out

    def _remove(self, path: Path) -> None:
        trash = self.root / ".tmp" / f"del-{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)  # atomic disappearance, then slow delete
        shutil.rmtree(trash, ignore_errors=True)

    @staticmethod
    def _tmp_stem(prefix: str) -> str:
        tenant, job_id = split_prefix(prefix)
        return f"up-{tenant}-{job_id}"

    def download_dir(self, prefix: str, local_dir: Path) -> list[ArtifactInfo]:
        """Copy the indexed artifacts of `prefix` into `local_dir`."""
        infos = self.list(prefix)
        try:
            for info in infos:
                dest = Path(local_dir) / safe_name(info.name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.path(prefix, info.name), dest)
                if dest.stat().st_size != info.size:
                    raise StorageError(f"{prefix}/{info.name}: size differs from the index")
        except OSError as e:
            raise StorageError(f"could not read artifacts of {prefix}: {e}") from e
        return infos

    def list(self, prefix: str) -> list[ArtifactInfo]:
        """Artifacts below `prefix` (empty when none), from the index written at upload (a directory
        stored before indexes existed is hashed)."""
        d = self._dir(prefix)
        index = d / INDEX_NAME
        try:
            return decode_index(index.read_bytes(), str(index))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"could not read the artifact index {index}: {e}") from e
        return self._scan(d) if d.is_dir() else []

    def delete_prefix(self, prefix: str) -> None:
        """Remove the job's directory and any partial upload a killed worker left behind (idempotent)."""
        d = self._dir(prefix)
        tmp = self.root / ".tmp"
        if tmp.is_dir():
            for stale in tmp.glob(f"{self._tmp_stem(prefix)}.*"):
                shutil.rmtree(stale, ignore_errors=True)
        if d.exists():
            try:
                self._remove(d)
            except FileNotFoundError:  # a concurrent delete (another retention sweeper) got it first
                pass
            except OSError as e:
                raise StorageError(f"could not delete {prefix}: {e}") from e

    def download_url(self, prefix: str, name: str, expires_in: int) -> str:
        """`{public_base_url}/v1/artifacts/{tenant}/{job_id}/{name}?expires=…&sig=…`."""
        tenant, job_id = split_prefix(prefix)
        safe_name(name)
        expires = int(time.time()) + int(expires_in)
        sig = self.signer.sign(tenant, job_id, name, expires)
        path = "/".join(quote(p, safe="") for p in (tenant, job_id, *name.split("/")))
        return f"{self.public_base_url}/v1/artifacts/{path}?{urlencode({'expires': expires, 'sig': sig})}"

    def check(self) -> None:
        """Raise StorageError unless the root is a writable directory."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            raise StorageError(f"artifact directory {self.root} is not writable: {e}") from e
