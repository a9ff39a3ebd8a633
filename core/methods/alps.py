"""ALPS-class joint mask and weights (Meng et al., NeurIPS 2024): ADMM with support updates.

Solves the layer-wise problem ``min ||W X - V X||^2`` over ``V`` with the sparsity pattern as the
constraint (per-row counts, an exact layer budget spread over rows, or N:M), by ADMM whose
projection step re-chooses the support every iteration under a growing penalty ``rho``, then a
conjugate-gradient refinement of the kept weights on the final support (``core.methods.reconstruct``).
Needs the input Hessian (``2/n X X^T``; dampened by ``spec.percdamp``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from core.methods.base import Method, require_hessian
from core.methods.reconstruct import alps_solve, normalise, support_projector
from core.methods.stats import LayerStats
from core.spec import PruneSpec

__all__ = ["ALPS", "alps_prune"]


@torch.no_grad()
def alps_prune(
    weight: Tensor, hessian: Tensor, spec: PruneSpec, budget: int | None = None
) -> tuple[Tensor, dict[str, Any]]:
    """Prune ``weight`` ([out, in]) in place with ALPS; return ``(mask, record)``."""
    w = weight.detach().float()
    norm = normalise(hessian.to(w.device), spec.percdamp)
    project = support_projector(spec.target_sparsity, spec.nm, None if spec.nm is not None else budget)
    v, mask, info = alps_solve(
        norm.to_norm(w),
        norm.gram,
        project,
        iters=spec.alps_iters,
        rho0=spec.alps_rho,
        rho_max=spec.alps_rho_max,
        values=spec.alps_rho_values,
        cg_iters=spec.reconstruct_iters,
        tol=spec.reconstruct_tol,
    )
    weight.copy_(norm.from_norm(v).masked_fill(mask, 0).to(weight.dtype))
    return mask, info.as_record()


class ALPS(Method):
    """ADMM with support updates and a CG refinement; needs the input Hessian."""

    name = "alps"
    needs = frozenset({"hessian"})

    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        return self.prune_with_info(weight, stats, spec, budget)[0]

    def prune_with_info(
        self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None
    ) -> tuple[Tensor, Tensor | None, dict[str, Any]]:
        mask, record = alps_prune(weight, require_hessian(stats, self.name), spec, budget)
        return mask, None, {"alps": record}
