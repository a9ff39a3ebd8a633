"""Layer reconstruction error from a Gram matrix: pure tensor functions.

For inputs ``X`` (tokens as columns) and ``G = X X^T`` (any positive multiple: the SparseGPT
Hessian ``2/n X X^T`` gives the same ratios), ``||W X - W' X||_F^2 = tr((W - W') G (W - W')^T)``
and row ``i`` contributes ``d_i G d_i^T`` with ``d_i`` the row of ``W - W'``. One ``[out, in] x
[in, in]`` product per layer instead of a forward over every token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relative_error", "row_errors"]


def row_errors(delta: Tensor, gram: Tensor) -> Tensor:
    """fp64 ``[out]``: ``delta_i G delta_i^T`` per row (squared output error of each row)."""
    d = delta.detach().to(torch.float64)
    g = gram.detach().to(device=d.device, dtype=torch.float64)
    return ((d @ g) * d).sum(dim=1)


def relative_error(dense: Tensor, pruned: Tensor, gram: Tensor) -> float:
    """``||W X - W' X|| / ||W X||`` (Frobenius) on the inputs summarised by ``gram``; 0 when ``W X = 0``."""
    num = row_errors(dense - pruned, gram).sum().clamp_min(0)
    den = row_errors(dense, gram).sum()
    if float(den) <= 0:
        return 0.0
    return float(torch.sqrt(num / den))
