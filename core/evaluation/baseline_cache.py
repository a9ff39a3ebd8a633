"""Cached dense baselines: the dense perplexity of (model content, evaluation setup) is stored on the
host running the engine and reused, so re-pruning the same model skips the dense evaluation.

The key hashes the dense weights (every tensor of the state dict: names, dtypes, shapes, bytes), the
exact evaluation token ids, the window length and count, the evaluation batch and the device, so any
change that could change the number misses the cache. Entries are small JSON files under
``$PRUNE_BASELINE_CACHE``, by default ``$PRUNE_HOME/cache/baselines`` when ``PRUNE_HOME`` is set (the
service's worker hosts); without either the cache is off (plain ``python -m core`` runs measure every
time). ``PRUNE_BASELINE_CACHE=off`` disables it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.settings import EngineSettings

VERSION = 1


def cache_dir() -> Path | None:
    """Where entries live, or None when disabled."""
    return EngineSettings.from_env().baseline_cache_dir()


def model_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes of every tensor)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def key(model: nn.Module, eval_ids: torch.Tensor, seqlen: int, max_windows: int | None, batch: int) -> str:
    """The cache key of a dense evaluation of ``model`` on ``eval_ids``."""
    ids = eval_ids.detach().to(torch.int64).contiguous().cpu()
    h = hashlib.sha256(f"v{VERSION}|{model_digest(model)}|{seqlen}|{max_windows}|{batch}".encode())
    h.update(str(next(model.parameters()).device.type).encode())
    h.update(ids.numpy().tobytes())
    return h.hexdigest()


def load(k: str) -> dict[str, Any] | None:
    """The stored dense result for key ``k`` (None on a miss or an unreadable entry)."""
    root = cache_dir()
    if root is None:
        return None
    try:
        entry = json.loads((root / f"{k}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry.get("result") if entry.get("version") == VERSION else None


def store(k: str, result: dict[str, Any]) -> None:
    """Store ``result`` under ``k`` (atomic rename; a read-only cache is silently skipped)."""
    root = cache_dir()
    if root is None:
        return
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{k}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"version": VERSION, "key": k, "result": result}))
        tmp.replace(root / f"{k}.json")
    except OSError:
        pass
