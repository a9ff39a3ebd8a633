"""THE BASELINE: a deliberately straightforward Wanda, written like the reference implementation.

Used only by ``bench/speed.py`` to measure the engine against. It is faithful to the reference
code's structure (``prune_wanda`` in locuslab/wanda):

* block 0's inputs are caught one calibration sample at a time;
* every block is run on the samples **one at a time** (batch size 1), with forward hooks that
  accumulate ``||X_j||^2`` per input feature of each linear;
* N:M masks are built with a Python loop over groups of M columns
  (``for ii in range(W_metric.shape[1]): if ii % prune_m == 0: ...``); unstructured masks prune
  the lowest ``int(in * sparsity)`` scores of every row via a sort;
* the block is re-run sample by sample to produce the next block's inputs.

Numerics and tie rule are the engine's, so that masks can be compared bit for bit: the squared
norms are summed in fp64 and read as fp32, the score is ``|W| * sqrt(xnorm)`` in fp32, and sorts
are stable (among equal scores the lower column index is pruned first). The reference's
``torch.topk`` is not stable, hence the stable sort in its place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.model import families


class _Caught(Exception):
    pass


@torch.no_grad()
def _catch_inputs(model: nn.Module, calibration: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Block 0's (hidden, kwargs) for each calibration sample, caught one sample at a time."""
    block0 = families.get_blocks(model)[0]
    caught: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def catcher(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs.pop("past_key_values", None)
        kwargs.pop("past_key_value", None)
        kwargs["use_cache"] = False
        caught.append((hidden, kwargs))
        raise _Caught

    handle = block0.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for j in range(calibration.shape[0]):
            try:
                model(input_ids=calibration[j : j + 1], use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    return caught


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def prune_wanda_baseline(
    model: nn.Module, calibration: torch.Tensor, sparsity: float, prune_n: int = 0, prune_m: int = 0
) -> dict[str, float]:
    """Prune ``model`` in place with Wanda; ``prune_n:prune_m`` > 0 for N:M. Returns per-layer sparsity."""
    model.eval()
    fam = families.family_for(model)
    blocks = families.get_blocks(model, fam)
    inps = _catch_inputs(model, calibration.long())
    report: dict[str, float] = {}
    for i, block in enumerate(blocks):
        subset = families.block_linears(block, f"{fam.blocks}.{i}")
        scaler_row = {
            name: torch.zeros(families.in_features(m), dtype=torch.float64) for name, m in subset.items()
        }

        def add_batch(name: str, scaler_row: dict[str, torch.Tensor] = scaler_row):
            def hook(_m: nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
                x = inp[0].reshape(-1, inp[0].shape[-1]).float()
                scaler_row[name] += x.square().sum(dim=0, dtype=torch.float64)

            return hook

        handles = [m.register_forward_hook(add_batch(name)) for name, m in subset.items()]
        for hidden, kwargs in inps:  # one sample at a time
            block(hidden, **kwargs)
        for h in handles:
            h.remove()

        for name, module in subset.items():
            weight = families.get_weight(module)
            W_metric = torch.abs(weight) * torch.sqrt(scaler_row[name].to(torch.float32).reshape(1, -1))
            W_mask = torch.zeros_like(W_metric, dtype=torch.bool)
            if prune_n != 0:
                for ii in range(W_metric.shape[1]):
                    if ii % prune_m == 0:
                        tmp = W_metric[:, ii : ii + prune_m].float()
                        idx = torch.sort(tmp, dim=1, stable=True)[1][:, : prune_m - prune_n]
                        W_mask.scatter_(1, ii + idx, True)
            else:
                sort_res = torch.sort(W_metric, dim=-1, stable=True)
                indices = sort_res[1][:, : int(W_metric.shape[1] * sparsity)]
                W_mask.scatter_(1, indices, True)
            weight[W_mask] = 0
            families.set_weight(module, weight)
            report[name] = W_mask.float().mean().item()

        inps = [(_first(block(hidden, **kwargs)), kwargs) for hidden, kwargs in inps]
    return report
