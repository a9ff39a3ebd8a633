"""One layer's pruning step: method mask (with an optional exact budget), optional DSnoT
refinement, optional reconstruction of the kept weights, reconstruction error, and the layer's
report record. Tensor-level, no model walking.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from core.errors import InvalidInput
from core.methods.dsnot import dsnot_refine, keep_better_rows
from core.methods.recon import sample_error
from core.methods.reconstruct import SolveInfo, admm_fixed, normalise, pcg_refine
from core.methods.stats import LayerStats
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.methods.base import Method

__all__ = ["DSNOT_GRAM_TOKENS", "LayerNeeds", "LayerOutcome", "layer_needs", "prune_layer"]

DSNOT_GRAM_TOKENS = 2048
"""DSnoT keeps a row's refinement only if its output error on the Gram of the layer's first this
many calibration inputs did not grow (the full Hessian instead, when the method collects it)."""


@dataclass(frozen=True)
class LayerNeeds:
    """Which statistics the layer loop must collect for ``method`` under ``spec``."""

    xnorm: bool
    hessian: bool
    xsum: bool
    gram_tokens: int
    """DSnoT's row guard: the Gram of the first this many tokens (0: none)."""
    sample_tokens: int = 0
    """The error report's input sample: this many tokens, every ``sample_every``-th."""
    sample_every: int = 1

    @property
    def any(self) -> bool:
        return self.xnorm or self.hessian or self.xsum or self.gram_tokens > 0 or self.sample_tokens > 0


def layer_needs(method: Method, spec: PruneSpec, total_tokens: int = 0) -> LayerNeeds:
    """``method.needs`` plus what DSnoT (mean, variance, norms, a Gram) and the error report (a
    sample of ``spec.recon_tokens`` inputs spread over ``total_tokens`` calibration tokens) need.

    Methods that read no statistics (magnitude without refinement) get none: no forward passes,
    and their report has no reconstruction error.
    """
    dsnot = spec.refine == "dsnot"
    hessian = "hessian" in method.needs or spec.reconstruct != "none"
    if not method.needs and not dsnot and not hessian:
        return LayerNeeds(False, False, False, 0)
    return LayerNeeds(
        xnorm="xnorm" in method.needs or dsnot,
        hessian=hessian,
        xsum=dsnot,
        gram_tokens=DSNOT_GRAM_TOKENS if dsnot and not hessian else 0,
        sample_tokens=spec.recon_tokens,
        sample_every=max(1, total_tokens // spec.recon_tokens),
    )


@dataclass
class LayerOutcome:
    """The final mask (True = pruned) and the layer's report record."""

    mask: Tensor
    record: dict[str, Any] = field(default_factory=dict)


def _dsnot_gram(stats: LayerStats) -> Tensor | None:
    """DSnoT's guard matrix: the full Hessian when collected, else the first-tokens Gram."""
    if stats.hessian is not None and stats.ntokens:
        return stats.hessian
    if stats.gram is not None and stats.gram_tokens:
        return stats.gram
    return None


def _dsnot_stage(
    weight: Tensor, dense: Tensor, mask: Tensor, perm: Tensor | None, stats: LayerStats, spec: PruneSpec
) -> tuple[Tensor, dict[str, int]]:
    """DSnoT's swaps on ``mask`` (in ``perm``'s column order for permuted N:M), rows kept only where
    the output error did not grow; writes the method's values (pruned ones regrown dense) to ``weight``."""
    gram = _dsnot_gram(stats)
    if stats.xsum is None or stats.xnorm_sq is None or not stats.ntokens or gram is None:
        raise InvalidInput("refine 'dsnot' needs input means, norms and a Gram matrix; none were collected")
    n = stats.ntokens
    mean = stats.xsum / n
    var = (stats.xnorm_sq / n - mean.square()).clamp_min(0)
    # Pruned entries are regrown at their dense values; kept ones keep the method's values.
    values = torch.where(mask, dense, weight.detach().float())
    p = perm
    vp, mp = (values[:, p], mask[:, p]) if p is not None else (values, mask)
    res = dsnot_refine(
        vp,
        mp,
        mean[p] if p is not None else mean,
        var[p] if p is not None else var,
        stats.xnorm_sq[p] if p is not None else stats.xnorm_sq,
        nm=spec.nm,
        iters=spec.dsnot_iters,
        threshold=spec.dsnot_threshold,
        var_power=spec.dsnot_var_power,
    )
    refined = res.mask
    if p is not None:
        back = torch.empty_like(refined)
        back[:, p] = refined
        refined = back
    final = keep_better_rows(dense, values, mask, refined, gram)
    weight.copy_(values.to(weight.dtype))
    kept = int((final != mask).any(dim=1).sum())
    return final, {"swaps": res.swaps, "cycles": res.cycles, "rows_kept_refined": kept}


def _reconstruct_stage(
    weight: Tensor, dense: Tensor, mask: Tensor, stats: LayerStats, spec: PruneSpec
) -> dict[str, Any]:
    """Solve the kept weights of ``weight`` on ``mask`` against the layer's Hessian (in place; the
    pruned entries become exactly zero, the mask is unchanged); return the layer's record entry."""
    if stats.hessian is None:
        raise InvalidInput(f"reconstruct {spec.reconstruct!r} needs the input Hessian; none was collected")
    start = weight.detach().float().masked_fill(mask, 0)
    rec: dict[str, Any] = {"solver": spec.reconstruct}
    if stats.sample is not None and stats.sample.shape[0]:
        rec["err_before"] = sample_error(dense, start, stats.sample)
    norm = normalise(stats.hessian.to(start.device), spec.percdamp)
    wn, keep = norm.to_norm(dense.to(start.device)), ~mask.to(start.device)
    if spec.reconstruct == "admm":
        v, info = admm_fixed(wn, norm.gram, keep, norm.to_norm(start), cg_iters=spec.reconstruct_iters,
                             tol=spec.reconstruct_tol)  # fmt: skip
    else:
        t0 = time.perf_counter()
        iters, tol = spec.reconstruct_iters, spec.reconstruct_tol
        v, cg = pcg_refine(wn, norm.gram, keep, norm.to_norm(start), iters, tol)
        info = SolveInfo(cg_iters=cg, seconds=time.perf_counter() - t0)
    weight.copy_(norm.from_norm(v).masked_fill(~keep, 0).to(weight.dtype))
    return {**rec, **info.as_record()}


@torch.no_grad()
def prune_layer(
    weight: Tensor, stats: LayerStats, method: Method, spec: PruneSpec, budget: int | None = None
) -> LayerOutcome:
    """Prune ``weight`` (fp32 ``[out, in]``) in place (zeroes included); return mask and record.

    Stages: the method's mask (and its weight update), DSnoT's swaps, the reconstruction of the
    kept weights (``spec.reconstruct``; skipped for a matrix that saw no calibration token)."""
    dense = weight.detach().float().clone()
    mask, perm, extra = method.prune_with_info(weight, stats, spec, budget)
    record: dict[str, Any] = {
        "method": spec.method,
        "allocation": spec.allocation,
        "refine": spec.refine,
        **extra,
    }
    if budget is not None:
        record["budget"] = budget
    if spec.refine == "dsnot":
        mask, record["dsnot"] = _dsnot_stage(weight, dense, mask, perm, stats, spec)
    if spec.reconstruct != "none" and stats.ntokens:
        record["reconstruct"] = _reconstruct_stage(weight, dense, mask, stats, spec)
    weight.masked_fill_(mask.to(weight.device), 0)
    record["sparsity"] = int(torch.count_nonzero(mask)) / mask.numel()
    if stats.sample is not None and stats.sample.shape[0]:
        record["recon_error"] = sample_error(dense, weight.detach().float(), stats.sample)
        record["recon_tokens"] = int(stats.sample.shape[0])
    else:
        record["recon_error"] = None
    if perm is not None:
        record["nm_permutation"] = perm.tolist()
    return LayerOutcome(mask=mask, record=record)
