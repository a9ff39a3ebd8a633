"""OWL's first pass: outlier ratios of every block on *dense* activations, then exact budgets.

OWL needs every block's scores before it can fix any block's sparsity, while the sequential
pruning pass feeds block ``i`` the outputs of the already pruned blocks ``< i``. As in the paper,
the ratios come from a separate first pass over the dense model: block by block, the captured
calibration inputs are run through each (still dense) block with forward pre-hooks collecting
``||X_j||^2`` for its prunable linears; the block's Wanda scores ``|W| ||X||`` give its outlier
ratio, and its dense outputs feed the next block. Each block runs with its own captured
arguments (attention mask of its layer type, its rotary embeddings...), and its statistics come
from the pruning pass's own collector (``core.run.engine.collect_stats``), so the ratios and budgets
cover exactly the matrices the pruning pass prunes: fused 3-D experts per expert (each from the
tokens routed to it), routers only when ``prune_routers``, ``ignore`` applied.
The cost is one extra forward of the calibration set through all blocks (no masks), reported as
``owl.first_pass_s``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from core.methods.allocation import layer_budgets, outlier_ratio, owl_sparsities
from core.methods.wanda import wanda_scores
from core.model.capture import Args
from core.model.weights import InMemory, WeightSource
from core.progress import CancelFn, check_cancel
from core.run.block_prune import prune_targets
from core.run.block_stats import collect_stats
from core.run.layer_prune import LayerNeeds
from core.spec import PruneSpec

__all__ = ["owl_budgets"]

_XNORM = LayerNeeds(xnorm=True, hessian=False, xsum=False, gram_tokens=0)


@torch.no_grad()
def owl_budgets(
    blocks: Sequence[nn.Module],
    prefix: str,
    hidden: Sequence[torch.Tensor],
    block_args: Sequence[Sequence[Args]],
    spec: PruneSpec,
    should_cancel: CancelFn | None = None,
    source: WeightSource | None = None,
) -> tuple[dict[str, int], dict[str, Any]]:
    """``({layer: pruned count}, info)`` for OWL.

    ``hidden``: block 0's input per batch (not modified); ``block_args[i][j]``: the ``(args,
    kwargs)`` the model passes block ``i`` for batch ``j`` (:class:`core.run.engine.Captured`).
    ``source``: brings each block to the compute device and releases it (default: in memory).
    """
    t0 = time.perf_counter()
    source = source or InMemory()
    hidden = list(hidden)
    ratios: list[float] = []
    numels: list[int] = []
    block_layers: list[dict[str, int]] = []
    used_blocks: list[int] = []
    for i, block in enumerate(blocks):
        check_cancel(should_cancel)
        targets = prune_targets(block, f"{prefix}.{i}", spec)[0]
        outs: list[torch.Tensor] = []
        batches = [(h, args, kwargs) for h, (args, kwargs) in zip(hidden, block_args[i], strict=True)]
        source.load(i, block)
        try:
            stats = collect_stats(block, targets, batches, _XNORM, outputs=outs)
            hidden = outs
            del batches
            if not targets:
                continue
            scores = []
            sizes: dict[str, int] = {}
            for n, t in targets.items():
                w = t.get_weight()
                xn = stats[n].xnorm_sq
                assert xn is not None
                scores.append(wanda_scores(w, xn))
                sizes[n] = w.numel()
            del stats
        finally:
            source.release(i, block)
        ratios.append(outlier_ratio(scores, spec.owl_m))
        numels.append(sum(sizes.values()))
        block_layers.append(sizes)
        used_blocks.append(i)
        del scores
    block_sp = owl_sparsities(ratios, numels, spec.target_sparsity, spec.owl_lambda) if ratios else []
    names = [n for sizes in block_layers for n in sizes]
    layer_sp = [s for s, sizes in zip(block_sp, block_layers, strict=True) for _ in sizes]
    counts = [k for sizes in block_layers for k in sizes.values()]
    budgets = dict(zip(names, layer_budgets(layer_sp, counts, spec.target_sparsity), strict=True))
    info = {
        "m": spec.owl_m,
        "lambda": spec.owl_lambda,
        "blocks": used_blocks,
        "outlier_ratios": ratios,
        "block_sparsity": block_sp,
        "first_pass_s": time.perf_counter() - t0,
    }
    return budgets, info
