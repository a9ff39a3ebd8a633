"""Named tensor access to a (sharded) safetensors checkpoint through transformers' own key mapping.

A checkpoint's tensor names are not always the model's ``state_dict`` names: transformers renames
some keys on load (GPT-NeoX ``embed_out`` -> ``lm_head``, old ``LayerNorm.gamma``) and *converts*
others (Mixtral's per-expert ``experts.{e}.w1/w3.weight`` are stacked and concatenated into one
fused ``experts.gate_up_proj``). :class:`Checkpoint` applies the model's conversion mapping
(``transformers.conversion_mapping.get_model_conversion_mapping``, the list ``from_pretrained``
uses) to the checkpoint's keys, so that :meth:`Checkpoint.load` returns tensors under model
names, and :meth:`Checkpoint.to_saved` reverts them (``revert_weight_conversion``, what
``save_pretrained`` does) for writing. Only the tensors asked for are read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import ModelLoadError

__all__ = ["Checkpoint", "weight_files"]


def weight_files(model_dir: Path) -> dict[str, str]:
    """``{tensor name: file name}`` from the index, or from the directory's ``*.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors index {index}: {exc}") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"model directory {model_dir} holds no safetensors weights (streaming needs them)"
        )
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                out.update({k: f.name for k in fh.keys()})
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors file {f}: {exc}") from None
    return out


@dataclass
class _Group:
    """The checkpoint tensors that make up one model tensor (or several, for a split)."""

    converter: Any | None
    """A ``WeightConverter`` (fusion, split...) or None for a plain (possibly renamed) copy."""
    sources: list[tuple[str, str]] = field(default_factory=list)
    """``(checkpoint key, matched source pattern)`` in transformers' loading order."""


def _mapping(model: nn.Module) -> tuple[list[Any], list[Any], list[Any]]:
    """``(all transforms, renamings, converters)`` of ``model``'s load-time conversion mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: checkpoint names are model names
        return [], [], []
    transforms = list(get_model_conversion_mapping(model))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return transforms, renamings, converters


class Checkpoint:
    """Reads model tensors from a (sharded) safetensors checkpoint, converting keys as on load.

    Each :meth:`load` opens the files it needs and closes them before returning, so no mmap'd
    pages stay mapped between steps. ``model`` (its parameters may be on ``meta``) provides the
    names and the conversion mapping; the mapping's transforms that matched are recorded on it
    (``model._weight_conversions``), as ``from_pretrained`` does, so that :meth:`to_saved`
    reverts exactly those.
    """

    def __init__(self, model_dir: Path, model: nn.Module) -> None:
        from transformers.core_model_loading import dot_natural_key, rename_source_key

        self.dir = model_dir
        self.model = model
        self.weight_map = weight_files(model_dir)
        transforms, renamings, converters = _mapping(model)
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        prefix = getattr(model, "base_model_prefix", "") or ""
        self._groups: dict[str, _Group] = {}
        self._alias: dict[str, str] = {}
        for key in sorted(self.weight_map, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                continue  # an unexpected checkpoint tensor: from_pretrained ignores it too
            conv = by_pattern[pattern] if pattern is not None else None
            group = self._groups.setdefault(target, _Group(conv))
            group.sources.append((key, pattern if pattern is not None else key))
            targets = conv.target_patterns if conv is not None else [target]
            for t in targets:
                self._alias[target.replace(targets[0], t)] = target
        model._weight_conversions = [t for t in transforms if t.was_used()]

    def has(self, name: str) -> bool:
        """Whether the model tensor ``name`` can be loaded from the checkpoint."""
        return name in self._alias

    def load(self, names: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in ``dtype`` (floating point only), owning its memory.

        ModelLoadError if one is missing or unreadable.
        """
        wanted: dict[str, None] = {}
        for name in names:
            if name not in self._alias:
                raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
            wanted[self._alias[name]] = None
        keys = [k for g in wanted for k, _ in self._groups[g].sources]
        raw = self._read(keys, dtype)
        out: dict[str, torch.Tensor] = {}
        for first in wanted:
            group = self._groups[first]
            if group.converter is None:
                out[first] = raw.pop(group.sources[0][0])
                continue
            conv = deepcopy(group.converter)
            for key, pattern in group.sources:
                conv.add_tensor(first, key, pattern, raw.pop(key))
            try:
                realized = conv.convert(first, model=self.model, config=getattr(self.model, "config", None))
            except Exception as exc:
                raise ModelLoadError(f"cannot convert checkpoint tensors into {first!r}: {exc}") from None
            for target, value in realized.items():
                out[target] = (value[0] if isinstance(value, list) else value).contiguous()
        return {n: out[n] for n in names}

    def _read(self, keys: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for fname, fkeys in by_file.items():
            path = self.dir / fname
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for key in fkeys:
                        t = fh.get_tensor(key)
                        out[key] = t.to(dtype) if t.is_floating_point() else t.clone()
            except Exception as exc:
                raise ModelLoadError(f"cannot read tensors from {path}: {exc}") from None
        return out

    def to_saved(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` (model names) under the names and layout ``save_pretrained`` writes.

        The tensors of one fused/converted group must all be in ``tensors`` (one block's are).
        """
        from transformers.core_model_loading import revert_weight_conversion

        return revert_weight_conversion(self.model, tensors)
