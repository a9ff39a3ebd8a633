"""Per-layer calibration statistics gathered from a linear layer's inputs.

The engine creates one :class:`StatsAccumulator` per prunable layer, feeds it every layer
input (any leading shape, any float dtype) from a forward (pre-)hook, and hands
:meth:`StatsAccumulator.result` to the pruning method. Layers that receive the very same input
tensor (q/k/v projections, gate/up) share one :class:`InputPartial` per batch through
:class:`SharedInputs`: the input's fp32 cast and squared-norm sum are computed once, and every
accumulator adds the same values in the same order as :meth:`StatsAccumulator.add` would, so
the statistics are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["KNOWN_NEEDS", "InputPartial", "LayerStats", "SharedInputs", "StatsAccumulator", "check_needs"]

KNOWN_NEEDS = frozenset({"xnorm", "hessian"})
"""Statistics a method may declare in ``Method.needs``; each maps to a field of :class:`LayerStats`."""


def check_needs(needs: frozenset[str] | set[str]) -> None:
    """Refuse a method that needs statistics the engine does not know how to collect."""
    unknown = set(needs) - KNOWN_NEEDS
    if unknown:
        raise ValueError(f"unknown statistics {sorted(unknown)}; the engine collects {sorted(KNOWN_NEEDS)}")


SUM_ROWS = 256
"""Rows per chunk of the fp64 sum of squares: a cache-sized chunk is reduced about 4x faster on
CPU than a whole batch of thousands of tokens at once (the result differs only in fp64 rounding)."""


def _sum_of_squares(x: Tensor) -> Tensor:
    """fp64 ``sum_t x_t ** 2`` over the rows of fp32 ``x`` ``[t, in]``, reduced chunk by chunk."""
    if x.shape[0] <= SUM_ROWS:
        return x.square().sum(dim=0, dtype=torch.float64)
    out = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(SUM_ROWS):
        out += chunk.square().sum(dim=0, dtype=torch.float64)
    return out


@dataclass
class LayerStats:
    """Statistics of one layer's calibration inputs.

    ``xnorm_sq``: fp32 ``[in]``, sum over all calibration tokens of ``x_j ** 2`` (Wanda).
    ``hessian``: fp32 ``[in, in]``, ``2 / ntokens * sum_t x_t x_t^T`` (SparseGPT).
    ``ntokens``: number of calibration tokens seen.
    ``xsum``: fp32 ``[in]``, sum over all tokens of ``x_j`` (DSnoT's mean and variance).
    ``gram``: fp32 ``[in, in]``, ``sum_t x_t x_t^T`` over the first ``gram_tokens`` tokens only
    (DSnoT's row guard; ``core.methods.dsnot``).
    ``sample``: fp32 ``[k, in]``, every ``sample_every``-th calibration token (up to
    ``sample_tokens``, starting at token ``sample_every // 2``), spread over the whole calibration
    set: the reconstruction-error estimate (``core.methods.recon``).
    """

    xnorm_sq: Tensor | None
    hessian: Tensor | None
    ntokens: int
    xsum: Tensor | None = None
    gram: Tensor | None = None
    gram_tokens: int = 0
    sample: Tensor | None = None


@dataclass
class InputPartial:
    """One batch of layer inputs, prepared once: ``x`` fp32 ``[t, in]`` on the accumulator's
    device and, when computed, ``xnorm_sq`` = fp64 ``sum_t x_t ** 2`` ``[in]``."""

    x: Tensor
    xnorm_sq: Tensor | None
    xsum: Tensor | None = None


class StatsAccumulator:
    """Accumulates :class:`LayerStats` batch by batch, in fp32, on the inputs' device.

    The Hessian is kept as a running average (rescaled by ``n / (n + t)`` before each batch
    of ``t`` tokens is added), as in SparseGPT, so it never grows with the token count.
    """

    def __init__(
        self,
        in_features: int,
        need_xnorm: bool,
        need_hessian: bool,
        device: torch.device | str | None = None,
        need_xsum: bool = False,
        gram_tokens: int = 0,
        sample_tokens: int = 0,
        sample_every: int = 1,
    ) -> None:
        self.in_features = in_features
        self.need_xnorm = need_xnorm
        self.need_hessian = need_hessian
        self.need_xsum = need_xsum
        self.gram_tokens = gram_tokens
        self.ntokens = 0
        self._xsum: Tensor | None = None
        self._gram: Tensor | None = None
        self._gram_seen = 0
        self.sample_tokens = sample_tokens
        self.sample_every = max(1, sample_every)
        self._sample: list[Tensor] = []
        self._sampled = 0
        self._device = torch.device(device) if device is not None else None
        self._xnorm: Tensor | None = None
        self._hessian: Tensor | None = None

    def _alloc(self, device: torch.device) -> None:
        if self.need_xnorm and self._xnorm is None:
            # fp64 for the running sum is cheap ([in]) and avoids drift over many tokens.
            self._xnorm = torch.zeros(self.in_features, dtype=torch.float64, device=device)
        if self.need_hessian and self._hessian is None:
            size = (self.in_features, self.in_features)
            self._hessian = torch.zeros(size, dtype=torch.float32, device=device)
        if self.need_xsum and self._xsum is None:
            self._xsum = torch.zeros(self.in_features, dtype=torch.float64, device=device)
        if self.gram_tokens and self._gram is None:
            size = (self.in_features, self.in_features)
            self._gram = torch.zeros(size, dtype=torch.float32, device=device)

    def _target(self, x: Tensor) -> torch.device:
        return self._device if self._device is not None else x.device

    @torch.no_grad()
    def partial(self, x: Tensor) -> InputPartial:
        """Prepare a batch of inputs ``[..., in]`` for :meth:`add_partial` (shareable)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        x2 = x.detach().reshape(-1, self.in_features).to(device=self._target(x), dtype=torch.float32)
        sq = _sum_of_squares(x2) if self.need_xnorm and x2.shape[0] else None
        xs = x2.sum(dim=0, dtype=torch.float64) if self.need_xsum and x2.shape[0] else None
        return InputPartial(x=x2, xnorm_sq=sq, xsum=xs)

    def accepts(self, p: InputPartial) -> bool:
        """Whether ``p`` holds everything this accumulator needs, on its device."""
        return (
            p.x.shape[-1] == self.in_features
            and (self._device is None or p.x.device == self._device)
            and (p.xnorm_sq is not None or not self.need_xnorm or p.x.shape[0] == 0)
            and (p.xsum is not None or not self.need_xsum or p.x.shape[0] == 0)
        )

    @torch.no_grad()
    def add_partial(self, p: InputPartial) -> None:
        """Add a prepared batch (from this or an :meth:`accepts`-compatible accumulator)."""
        if not self.accepts(p):
            raise ValueError("input partial does not match this accumulator (features, device or xnorm)")
        x2 = p.x
        t = x2.shape[0]
        if t == 0:
            return
        self._alloc(x2.device)
        if self._xnorm is not None:
            assert p.xnorm_sq is not None
            self._xnorm += p.xnorm_sq
        if self._hessian is not None:
            n = self.ntokens
            self._hessian.mul_(n / (n + t))
            self._hessian.addmm_(x2.t(), x2, alpha=2.0 / (n + t))
        if self._xsum is not None:
            assert p.xsum is not None
            self._xsum += p.xsum
        if self._gram is not None and self._gram_seen < self.gram_tokens:
            head = x2[: self.gram_tokens - self._gram_seen]
            self._gram.addmm_(head.t(), head)
            self._gram_seen += head.shape[0]
        if self._sampled < self.sample_tokens:
            # Global token indices ntokens .. ntokens+t-1; keep those = every/2 (mod every), which
            # skips each window's first token (often an outlier "attention sink") when every | seqlen.
            first = (self.sample_every // 2 - self.ntokens) % self.sample_every
            rows = x2[first :: self.sample_every][: self.sample_tokens - self._sampled]
            if rows.shape[0]:
                self._sample.append(rows.clone())
                self._sampled += rows.shape[0]
        self.ntokens += t

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs shaped ``[..., in]`` (upcast to fp32)."""
        self.add_partial(self.partial(x))

    def result(self) -> LayerStats:
        """The statistics so far (zeros when nothing was added)."""
        device = self._device if self._device is not None else torch.device("cpu")
        self._alloc(device)
        xnorm = self._xnorm.to(torch.float32) if self._xnorm is not None else None
        xsum = self._xsum.to(torch.float32) if self._xsum is not None else None
        return LayerStats(
            xnorm_sq=xnorm,
            hessian=self._hessian,
            ntokens=self.ntokens,
            xsum=xsum,
            gram=self._gram,
            gram_tokens=self._gram_seen,
            sample=torch.cat(self._sample) if self._sample else None,
        )


class SharedInputs:
    """Forward-hook factory: consecutive layers called on the same input tensor share its partial.

    The last input seen (by identity and in-place version counter) and its
    :class:`InputPartial` are kept; a hook receiving that same, unmodified tensor reuses the
    partial instead of recomputing it. Call :meth:`clear` after each batch to drop the reference.
    ``computed`` / ``shared`` count partials computed and reused.
    """

    def __init__(self) -> None:
        self._last: tuple[Tensor, int, InputPartial] | None = None
        self.computed = 0
        self.shared = 0

    def partial_for(self, x: Tensor, acc: StatsAccumulator) -> InputPartial:
        """``acc``'s partial for input ``x``, reused when ``x`` is the previous input."""
        last = self._last
        if last is not None and last[0] is x and last[1] == x._version and acc.accepts(last[2]):
            self.shared += 1
            return last[2]
        p = acc.partial(x)
        self._last = (x, x._version, p)
        self.computed += 1
        return p

    def hook(self, acc: StatsAccumulator) -> Callable[..., None]:
        """A forward hook or forward pre-hook callback feeding ``acc`` the layer's first input."""

        def fn(_module: Any, inputs: tuple[Any, ...], *_output: Any) -> None:
            acc.add_partial(self.partial_for(inputs[0], acc))

        return fn

    def clear(self) -> None:
        """Forget the last input (call between batches)."""
        self._last = None
