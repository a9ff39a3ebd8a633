"""Pruning one decoder block: its target matrices, the checks made before any work, and
:func:`prune_block` (statistics over the batches, then every matrix pruned in place).

Experts: an expert that saw no calibration token is pruned by magnitude, with a warning.
SparseGPT keeps one ``in × in`` fp32 Hessian per matrix of a block (so ``E × in²`` for fused
experts); above :func:`hessian_limit_bytes` per block the run is refused before any work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import InvalidInput
from core.model import families
from core.model.capture import Batch
from core.run.block_stats import collect_stats
from core.settings import EngineSettings
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.methods.base import Method

__all__ = [
    "BlockResult",
    "check_hessian_memory",
    "check_nm_shapes",
    "hessian_limit_bytes",
    "method_named",
    "prune_block",
    "prune_targets",
]


def hessian_limit_bytes() -> int:
    """Largest total of Hessians (fp32 ``in × in`` per pruned matrix: SparseGPT, ALPS,
    reconstruction) held for one block (``PRUNE_HESSIAN_LIMIT_BYTES``, read when used)."""
    return EngineSettings.from_env().hessian_limit_bytes


def __getattr__(name: str) -> int:
    """``HESSIAN_LIMIT_BYTES``: the old constant's name, now the value read when used."""
    if name == "HESSIAN_LIMIT_BYTES":
        return hessian_limit_bytes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def method_named(name: str) -> Method:
    """The registered method ``name`` (:mod:`core.methods`)."""
    from core.methods import get_method

    return get_method(name)


@dataclass
class BlockResult:
    """What :func:`prune_block` did to one block."""

    layers: dict[str, float] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    """Calibration tokens seen by each pruned matrix."""
    fallback: list[str] = field(default_factory=list)
    """Matrices that saw no token and were pruned by magnitude."""
    mask_s: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer report records (method, allocation, refine, sparsity, recon_error, ...)."""


def prune_targets(
    block: nn.Module, prefix: str, spec: PruneSpec
) -> tuple[dict[str, families.Target], list[str]]:
    """``({name: target}, ignored names)``: the matrices of ``block`` that ``spec`` prunes."""
    allt = families.block_targets(block, prefix, routers=spec.prune_routers)
    targets = {n: t for n, t in allt.items() if not families.is_ignored(n, spec.ignore)}
    return targets, [n for n in allt if n not in targets]


def check_hessian_memory(
    targets: dict[str, families.Target], method: Method, where: str, spec: PruneSpec | None = None
) -> None:
    """Refuse SparseGPT/ALPS/reconstruction when one block's Hessians exceed :func:`hessian_limit_bytes`."""
    if "hessian" not in method.needs and (spec is None or spec.reconstruct == "none"):
        return
    need = sum(4 * t.in_features**2 for t in targets.values())
    limit = hessian_limit_bytes()
    if need > limit:
        nexp = sum(1 for t in targets.values() if t.is_expert)
        raise InvalidInput(
            f"{method.name} needs one fp32 in x in Hessian per pruned matrix of a block: {where} has "
            f"{len(targets)} matrices ({nexp} of them expert matrices) = {need / 2**30:.1f} GiB, above the "
            f"limit of {limit / 2**30:.1f} GiB (PRUNE_HESSIAN_LIMIT_BYTES); use wanda or "
            "magnitude for this model, or keep experts dense with 'ignore'"
        )


@torch.no_grad()
def prune_block(
    block: nn.Module,
    block_prefix: str,
    batches: Sequence[Batch],
    method: Method,
    spec: PruneSpec,
    budgets: dict[str, int] | None = None,
    total_tokens: int = 0,
) -> BlockResult:
    """Collect the statistics ``method.needs`` over ``batches``, then prune ``block`` in place.

    The single per-block step of every mode. Producing the next block's inputs is the caller's.
    A matrix that saw no calibration token (an expert the router never chose) is pruned by
    magnitude and listed in ``fallback``. ``total_tokens``: calibration tokens in ``batches``
    (spreads the error report's input sample over all of them; 0: the first tokens).
    """
    from core.methods import get_method
    from core.methods.stats import LayerStats
    from core.run.layer_prune import layer_needs, prune_layer

    targets, ignored = prune_targets(block, block_prefix, spec)
    res = BlockResult(ignored=ignored)
    needs = layer_needs(method, spec, total_tokens)
    stats = collect_stats(block, targets, batches, needs) if targets and needs.any else {}
    for name, t in targets.items():
        weight = t.get_weight()
        st = stats.pop(name, None) or LayerStats(xnorm_sq=None, hessian=None, ntokens=0)
        use = method
        if needs.any and st.ntokens == 0:
            use = get_method("magnitude")
            res.fallback.append(name)
        tm = time.perf_counter()
        outcome = prune_layer(weight, st, use, spec, None if budgets is None else budgets.get(name))
        mask = outcome.mask
        res.mask_s += time.perf_counter() - tm
        t.set_weight(weight)
        res.layers[name] = outcome.record["sparsity"]
        res.records[name] = outcome.record
        res.numel[name] = mask.numel()
        res.tokens[name] = st.ntokens
        del st
    return res


def check_nm_shapes(model: nn.Module, family: families.Family, spec: PruneSpec) -> None:
    """Refuse, before any work, an N:M pattern whose M does not divide a pruned matrix's inputs."""
    nm = spec.nm
    if nm is None:
        return
    for i, block in enumerate(families.get_blocks(model, family)):
        for name, t in prune_targets(block, f"{family.blocks}.{i}", spec)[0].items():
            if t.in_features % nm[1]:
                raise InvalidInput(
                    f"layer {name} has {t.in_features} input features, "
                    f"not a multiple of M={nm[1]} for pattern {spec.pattern}"
                )
