"""Per-layer calibration statistics gathered from a linear layer's inputs.

The engine creates one :class:`StatsAccumulator` per prunable layer, calls
:meth:`StatsAccumulator.add` from a forward hook with the layer input (any leading shape,
any float dtype), and hands :meth:`StatsAccumulator.result` to the pruning method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerStats", "StatsAccumulator"]


@dataclass
class LayerStats:
    """Statistics of one layer's calibration inputs.

    ``xnorm_sq``: fp32 ``[in]``, sum over all calibration tokens of ``x_j ** 2`` (Wanda).
    ``hessian``: fp32 ``[in, in]``, ``2 / ntokens * sum_t x_t x_t^T`` (SparseGPT).
    ``ntokens``: number of calibration tokens seen.
    """

    xnorm_sq: Tensor | None
    hessian: Tensor | None
    ntokens: int


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
    ) -> None:
        self.in_features = in_features
        self.need_xnorm = need_xnorm
        self.need_hessian = need_hessian
        self.ntokens = 0
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

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Add a batch of inputs shaped ``[..., in]`` (upcast to fp32)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        device = self._device if self._device is not None else x.device
        x2 = x.detach().reshape(-1, self.in_features).to(device=device, dtype=torch.float32)
        t = x2.shape[0]
        if t == 0:
            return
        self._alloc(device)
        if self._xnorm is not None:
            self._xnorm += x2.square().sum(dim=0, dtype=torch.float64)
        if self._hessian is not None:
            n = self.ntokens
            self._hessian.mul_(n / (n + t))
            self._hessian.addmm_(x2.t(), x2, alpha=2.0 / (n + t))
        self.ntokens += t

    def result(self) -> LayerStats:
        """The statistics so far (zeros when nothing was added)."""
        device = self._device if self._device is not None else torch.device("cpu")
        self._alloc(device)
        xnorm = self._xnorm.to(torch.float32) if self._xnorm is not None else None
        return LayerStats(xnorm_sq=xnorm, hessian=self._hessian, ntokens=self.ntokens)
