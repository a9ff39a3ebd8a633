"""Layer reconstruction error, from a sample of inputs or a Gram matrix: pure tensor functions.

The report's estimate (:func:`sample_error`) multiplies the weights by a small sample of the
layer's calibration inputs, ``[2 out, in] x [in, k]`` with ``k`` a few hundred tokens: cheaper
than a Gram's ``[out, in] x [in, in]`` for every layer wider than ``k``.

For inputs ``X`` (tokens as columns) and ``G = X X^T`` (any positive multiple: the SparseGPT
Hessian ``2/n X X^T`` gives the same ratios), ``||W X - W' X||_F^2 = tr((W - W') G (W - W')^T)``
and row ``i`` contributes ``d_i G d_i^T`` with ``d_i`` the row of ``W - W'``. One ``[out, in] x
[in, in]`` product per layer instead of a forward over every token.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["relative_error", "row_errors", "sample_error"]


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


def sample_error(dense: Tensor, pruned: Tensor, sample: Tensor) -> float:
    """``||W X - W' X|| / ||W X||`` (Frobenius) with ``X`` the tokens of ``sample`` ``[k, in]``;
    0 when ``W X = 0``. One fp32 product for both norms, each summed in fp64."""
    d = dense.detach().float()
    x = sample.detach().to(device=d.device, dtype=torch.float32)
    out = torch.cat([d - pruned.detach().float(), d]) @ x.T
    num, den = out.double().square().view(2, d.shape[0], -1).sum(dim=(1, 2)).tolist()
    if den <= 0:
        return 0.0
    return (max(num, 0.0) / den) ** 0.5
