"""Masks and low-rank adapters for the recovery fine-tune (plain torch, no peft).

:class:`MaskedLora` is a parametrization (``torch.nn.utils.parametrize``) of one pruned weight:
the forward pass sees ``(W + scale * B @ A) * mask`` with ``W`` frozen, so the merge
(``remove_parametrizations(..., leave_parametrized=True)``) writes exactly that tensor and every
pruned entry stays zero. It works in the parameter's own layout: a ``[out, in]`` linear, a
transposed ``Conv1D`` ``[in, out]`` or a fused ``[experts, a, b]`` tensor (one adapter per expert).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["MaskedLora", "keep_mask", "masked_grad_hook"]


def keep_mask(weight: Tensor) -> Tensor:
    """True where ``weight`` is non-zero (the entries pruning kept)."""
    return weight.detach() != 0


def masked_grad_hook(mask: Tensor):
    """A gradient hook zeroing the gradient of the pruned entries (masked full fine-tune)."""

    def hook(grad: Tensor) -> Tensor:
        return grad * mask

    return hook


class MaskedLora(nn.Module):
    """``W -> (W + scale * B @ A) * mask`` for a 2-D or fused 3-D weight.

    ``A`` starts Kaiming-uniform from ``generator``, ``B`` at zero (the adapted weight starts equal
    to ``W``), as in LoRA; ``scale = alpha / rank``.
    """

    def __init__(self, weight: Tensor, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        *lead, rows, cols = weight.shape
        rank = max(1, min(rank, rows, cols))
        a = torch.empty(*lead, rank, cols)
        bound = 1.0 / math.sqrt(cols)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(weight.device))
        self.lora_b = nn.Parameter(torch.zeros(*lead, rows, rank, device=weight.device))
        self.register_buffer("mask", keep_mask(weight), persistent=False)
        self.scale = alpha / rank

    def forward(self, weight: Tensor) -> Tensor:
        delta = torch.matmul(self.lora_b, self.lora_a) * self.scale
        return (weight + delta.to(weight.dtype)) * self.mask
