"""A few short greedy generations from fixed prompts, so a report shows what pruning did to the text."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PROMPTS: tuple[str, ...] = (
    "The capital of France is",
    "Water boils at a temperature of",
    "The three primary colors are",
)
MAX_NEW_TOKENS = 16


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, count: int) -> list[str]:
    """Greedy continuations of the first ``count`` prompts (``MAX_NEW_TOKENS`` each)."""
    device = next(model.parameters()).device
    out: list[str] = []
    for prompt in PROMPTS[:count]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad,
        )
        out.append(tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
    return out


def pair(dense: list[str] | None, pruned: list[str]) -> list[dict[str, str | None]]:
    """``[{prompt, dense, pruned}]`` for the report."""
    return [
        {"prompt": p, "dense": dense[i] if dense else None, "pruned": g}
        for i, (p, g) in enumerate(zip(PROMPTS, pruned, strict=False))
    ]
