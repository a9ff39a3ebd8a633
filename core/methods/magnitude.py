"""Magnitude pruning: score = |W|, one threshold per matrix (the Wanda paper's baseline)."""

from __future__ import annotations

from torch import Tensor

from core.methods.base import Method
from core.methods.masks import count_mask, matrix_mask, nm_mask
from core.methods.stats import LayerStats
from core.spec import PruneSpec


class Magnitude(Method):
    """Unstructured: lowest ``|W|`` over the whole matrix; N:M: lowest per group."""

    name = "magnitude"
    needs = frozenset()

    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        scores = weight.detach().float().abs()
        nm = spec.nm
        if nm is not None:
            return nm_mask(scores, *nm)
        if budget is not None:
            return count_mask(scores, budget)
        return matrix_mask(scores, spec.target_sparsity)
