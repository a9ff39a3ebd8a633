"""Pruned tiny checkpoints for the artifact format tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from core.methods import masks
from tests import tiny_models

DENSE_LAYER = "model.layers.0.self_attn.q_proj"
"""A linear left dense in every pruned checkpoint (as if ignored)."""


def prune_tiny(pattern: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A tied-embedding tiny llama in ``dtype`` whose linears (except DENSE_LAYER) are magnitude
    pruned to ``pattern`` ('0.3', '0.5', '0.9' unstructured or 'N:M'), with a -0.0 kept in a
    pruned layer and a zero that was zero before pruning."""
    cfg = tiny_models.config("llama")
    cfg.tie_word_embeddings = True
    torch.manual_seed(seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or name == "lm_head" or name == DENSE_LAYER:
                continue
            w = mod.weight
            if ":" in pattern:
                n, m = (int(x) for x in pattern.split(":"))
                mask = masks.nm_mask(w.abs(), n, m)
            else:
                mask = masks.row_mask(w.abs(), float(pattern))
            masks.apply_mask(w, mask)
            kept = (~mask).nonzero()
            r, c = kept[0].tolist()
            w[r, c] = -0.0  # a signed zero in a kept position
            r, c = kept[-1].tolist()
            w[r, c] = 0.0  # a kept weight that is zero already
    return model.to(dtype)


@pytest.fixture
def pruned_dir(tmp_path: Path) -> Callable[..., Path]:
    """``pruned_dir(pattern, dtype, shard)`` -> a saved pruned tiny checkpoint with tokenizer."""

    def make(pattern: str, dtype: torch.dtype = torch.float32, shard: str = "5GB") -> Path:
        out = tmp_path / f"dense-{pattern.replace(':', '-')}-{str(dtype)[6:]}"
        prune_tiny(pattern, dtype).save_pretrained(out, max_shard_size=shard)
        tiny_models.tokenizer().save_pretrained(out)
        return out

    return make
