"""Pruning masks from importance scores: pure tensor functions, no model walking.

Conventions (shared by every method):

* A mask is a boolean tensor shaped like the weight; **True means pruned (zeroed)**.
* Lower score = less important = pruned first.
* Tie rule: scores are sorted ascending with a *stable* sort, so among equal scores the
  **lower input index is pruned first** (for :func:`matrix_mask`, the lower flattened
  row-major index).
* Budgets are exact: :func:`row_mask` prunes ``int(sparsity * in)`` entries in every row,
  :func:`matrix_mask` prunes ``int(sparsity * numel)`` entries in the matrix, and
  :func:`nm_mask` prunes ``m - n`` of every ``m`` consecutive input columns.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from core.errors import InvalidInput

__all__ = [
    "apply_mask",
    "check_nm",
    "count_mask",
    "matrix_mask",
    "nm_mask",
    "row_budget_mask",
    "row_counts",
    "row_mask",
    "variant_mask",
]


def _check_2d(scores: Tensor) -> None:
    if scores.dim() != 2:
        raise InvalidInput(f"scores must be a 2-D [out, in] tensor, got shape {tuple(scores.shape)}")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise InvalidInput(f"sparsity must be in [0, 1), got {sparsity}")


SMALL_GROUP = 8
"""Groups up to this size (N:M patterns) are ranked by pairwise comparison instead of sorted."""


def _lowest_k_small(scores: Tensor, k: int) -> Tensor:
    """:func:`_lowest_k` for a short last dim (no NaN): an entry's rank in the stable ascending
    order is the number of entries that come before it; the lowest ``k`` are those of rank < k.
    Each pair ``i < j`` is compared once: ``j`` comes first iff its score is strictly lower
    (on a tie the lower index ``i`` does). ``m (m - 1) / 2`` comparisons instead of a sort."""
    m = scores.shape[-1]
    cols = [scores[..., i] for i in range(m)]
    rank = [torch.zeros(scores.shape[:-1], dtype=torch.uint8, device=scores.device) for _ in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            j_first = cols[j] < cols[i]
            rank[i] += j_first
            rank[j] += ~j_first
    return torch.stack(rank, dim=-1) < k


def _lowest_k(scores: Tensor, k: int) -> Tensor:
    """Mask of the k lowest entries along the last dim (stable: lower index first on ties)."""
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    n = scores.shape[-1]
    if k < n and not bool(torch.isnan(scores).any()):
        return _lowest_k_small(scores, k) if n <= SMALL_GROUP else _lowest_k_select(scores, k)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    mask.scatter_(-1, order, True)
    return mask


_NUMPY_SELECT = (torch.float16, torch.float32, torch.float64)
"""CPU dtypes whose k-th value comes from NumPy's introselect instead of ``torch.kthvalue`` (which
copies values and int64 indices); the value is the same. Timings: ``bench/mask_select.py``."""


def _kth_value(scores: Tensor, k: int) -> Tensor:
    """The k-th smallest value along the last dim (``keepdim``), no NaN, ``0 < k <= n``."""
    if scores.device.type == "cpu" and scores.dtype in _NUMPY_SELECT:
        part = np.partition(scores.detach().numpy(), k - 1, axis=-1)[..., k - 1 : k]
        return torch.from_numpy(np.ascontiguousarray(part))
    return torch.kthvalue(scores, k, dim=-1, keepdim=True).values


def _lowest_k_select(scores: Tensor, k: int) -> Tensor:
    """:func:`_lowest_k` by selection instead of a sort (no NaN, ``0 < k < n``): every entry below
    the k-th smallest value, then the entries equal to it in index order until ``k`` are taken —
    the stable sort's rule, mask for mask, without sorting. When no row has a tie at its k-th
    value, the entries up to and including it are exactly ``k`` per row and are the mask."""
    kth = _kth_value(scores, k)
    upto = scores <= kth
    if bool((upto.sum(dim=-1) == k).all()):
        return upto
    tied = scores == kth
    below = upto & ~tied
    need = k - below.sum(dim=-1, keepdim=True)
    return below | (tied & (tied.cumsum(dim=-1) <= need))


def row_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune exactly ``int(sparsity * in)`` lowest-scoring entries of every row."""
    _check_2d(scores)
    _check_sparsity(sparsity)
    return _lowest_k(scores, int(sparsity * scores.shape[1]))


def matrix_mask(scores: Tensor, sparsity: float) -> Tensor:
    """Prune exactly ``int(sparsity * numel)`` lowest-scoring entries of the whole matrix."""
    _check_2d(scores)
    _check_sparsity(sparsity)
    return _lowest_k(scores.reshape(-1), int(sparsity * scores.numel())).reshape(scores.shape)


def row_counts(out_features: int, total: int) -> list[int]:
    """Split ``total`` pruned entries over ``out_features`` rows: ``total // out`` each, and one
    more in the first ``total % out`` rows (so the layer's count is exact)."""
    if total < 0:
        raise InvalidInput(f"pruned count must be >= 0, got {total}")
    q, r = divmod(total, out_features)
    return [q + 1 if i < r else q for i in range(out_features)]


def row_budget_mask(scores: Tensor, total: int) -> Tensor:
    """Prune exactly ``total`` entries of the matrix, spread over its rows by :func:`row_counts`,
    each row pruning its lowest scores (the per-row rule of :func:`row_mask` with an exact layer count)."""
    _check_2d(scores)
    out_f = scores.shape[0]
    if not 0 <= total <= scores.numel():
        raise InvalidInput(f"cannot prune {total} of {scores.numel()} entries")
    q, r = divmod(total, out_f)
    mask = _lowest_k(scores, q)
    if r:
        order = torch.sort(scores[:r], dim=-1, stable=True).indices[:, q : q + 1]
        mask[:r].scatter_(-1, order, True)
    return mask


def count_mask(scores: Tensor, total: int) -> Tensor:
    """Prune exactly ``total`` lowest-scoring entries of the matrix (the rule of :func:`matrix_mask`)."""
    _check_2d(scores)
    if not 0 <= total <= scores.numel():
        raise InvalidInput(f"cannot prune {total} of {scores.numel()} entries")
    return _lowest_k(scores.reshape(-1), total).reshape(scores.shape)


def _check_nm_args(in_features: int, n: int, m: int) -> None:
    if not 0 < n < m:
        raise InvalidInput(f"N:M pattern needs 0 < N < M, got {n}:{m}")
    if in_features % m != 0:
        raise InvalidInput(
            f"N:M pattern {n}:{m} needs the input dimension to be a multiple of {m}, "
            f"but this layer has {in_features} input features"
        )


def nm_mask(scores: Tensor, n: int, m: int) -> Tensor:
    """Keep ``n`` of every ``m`` consecutive input columns: prune the ``m - n`` lowest per group."""
    _check_2d(scores)
    out_f, in_f = scores.shape
    _check_nm_args(in_f, n, m)
    groups = scores.reshape(out_f, in_f // m, m)
    return _lowest_k(groups, m - n).reshape(out_f, in_f)


def _variant_for_alpha(sorted_cum: Tensor, row_sum: Tensor, order: Tensor, alpha: float) -> Tensor:
    pruned_sorted = sorted_cum <= alpha * row_sum
    mask = torch.zeros_like(pruned_sorted)
    mask.scatter_(1, order, pruned_sorted)
    return mask


def variant_mask(scores: Tensor, sparsity: float, tol: float = 0.001, max_iter: int = 50) -> Tensor:
    """Wanda's appendix variant: per row, prune the lowest scores whose cumulative sum is <= alpha * row sum.

    ``alpha`` is shared by all rows and found by bisection (start 0.4 in [0, 0.8], widened to
    [0, 1] when 0.8 is not enough) until the layer's pruned fraction is within ``tol`` of
    ``sparsity``. After ``max_iter`` steps the closest mask found is returned.
    """
    _check_2d(scores)
    _check_sparsity(sparsity)
    if sparsity == 0.0 or scores.numel() == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    s = scores.float()
    sorted_vals, order = torch.sort(s, dim=1, stable=True)
    cum = torch.cumsum(sorted_vals, dim=1)
    row_sum = s.sum(dim=1, keepdim=True)

    def frac(mask: Tensor) -> float:
        return mask.float().mean().item()

    lo, hi = 0.0, 0.8
    if frac(_variant_for_alpha(cum, row_sum, order, hi)) < sparsity:
        hi = 1.0
    alpha = 0.4
    best: Tensor | None = None
    best_err = float("inf")
    for _ in range(max_iter):
        mask = _variant_for_alpha(cum, row_sum, order, alpha)
        cur = frac(mask)
        err = abs(cur - sparsity)
        if err < best_err:
            best, best_err = mask, err
        if err <= tol:
            break
        if cur > sparsity:
            hi = alpha
        else:
            lo = alpha
        alpha = (lo + hi) / 2
    assert best is not None
    return best


def apply_mask(weight: Tensor, mask: Tensor) -> Tensor:
    """Zero ``weight`` where ``mask`` is True, in place; return ``weight``."""
    if weight.shape != mask.shape:
        raise InvalidInput(f"mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
    with torch.no_grad():
        weight.masked_fill_(mask.to(weight.device), 0)
    return weight


def check_nm(mask_or_weight: Tensor, n: int, m: int, exact: bool = False) -> bool:
    """Whether every group of ``m`` consecutive input columns has at least ``m - n`` pruned entries.

    A boolean tensor is read as a mask (True = pruned); any other tensor as a weight whose
    zeros are the pruned entries. With ``exact=True`` every group must have exactly ``m - n``.
    Returns False (instead of raising) when the input dimension is not a multiple of ``m``.
    """
    if mask_or_weight.dim() != 2 or not 0 < n < m or mask_or_weight.shape[1] % m != 0:
        return False
    pruned = mask_or_weight if mask_or_weight.dtype == torch.bool else mask_or_weight == 0
    out_f, in_f = pruned.shape
    counts = pruned.reshape(out_f, in_f // m, m).sum(dim=-1)
    if exact:
        return bool((counts == m - n).all())
    return bool((counts >= m - n).all())
