"""Pruning methods, keyed by the names in ``core.spec.METHODS``, and their pure tensor math.

Nothing here walks a model: masks (``masks``), per-layer statistics (``stats``), the least-squares
reconstruction of kept weights (``reconstruct``, ``recon``), DSnoT's refinement (``dsnot``) and
OWL's per-layer allocation (``allocation``) take tensors and return tensors.
"""

from __future__ import annotations

from core.errors import InvalidInput
from core.methods.alps import ALPS
from core.methods.base import Method
from core.methods.magnitude import Magnitude
from core.methods.ria import RIA
from core.methods.sparsegpt import SparseGPT
from core.methods.wanda import Wanda

__all__ = ["REGISTRY", "Method", "get_method"]

REGISTRY: dict[str, Method] = {m.name: m for m in (Wanda(), Magnitude(), SparseGPT(), RIA(), ALPS())}


def get_method(name: str) -> Method:
    """The registered method called ``name``; InvalidInput naming the supported ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise InvalidInput(
            f"unknown pruning method {name!r}; supported: {', '.join(sorted(REGISTRY))}"
        ) from None
