"""Prune Service engine: Wanda, RIA, magnitude, SparseGPT and ALPS pruning for decoder LLMs.

The folder shows the layers, bottom to top (each imports only from the ones below it):

- top-level modules: the contracts every layer shares — ``spec`` (the run's pydantic spec),
  ``settings``, ``errors``, ``result`` (the report), ``progress``; ``spec_cli`` derives command-line
  flags from the spec;
- ``methods``: the pruning methods and their pure tensor math (masks, statistics, reconstruction);
- ``model``: model access — families, loading, caches, placement, weights on disk, block inputs;
- ``evaluation``: perplexity (whole model or block by block), zero-shot tasks, the quality gate;
- ``artifacts``: what a run writes — checkpoint formats, the report, digests;
- ``run``: the block loop (``run.engine``), a job's pipeline (``run.pipeline``), resume, sweeps,
  recovery;
- ``cli`` / ``__main__``: ``python -m core``.

Importing ``core`` (or ``core.spec``) does not import torch; ``core.prune`` loads the engine on
first use. A whole run is ``core.run.pipeline.run``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prune"]


def __getattr__(name: str) -> Any:
    if name == "prune":
        from core.run.engine import prune

        return prune
    raise AttributeError(f"module 'core' has no attribute {name!r}")
