"""SparseGPT (Frantar & Alistarh 2023): OBS-style pruning with weight reconstruction.

Columns are processed left to right in blocks of ``spec.blocksize``. Within a block each
pruned weight's error is propagated to the block's remaining columns through the upper
Cholesky factor of ``H^-1``; the accumulated block error is applied lazily to all later
columns in one matrix product. Mask selection uses the saliency ``w^2 / [H^-1]_jj^2``:
per block (unstructured) or per group of ``m`` columns (N:M).
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.errors import InvalidInput
from core.methods.base import Method, require_hessian
from core.methods.masks import nm_mask
from core.methods.stats import LayerStats
from core.spec import PruneSpec


def _inverse_cholesky(h: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; retries once with 10x dampening."""
    diag = torch.diagonal(h)
    mean = diag.mean().item()
    for frac in (percdamp, min(10 * percdamp, 1.0)):
        hd = h.clone()
        torch.diagonal(hd).add_(frac * mean)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper
    raise InvalidInput(
        "SparseGPT: the layer's input Hessian is not positive definite even with extra dampening "
        f"(percdamp {percdamp}); try a larger percdamp or more calibration samples"
    )


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
    budget: int | None = None,
) -> Tensor:
    """Prune ``weight`` ([out, in]) in place with SparseGPT; return the mask (True = pruned).

    Unstructured: exactly ``T = int(sparsity * numel)`` entries are pruned in total, split
    over column blocks by cumulative budget (block ``[i1, i2)`` gets
    ``T*i2//in - T*i1//in``), each block choosing its lowest saliencies.
    ``budget`` (unstructured) replaces ``T`` by an exact count.
    N:M: exactly ``m - n`` per group of ``m`` columns.
    ``hessian`` is not modified.
    """
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise InvalidInput(
            f"Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}"
        )
    if nm is not None:
        n, m = nm
        nm_mask(torch.zeros(1, in_f), n, m)  # validates in_f % m with a clear error
        # Groups must not straddle blocks.
        blocksize = max(m, blocksize - blocksize % m)
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h, percdamp)

    mask = torch.zeros(out_f, in_f, dtype=torch.bool, device=w.device)
    target = int(sparsity * out_f * in_f) if budget is None else budget
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)

        if nm is None:
            budget = target * i2 // in_f - target * i1 // in_f
            saliency = w1.square() / d1.square().unsqueeze(0)
            mask1 = _flat_lowest(saliency, budget)
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)

        for i in range(count):
            if nm is not None and i % nm[1] == 0:
                g = slice(i, i + nm[1])
                sal = w1[:, g].square() / d1[g].square().unsqueeze(0)
                mask1[:, g] = nm_mask(sal, *nm)
            col = w1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e

        w[:, i1:i2] = q1
        mask[:, i1:i2] = mask1
        if i2 < in_f:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    weight.copy_(w.to(weight.dtype))
    return mask


def _flat_lowest(scores: Tensor, k: int) -> Tensor:
    """Mask of exactly ``k`` lowest entries of a matrix (stable: lower flat index first on ties)."""
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    idx = torch.sort(scores.reshape(-1), stable=True).indices[:k]
    flat[idx] = True
    return flat.reshape(scores.shape)


class SparseGPT(Method):
    """SparseGPT with OBS weight updates; needs the input Hessian."""

    name = "sparsegpt"
    needs = frozenset({"hessian"})

    def prune(self, weight: Tensor, stats: LayerStats, spec: PruneSpec, budget: int | None = None) -> Tensor:
        return sparsegpt_prune(
            weight,
            require_hessian(stats, self.name),
            spec.target_sparsity,
            nm=spec.nm,
            blocksize=spec.blocksize,
            percdamp=spec.percdamp,
            budget=None if spec.nm is not None else budget,
        )
