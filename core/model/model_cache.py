"""Cached dequantized GGUF models: a GGUF file's dequantized weights are kept on the host running the
engine as a plain Hugging Face directory, so a later load of the same file (a resumed attempt, a new
job on the same model) reads safetensors instead of dequantizing again.

The key hashes the GGUF file's content (sha256, streamed; memoised per process by path, size and
mtime), the dtype the model is loaded in and the transformers and gguf versions (the dequantizer
belongs to them). An entry ``<root>/<key>/`` holds ``config.json``, the safetensors weights, the
tokenizer files and the completion marker ``complete.json``, written last into a temporary directory
beside it that is then renamed into place: a reader only uses a directory whose marker names its key,
so a crash never leaves a half entry that is later read (a torn one is replaced on the next store).
Entries live under ``$PRUNE_MODEL_CACHE``, by default ``$PRUNE_HOME/cache/models`` when ``PRUNE_HOME``
is set (the service's worker hosts); without either the cache is off, and ``PRUNE_MODEL_CACHE=off``
or ``PRUNE_MODEL_CACHE_BYTES=0`` disables it. After a write the least recently used entries (by their
marker's mtime, touched on every hit) are removed until the rest fit ``PRUNE_MODEL_CACHE_BYTES``.

The cache never fails a load: an unwritable directory, a full disk or an unreadable entry logs a
warning and the model is loaded from the GGUF file as without the cache; the run report says what
happened (``model.gguf_cache``: ``hit``, ``miss``, ``off`` or ``error``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from core.settings import EngineSettings

__all__ = [
    "MARKER",
    "VERSION",
    "Entry",
    "Status",
    "cache_dir",
    "discard",
    "evict",
    "file_digest",
    "file_id",
    "key",
    "known",
    "lookup",
    "store",
]

VERSION = 1
MARKER = "complete.json"
STALE_TMP_S = 3600.0
"""A temporary directory older than this is a crashed writer's leftover and is removed on eviction."""

Status = Literal["hit", "miss", "off", "error"]

log = logging.getLogger(__name__)
_digests: dict[tuple[str, int, int, int], str] = {}


@dataclass
class Entry:
    """The cache's answer for one GGUF file: ``path`` is set on a hit."""

    status: Status
    key: str | None = None
    root: Path | None = None
    path: Path | None = None


def cache_dir() -> Path | None:
    """Where entries live, or None when disabled."""
    return EngineSettings.from_env().model_cache_dir()


def file_id(path: Path) -> tuple[str, int, int, int]:
    """(resolved path, size, mtime_ns, inode): what the per-process memos of a file are keyed by."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, streamed; memoised by :func:`file_id`."""
    memo = file_id(path)
    if memo not in _digests:
        with path.open("rb") as fh:
            _digests[memo] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _digests[memo]


def _versions() -> str:
    import gguf
    import transformers

    try:
        from importlib.metadata import version

        gguf_version = version("gguf")
    except Exception:
        gguf_version = getattr(gguf, "__version__", "?")
    return f"transformers {transformers.__version__}|gguf {gguf_version}"


def key(gguf: Path, dtype: str) -> str:
    """The cache key of ``gguf`` dequantized to ``dtype`` by the installed transformers and gguf."""
    return hashlib.sha256(f"v{VERSION}|{file_digest(gguf)}|{dtype}|{_versions()}".encode()).hexdigest()


def _marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("version") == VERSION else None


def lookup(gguf: Path, dtype: str) -> Entry:
    """A hit (``path`` set, its last use touched), a miss (to :func:`store` after loading), ``off``,
    or ``error`` when the file cannot be hashed."""
    root = cache_dir()
    if root is None:
        return Entry("off")
    try:
        k = key(gguf, dtype)
    except OSError as exc:
        log.warning("model cache: cannot hash %s (%s); loading without the cache", gguf, exc)
        return Entry("error")
    path = root / k
    marker = _marker(path)
    if marker is None or marker.get("key") != k:
        return Entry("miss", k, root)
    try:
        os.utime(path / MARKER)
    except OSError:
        pass  # a read-only cache still serves hits; its LRU order just does not move
    return Entry("hit", k, root, path)


def known(gguf: Path) -> Path | None:
    """A complete entry made from a file of ``gguf``'s content by the installed versions (any dtype),
    or None. That content was parsed and dequantized before, so its header need not be checked and its
    config can be read from the entry instead of parsing the file's metadata again."""
    root = cache_dir()
    if root is None:
        return None
    try:
        digest, children = file_digest(gguf), sorted(root.iterdir())
    except OSError:
        return None
    versions = _versions()
    for child in children:
        marker = _marker(child)
        if marker and (marker.get("key"), marker.get("digest"), marker.get("versions")) == (
            child.name,
            digest,
            versions,
        ):
            return child
    return None


def discard(entry: Entry, exc: BaseException) -> Entry:
    """An entry that failed to load: log, remove it (best effort) and return an ``error`` entry."""
    log.warning("model cache: entry %s failed to load (%s); dequantizing instead", entry.path, exc)
    if entry.path is not None:
        shutil.rmtree(entry.path, ignore_errors=True)
    return Entry("error", entry.key, entry.root)


def _nbytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store(entry: Entry, model: Any, tokenizer: Any, gguf: Path) -> Entry:
    """Store a freshly dequantized ``model`` (its quantization metadata stripped) and ``tokenizer``
    for a missed ``entry``, then evict down to the budget. Returns the entry's final status: ``miss``
    (stored, or skipped because it cannot fit the budget) or ``error`` (not written; logged)."""
    if entry.status != "miss" or entry.key is None or entry.root is None:
        return entry
    budget = EngineSettings.from_env().model_cache_bytes
    need = _nbytes(model)
    if need > budget:
        log.info("model cache: %s needs %d bytes, over the %d-byte budget; not cached", gguf, need, budget)
        return entry
    root, k = entry.root, entry.key
    tmp = root / f".{k}.tmp-{uuid.uuid4().hex}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(root).free
        if free < 2 * need:  # leave the job's own checkpoints and export room to write
            raise OSError(f"only {free} bytes free for a {need}-byte entry")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {
            "version": VERSION,
            "key": k,
            "digest": file_digest(gguf),
            "versions": _versions(),
            "source": str(gguf),
            "bytes": _size(tmp),
            "created": time.time(),
        }
        (tmp / MARKER).write_text(json.dumps(marker))
        final = root / k
        if final.exists() and _marker(final) is None:
            shutil.rmtree(final, ignore_errors=True)  # a torn entry: replaced
        try:
            tmp.rename(final)
        except OSError:
            if _marker(final) is None:  # not another writer's complete entry
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process stored the same key first
    except Exception as exc:  # a full disk (ENOSPC, EDQUOT), an unwritable cache, a failed save
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("model cache: cannot store %s under %s (%s); loaded without the cache", gguf, root, exc)
        return Entry("error", k, root)
    evict(root, budget, keep=k)
    return entry


def evict(root: Path, budget: int, keep: str | None = None) -> list[str]:
    """Remove least recently used entries (and torn or stale temporary directories) until the complete
    entries fit ``budget`` bytes; ``keep`` is never removed. Returns the removed keys."""
    removed: list[str] = []
    entries: list[tuple[float, int, Path]] = []
    now = time.time()
    try:
        children = list(root.iterdir())
    except OSError:
        return removed
    for child in children:
        try:
            if not child.is_dir():
                continue
            if child.name.startswith("."):
                if now - child.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(child, ignore_errors=True)
                continue
            marker = _marker(child)
            if marker is None or marker.get("key") != child.name:
                if now - child.stat().st_mtime > STALE_TMP_S:
                    shutil.rmtree(child, ignore_errors=True)  # torn: never read, so only disk to free
                continue
            size = marker.get("bytes")
            entries.append(
                ((child / MARKER).stat().st_mtime, size if isinstance(size, int) else _size(child), child)
            )
        except OSError:
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        if path.name == keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            total -= size
            removed.append(path.name)
    return removed
