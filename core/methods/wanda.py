"""Wanda (Sun et al. 2023): score = |W| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

import torch
from torch import Tensor

from core.methods.base import Method, require_xnorm
from core.methods.masks import nm_mask, row_budget_mask, row_mask, variant_mask
from core.methods.stats import LayerStats
from core.spec import PruneSpec


def wanda_scores(weight: Tensor, xnorm_sq: Tensor) -> Tensor:
    """``|W| * sqrt(xnorm_sq)`` broadcast over rows, in fp32."""
    w = weight.detach().float()
    return w.abs() * torch.sqrt(xnorm_sq.to(device=w.device, dtype=torch.float32)).unsqueeze(0)


class Wanda(Method):
    """Per-output-row comparison group; N:M groups; optional appendix variant."""

    name = "wanda"
    needs = frozenset({"xnorm"})

    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        scores = wanda_scores(weight, require_xnorm(stats, self.name))
        nm = spec.nm
        if nm is not None:
            return nm_mask(scores, *nm)
        if budget is not None:
            return row_budget_mask(scores, budget)
        if spec.variant:
            return variant_mask(scores, spec.target_sparsity)
        return row_mask(scores, spec.target_sparsity)
