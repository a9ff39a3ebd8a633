"""Perplexity over non-overlapping windows, and measured sparsity of the prunable layers.

Perplexity: the evaluation text is tokenized as one stream of ``T`` tokens (no special
tokens) and cut into ``W = min(floor(T / seqlen), max_windows)`` consecutive, non-overlapping
windows of ``seqlen`` tokens (the tail is dropped). Each window is scored independently and

    ppl = exp( sum over windows and positions t = 1..seqlen-1 of -log p(x_t | x_<t)
               / (W * (seqlen - 1)) )

i.e. the first token of each window is context only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import CalibrationError
from core.model import families
from core.spec import PruneSpec

__all__ = [
    "FORMULA",
    "SparsityCounter",
    "eval_windows",
    "perplexity",
    "ppl_result",
    "sparsity_report",
    "window_nll",
]

FORMULA = (
    "W = min(floor(T / seqlen), max_windows) non-overlapping windows of the tokenized text (T tokens); "
    "ppl = exp(sum of next-token NLL over positions 1..seqlen-1 of every window / (W * (seqlen - 1)))"
)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """The ``[W, seqlen]`` windows of the token stream ``ids`` (see the module docstring)."""
    ids = ids.reshape(-1)
    total = int(ids.numel())
    windows = total // seqlen
    if max_windows is not None:
        windows = min(windows, max_windows)
    if windows < 1:
        raise CalibrationError(
            f"evaluation text is too short: one window of seqlen={seqlen} needs {seqlen} tokens, "
            f"found {total}"
        )
    return ids[: windows * seqlen].reshape(windows, seqlen)


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Summed next-token NLL of a batch of windows (positions 1..seqlen-1), in float64."""
    logits = logits[:, :-1, :].float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
    return float(loss.double().item())


def ppl_result(nll: float, windows: int, seqlen: int, tokens: int) -> dict[str, Any]:
    """The perplexity record from the summed NLL of ``windows`` windows."""
    ntok = windows * (seqlen - 1)
    mean = nll / ntok
    return {
        "ppl": math.exp(mean) if mean < 700 else float("inf"),
        "nll": mean,
        "windows": windows,
        "seqlen": seqlen,
        "tokens": tokens,
        "scored_tokens": ntok,
        "formula": FORMULA,
    }


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on the token stream ``ids`` (see the module docstring for the formula),
    with whole-model forwards (:func:`core.evaluation.block_eval.perplexity` evaluates block by block)."""
    data = eval_windows(ids, seqlen, max_windows)
    windows = data.shape[0]
    device = next(model.parameters()).device
    nll = 0.0
    done = 0
    for start in range(0, windows, batch_size):
        batch = data[start : start + batch_size].to(device)
        nll += window_nll(model(input_ids=batch, use_cache=False).logits, batch)
        done += batch.shape[0]
        if on_window is not None:
            on_window(done, windows)
    return ppl_result(nll, windows, seqlen, int(ids.numel()))


class SparsityCounter:
    """Accumulates :func:`sparsity_report` over groups of linears (e.g. one block at a time)."""

    def __init__(self, spec: PruneSpec | None = None) -> None:
        self.spec = spec
        self.layers: dict[str, float] = {}
        self.ignored: list[str] = []
        self.nm_ok: bool | None = True if spec is not None and spec.nm is not None else None
        self._zeros = self._numel = self._all_zeros = self._all_numel = 0

    @torch.no_grad()
    def add(self, linears: dict[str, Any]) -> None:
        """Count the zeros of ``{qualified name: linear or families.Target}``."""
        from core.methods.masks import check_nm

        ignore = self.spec.ignore if self.spec is not None else []
        nm = self.spec.nm if self.spec is not None else None
        for name, mod in linears.items():
            w = families.get_weight(mod)
            z = int((w == 0).sum().item())
            self._all_zeros += z
            self._all_numel += w.numel()
            if families.is_ignored(name, ignore):
                self.ignored.append(name)
                continue
            self.layers[name] = z / w.numel()
            self._zeros += z
            self._numel += w.numel()
            if nm is not None and not check_nm(w, nm[0], nm[1]):
                self.nm_ok = False

    def report(self) -> dict[str, Any]:
        """The :func:`sparsity_report` dict of everything added so far."""
        return {
            "target": self.spec.target_sparsity if self.spec is not None else None,
            "overall": self._zeros / self._numel if self._numel else 0.0,
            "all_linears": self._all_zeros / self._all_numel if self._all_numel else 0.0,
            "layers": self.layers,
            "ignored": self.ignored,
            "nm_ok": self.nm_ok,
        }


@torch.no_grad()
def sparsity_report(model: nn.Module, spec: PruneSpec | None = None) -> dict[str, Any]:
    """Measured zeros of every prunable linear inside the decoder blocks.

    ``layers`` and ``overall`` cover the layers not excluded by ``spec.ignore``; ``nm_ok`` is
    whether every group of M consecutive input columns of those layers has at least M-N zeros
    (None for unstructured). ``all_linears`` is the zero fraction including ignored layers.
    """
    counter = SparsityCounter(spec)
    counter.add(families.prunable_targets(model, routers=bool(spec and spec.prune_routers)))
    return counter.report()
