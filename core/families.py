"""The single registry of supported model families.

A family says where a causal LM keeps its decoder blocks, its embeddings and final norm, and
which modules inside a block are prunable linears. Only linears inside decoder blocks are ever
pruned; embeddings and ``lm_head`` never are. GPT-2 uses transformers' ``Conv1D``, which stores
its weight as ``[in, out]``: :func:`get_weight` / :func:`set_weight` transpose it so that
methods always see ``[out, in]``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import UnsupportedModel

__all__ = [
    "REGISTRY",
    "Family",
    "block_linears",
    "family_for",
    "family_for_type",
    "get_blocks",
    "get_weight",
    "in_features",
    "is_ignored",
    "is_transposed",
    "prunable_linears",
    "set_weight",
    "supported_types",
]


@dataclass(frozen=True)
class Family:
    """Where one family of causal LMs keeps its parts (dotted paths from the *ForCausalLM)."""

    name: str
    model_types: tuple[str, ...]
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str
    conv1d: bool = False


REGISTRY: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "llama",
            ("llama", "mistral", "qwen2", "qwen3", "smollm3"),
            "model.layers",
            ("model.embed_tokens",),
            "model.norm",
        ),
        Family(
            "opt",
            ("opt",),
            "model.decoder.layers",
            ("model.decoder.embed_tokens", "model.decoder.embed_positions"),
            "model.decoder.final_layer_norm",
        ),
        Family(
            "gpt_neox", ("gpt_neox",), "gpt_neox.layers", ("gpt_neox.embed_in",), "gpt_neox.final_layer_norm"
        ),
        Family(
            "bloom",
            ("bloom",),
            "transformer.h",
            ("transformer.word_embeddings", "transformer.word_embeddings_layernorm"),
            "transformer.ln_f",
        ),
        Family(
            "gpt2",
            ("gpt2",),
            "transformer.h",
            ("transformer.wte", "transformer.wpe"),
            "transformer.ln_f",
            True,
        ),
    )
}

_BY_TYPE: dict[str, Family] = {t: f for f in REGISTRY.values() for t in f.model_types}


def supported_types() -> list[str]:
    """Every supported ``config.model_type``, sorted."""
    return sorted(_BY_TYPE)


def family_for_type(model_type: str | None) -> Family:
    """The family of a ``config.model_type``; UnsupportedModel listing the supported ones otherwise."""
    fam = _BY_TYPE.get(model_type or "")
    if fam is None:
        raise UnsupportedModel(
            f"unsupported model architecture {model_type!r}; "
            f"supported model types: {', '.join(supported_types())}"
        )
    return fam


def family_for(model_or_config: Any) -> Family:
    """The family of a model (or its config), keyed by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    return family_for_type(getattr(config, "model_type", None))


def _get(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def get_blocks(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model``."""
    family = family or family_for(model)
    try:
        return _get(model, family.blocks)
    except AttributeError:
        raise UnsupportedModel(
            f"model of type {type(model).__name__} has no decoder blocks at {family.blocks!r}; "
            "load it as a causal LM (AutoModelForCausalLM)"
        ) from None


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_transposed(module: nn.Module) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored ``[in, out]``)."""
    return _is_conv1d(module)


def prunable_linears(model: nn.Module, family: Family | None = None) -> dict[str, nn.Module]:
    """Every prunable linear inside the decoder blocks, by qualified name (``model.layers.0.mlp.up_proj``)."""
    family = family or family_for(model)
    blocks = get_blocks(model, family)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        out.update(block_linears(block, f"{family.blocks}.{i}"))
    return out


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The prunable linears of one block, by qualified name."""
    return {
        f"{prefix}.{name}": mod
        for name, mod in block.named_modules()
        if name and (isinstance(mod, nn.Linear) or _is_conv1d(mod))
    }


def is_ignored(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether the qualified layer ``name`` matches any fnmatch pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def in_features(module: nn.Module) -> int:
    """Input width of a prunable linear."""
    w = module.weight
    return int(w.shape[0] if is_transposed(module) else w.shape[1])


def get_weight(module: nn.Module) -> torch.Tensor:
    """A fresh fp32 ``[out, in]`` copy of the module's weight."""
    w = module.weight.detach()
    w = w.t() if is_transposed(module) else w
    return w.to(torch.float32).contiguous().clone()


@torch.no_grad()
def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back into the module, in its own layout and dtype."""
    w = weight.t() if is_transposed(module) else weight
    module.weight.data.copy_(w.to(dtype=module.weight.dtype, device=module.weight.device))
