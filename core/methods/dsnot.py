"""DSnoT (Zhang et al., ICLR 2024, "Dynamic Sparse No Training"): training-free mask refinement.

Pure tensor functions. For a layer with weight values ``V`` (``[out, in]``: the dense values of
pruned entries, the method's values of kept ones), a mask (True = pruned) and the per-feature
input mean ``mu`` and variance ``var``, row ``i``'s *expected reconstruction error* is
``e_i = sum_{j pruned} V_ij mu_j`` (the mean of the output lost by pruning). Each cycle, every
still-active row swaps one pruned entry back in and one kept entry out, so its sparsity (and
N:M groups) stay exact:

* **grow** the pruned entry that best cancels ``e_i``: the largest ``V_ij mu_j / var_j ** p``
  when ``e_i > 0``, the smallest when ``e_i < 0`` (``p = dsnot_var_power``; high-variance
  inputs are penalised);
* **prune** (unstructured) among kept entries whose contribution ``V_ij mu_j`` has the sign
  opposite to ``e_i``, the one with the lowest Wanda score ``|V_ij| ||X_j||``; (N:M) the kept
  entry with the lowest Wanda score in the grown entry's group of ``m``, and the swap happens
  only if it does not flip the sign of ``e_i``.

A row stops for good once ``|e_i| <= dsnot_threshold`` or it runs out of candidates; at most
``dsnot_iters`` cycles. An entry moves at most once (grow candidates are the initially pruned
entries, prune candidates the initially kept ones). Finally :func:`keep_better_rows` compares,
row by row, the true squared output error ``d G d^T`` of the refined and the initial row on
the calibration Gram matrix and keeps the better one: the layer's reconstruction error never
increases (an addition to the paper, whose swaps follow the expected error only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from core.methods.recon import row_errors

__all__ = ["DsnotResult", "dsnot_refine", "keep_better_rows"]


@dataclass
class DsnotResult:
    """The refined mask and how many swaps were made (before the row guard)."""

    mask: Tensor
    swaps: int
    cycles: int


def _take(t: Tensor, idx: Tensor) -> Tensor:
    return t.gather(1, idx.unsqueeze(1)).squeeze(1)


@torch.no_grad()
def _signed_queues(mask: Tensor, contrib: Tensor, wanda: Tensor, inf: Tensor) -> tuple[Tensor, ...]:
    """``(neg_sorted, neg_order, pos_sorted, pos_order)``: the kept entries of negative (positive)
    contribution by Wanda score ascending, the others pushed to the end (``inf``)."""
    kept = ~mask
    neg_key = torch.where(kept & (contrib < 0), wanda, inf)
    pos_key = torch.where(kept & (contrib > 0), wanda, inf)
    neg_order = torch.sort(neg_key, dim=1, stable=True).indices
    pos_order = torch.sort(pos_key, dim=1, stable=True).indices
    neg_sorted = neg_key.gather(1, neg_order)
    pos_sorted = pos_key.gather(1, pos_order)
    return neg_sorted, neg_order, pos_sorted, pos_order


def _prune_signed(queues: tuple[Tensor, ...], positive: Tensor, ppos: Tensor) -> tuple[Tensor, Tensor]:
    """Unstructured prune candidate per row at queue position ``ppos`` (the negative queue where the
    error is positive): ``(column, whether it is a real candidate)``."""
    neg_sorted, neg_order, pos_sorted, pos_order = queues
    pval = torch.where(positive, _take(neg_sorted, ppos), _take(pos_sorted, ppos))
    prune_idx = torch.where(positive, _take(neg_order, ppos), _take(pos_order, ppos))
    return prune_idx, torch.isfinite(pval)


def _prune_in_group(prune_key: Tensor, grow_idx: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """N:M prune candidate per row: the lowest-key kept entry of the grown entry's group of ``m``:
    ``(column, whether it is a real candidate)``."""
    start = grow_idx - grow_idx % m
    cols = start.unsqueeze(1) + torch.arange(m, device=grow_idx.device).unsqueeze(0)
    block = prune_key.gather(1, cols)
    best = block.argmin(dim=1)
    return start + best, torch.isfinite(_take(block, best))


def dsnot_refine(
    values: Tensor,
    mask: Tensor,
    mean: Tensor,
    var: Tensor,
    xnorm_sq: Tensor,
    nm: tuple[int, int] | None = None,
    iters: int = 50,
    threshold: float = 0.1,
    var_power: float = 1.0,
) -> DsnotResult:
    """Prune-and-grow cycles on ``mask`` (True = pruned); returns a new mask, same per-row counts."""
    v = values.detach().float()
    out_f, in_f = v.shape
    mask = mask.clone()
    dev = v.device
    mu = mean.to(device=dev, dtype=torch.float32)
    contrib = v * mu.unsqueeze(0)
    wanda = v.abs() * xnorm_sq.to(device=dev, dtype=torch.float32).clamp_min(0).sqrt().unsqueeze(0)
    err = (contrib * mask).sum(dim=1)
    sign0 = torch.sign(err)
    denom = var.to(device=dev, dtype=torch.float32).clamp_min(1e-12).pow(var_power) if var_power else None
    grow_key = contrib / denom.unsqueeze(0) if denom is not None else contrib.clone()
    # Grow candidates: initially pruned entries, by key ascending; kept ones pushed to the middle (0).
    grow_key = torch.where(mask, grow_key, torch.zeros_like(grow_key))
    grow_order = torch.sort(grow_key, dim=1, stable=True).indices
    grow_sorted = grow_key.gather(1, grow_order)
    lo = torch.zeros(out_f, dtype=torch.long, device=dev)
    hi = torch.full((out_f,), in_f - 1, dtype=torch.long, device=dev)
    inf = torch.tensor(float("inf"), device=dev)
    rows = torch.arange(out_f, device=dev)
    if nm is None:
        neg_sorted, neg_order, pos_sorted, pos_order = _signed_queues(mask, contrib, wanda, inf)
        pn = torch.zeros(out_f, dtype=torch.long, device=dev)
        pp = torch.zeros(out_f, dtype=torch.long, device=dev)
    else:
        m = nm[1]
        prune_key = torch.where(mask, inf, wanda)  # initially kept entries, lowest Wanda first
    active = torch.ones(out_f, dtype=torch.bool, device=dev)
    swaps = 0
    cycles = 0
    for _ in range(iters):
        active &= err.abs() > threshold
        if not bool(active.any()):
            break
        cycles += 1
        positive = err > 0
        gpos = torch.where(positive, hi, lo)
        gval = _take(grow_sorted, gpos)
        grow_idx = _take(grow_order, gpos)
        # A useful grow candidate is pruned and has the sign of the error it should cancel.
        ok = torch.where(positive, gval > 0, gval < 0) & _take(mask, grow_idx)
        if nm is None:
            ppos = torch.where(positive, pn, pp).clamp_max(in_f - 1)
            queues = (neg_sorted, neg_order, pos_sorted, pos_order)
            prune_idx, finite = _prune_signed(queues, positive, ppos)
        else:
            prune_idx, finite = _prune_in_group(prune_key, grow_idx, m)
        ok &= finite
        after = err + _take(contrib, prune_idx) - _take(contrib, grow_idx)
        if nm is not None:
            ok &= torch.sign(after) == sign0
        active &= ok
        upd = active
        if bool(upd.any()):
            r = rows[upd]
            mask[r, grow_idx[upd]] = False
            mask[r, prune_idx[upd]] = True
            err = torch.where(upd, after, err)
            swaps += int(upd.sum())
            if nm is not None:
                prune_key[r, prune_idx[upd]] = inf
        # Advance the pointers that were used (as in the paper, whether or not the row swapped).
        hi = torch.where(positive, hi - 1, hi).clamp_min(0)
        lo = torch.where(positive, lo, lo + 1).clamp_max(in_f - 1)
        if nm is None:
            pn = torch.where(positive, pn + 1, pn)
            pp = torch.where(positive, pp, pp + 1)
    return DsnotResult(mask=mask, swaps=swaps, cycles=cycles)


def keep_better_rows(dense: Tensor, values: Tensor, initial: Tensor, refined: Tensor, gram: Tensor) -> Tensor:
    """Per row, ``refined`` where its squared output error on ``gram`` is <= ``initial``'s, else ``initial``.

    ``dense`` is the reference weight, ``values`` the weight the masks are applied to.
    """
    v = values.detach().float()
    d = dense.detach().float()
    e_init = row_errors(d - v.masked_fill(initial, 0), gram)
    e_new = row_errors(d - v.masked_fill(refined, 0), gram)
    better = (e_new <= e_init).unsqueeze(1)
    return torch.where(better, refined, initial)
