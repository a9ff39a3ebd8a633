"""RIA (Zhang et al., ICLR 2024, "Plug-and-Play"): relative importance times activations.

Score of ``W_ij``: ``(|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a`` (row
and column L1 sums of ``|W|``; ``a = spec.ria_alpha``, 0.5 in the paper). Unstructured: the
lowest scores of the whole matrix are pruned (RIA's per-layer comparison group: the relative
normalisation is what makes scores of different rows comparable). N:M: lowest per group.

Channel permutation (``spec.ria_permute``, N:M only; RIA's "heuristic channel reallocation"):
input columns are sorted by their summed score and dealt out so that every group of ``m``
*permuted* positions holds one column from each of the ``m`` score quantiles (odd quantiles
reversed, a snake order). The N:M mask is chosen over those groups and mapped back: with
``perm`` the permutation, ``mask[:, perm]`` is exactly N:M over consecutive columns, i.e. every
group ``{perm[g*m], ..., perm[g*m+m-1]}`` prunes exactly ``m - n`` entries of every row. The
weights are exported in their original column order; a kernel that needs consecutive N:M
groups must permute the layer's input columns (and its input activations) by ``perm``. The
permutation is kept only when it retains at least the total score of plain N:M; otherwise the
identity is used.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.methods.base import Method, require_xnorm
from core.methods.masks import count_mask, matrix_mask, nm_mask
from core.methods.stats import LayerStats
from core.spec import PruneSpec


def ria_scores(weight: Tensor, xnorm_sq: Tensor, alpha: float = 0.5) -> Tensor:
    """RIA's relative-importance score in fp32 (``xnorm_sq`` = sum of squared inputs per column)."""
    w = weight.detach().float().abs()
    row = w.sum(dim=1, keepdim=True)
    col = w.sum(dim=0, keepdim=True)
    rel = w / row.clamp_min(torch.finfo(torch.float32).tiny) + w / col.clamp_min(
        torch.finfo(torch.float32).tiny
    )
    act = xnorm_sq.to(device=w.device, dtype=torch.float32).clamp_min(0).sqrt().pow(alpha)
    return rel * act.unsqueeze(0)


def channel_permutation(scores: Tensor, m: int) -> Tensor:
    """RIA's heuristic reallocation: column order whose groups of ``m`` mix all score quantiles."""
    in_f = scores.shape[1]
    order = torch.sort(scores.sum(dim=0), stable=True).indices  # ascending column importance
    groups = in_f // m
    perm = torch.empty(in_f, dtype=torch.long, device=scores.device)
    for q in range(m):
        seg = order[q * groups : (q + 1) * groups]
        perm[q::m] = seg.flip(0) if q % 2 else seg
    return perm


def permuted_nm_mask(scores: Tensor, n: int, m: int, perm: Tensor) -> Tensor:
    """N:M mask over the groups of ``perm`` (``result[:, perm]`` is N:M), in original column order."""
    inner = nm_mask(scores[:, perm], n, m)
    mask = torch.empty_like(inner)
    mask[:, perm] = inner
    return mask


class RIA(Method):
    """Relative importance and activations; matrix-wide comparison; optional N:M permutation."""

    name = "ria"
    needs = frozenset({"xnorm"})

    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        return self.prune_grouped(weight, stats, spec, budget)[0]

    def prune_grouped(
        self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None
    ) -> tuple[Tensor, Tensor | None]:
        scores = ria_scores(weight, require_xnorm(stats, self.name), spec.ria_alpha)
        nm = spec.nm
        if nm is None:
            if budget is not None:
                return count_mask(scores, budget), None
            return matrix_mask(scores, spec.target_sparsity), None
        plain = nm_mask(scores, *nm)
        if not spec.ria_permute:
            return plain, None
        perm = channel_permutation(scores, nm[1])
        permuted = permuted_nm_mask(scores, *nm, perm)
        if scores[~permuted].sum() >= scores[~plain].sum():
            return permuted, perm
        return plain, torch.arange(scores.shape[1], device=scores.device)
