"""Prune Service engine: Wanda, magnitude and SparseGPT pruning for decoder LLMs.

Importing `core` (or `core.spec`) does not import torch; `core.prune` and
`core.run` load the engine on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prune", "run"]


def __getattr__(name: str) -> Any:
    if name == "prune":
        from core.engine import prune

        return prune
    if name == "run":
        from core.pipeline import run

        return run
    raise AttributeError(f"module 'core' has no attribute {name!r}")
