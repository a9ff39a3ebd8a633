"""OWL (Yin et al., ICML 2024): outlier-weighted per-block sparsity. Pure functions.

* A block's **outlier ratio** is the share of its Wanda scores ``|W_ij| ||X_j||`` (all its
  pruned linears' scores, concatenated) above ``M`` times their mean.
* Blocks with more outliers are pruned less: ratios are mapped linearly onto
  ``[target + lambda, target - lambda]`` (most outliers -> ``target - lambda``), then shifted
  by one common ``delta`` and clipped to that interval, ``delta`` chosen by bisection so that
  the weight-weighted mean of the block sparsities is exactly ``target`` (the paper shifts the
  unweighted mean and does not clip; with blocks of equal size and no clipping the two agree).
* Integer **budgets** per layer are found by cumulative rounding of ``sparsity * numel`` in
  layer order, so each layer is within one weight of its block's sparsity and the model's
  total equals ``round(target * total weights)`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["layer_budgets", "outlier_ratio", "owl_sparsities"]


def outlier_ratio(scores: Sequence[Tensor], m: float) -> float:
    """Fraction of all entries of ``scores`` greater than ``m`` times their common mean."""
    flat = torch.cat([s.detach().reshape(-1).float() for s in scores])
    if flat.numel() == 0:
        return 0.0
    return float((flat > m * flat.mean()).sum()) / flat.numel()


def owl_sparsities(ratios: Sequence[float], numels: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities in ``[target - lam, target + lam]`` whose numel-weighted mean is ``target``."""
    if len(ratios) != len(numels) or not ratios:
        raise ValueError("need one outlier ratio and one weight count per block")
    r = torch.tensor(ratios, dtype=torch.float64)
    n = torch.tensor(numels, dtype=torch.float64)
    lo_s, hi_s = target - lam, target + lam
    span = float(r.max() - r.min())
    if span == 0.0 or lam == 0.0:
        return [target] * len(ratios)
    raw = hi_s - 2 * lam * (r - r.min()) / span

    def mean_at(delta: float) -> float:
        return float((n * (raw + delta).clamp(lo_s, hi_s)).sum() / n.sum())

    lo, hi = -2 * lam, 2 * lam
    for _ in range(200):
        mid = (lo + hi) / 2
        if mean_at(mid) < target:
            lo = mid
        else:
            hi = mid
    return [float(x) for x in (raw + (lo + hi) / 2).clamp(lo_s, hi_s)]


def layer_budgets(sparsities: Sequence[float], numels: Sequence[int], target: float) -> list[int]:
    """Exact pruned counts per layer (layer ``l`` at ``sparsities[l]``), summing to ``round(target * N)``."""
    total = round(target * sum(numels))
    out: list[int] = []
    cum = 0.0
    prev = 0
    for s, k in zip(sparsities, numels, strict=True):
        cum += s * k
        cur = round(cum)
        out.append(cur - prev)
        prev = cur
    # Float rounding of the cumulative sum may leave the total one weight off: fix it on the last layer.
    if out:
        out[-1] = min(max(out[-1] + total - sum(out), 0), numels[-1])
    return out
