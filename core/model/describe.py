"""``python -m core inspect``: what a prune run would touch, without reading a weight or pruning.

The model is built from its config (a Hugging Face directory's ``config.json`` or a GGUF file's
metadata) on the ``meta`` device, discovered exactly as a prune run discovers it
(:func:`core.model.families.describe`), and summarised: decoder blocks, the prunable layers of each
distinct block layout (experts collapsed to one line per fused/stacked parameter), routers and
ignored layers left dense, and parameter counts.
"""

from __future__ import annotations

import re
from typing import Any

from core.model import families
from core.spec import ModelSpec

__all__ = ["describe_model", "format_text"]


def describe_model(spec: ModelSpec, routers: bool = False, ignore: list[str] | None = None) -> dict[str, Any]:
    """:func:`core.model.families.describe` of the model ``spec`` names, built without its weights.

    Raises the loader's errors (``ModelLoadError``, ``UnsupportedModel``) for a bad model.
    """
    from core.model.loading import checked_config, resolve_source

    config, _family = checked_config(spec)
    out = families.describe(families.skeleton(config), routers=routers, ignore=ignore)
    src = resolve_source(spec)
    out["source"] = f"{src.path}/{src.gguf_file}" if src.gguf_file else src.path
    return out


def _expert_pattern(layer: dict[str, Any], prefix: str) -> str:
    """The layer's name inside its block, with its expert index written ``*``."""
    name = layer["name"].removeprefix(prefix)
    if layer["expert"] is not None:
        name = re.sub(rf"(^|\.)experts\.{layer['expert']}(\.|$)", r"\1experts.*\2", name, count=1)
    return name


def _layout(block: dict[str, Any], prefix: str) -> list[tuple[str, tuple[int, ...], bool, bool, int]]:
    """``[(name, shape, pruned, router, count)]``: the block's layers, experts collapsed."""
    rows: dict[tuple[str, tuple[int, ...], bool, bool], int] = {}
    for layer in block["layers"]:
        key = (_expert_pattern(layer, prefix), tuple(layer["shape"]), layer["pruned"], layer["router"])
        rows[key] = rows.get(key, 0) + 1
    return [(*k, n) for k, n in rows.items()]


def _ranges(indices: list[int]) -> str:
    parts: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(parts)


def format_text(desc: dict[str, Any]) -> str:
    """A human-readable summary of :func:`describe_model`'s result."""
    total, pruned, dense = desc["params_total"], desc["params_pruned_layers"], desc["params_dense_in_blocks"]
    lines = [
        f"model: {desc['source']}",
        f"architecture: {desc['architecture']} (model_type {desc['model_type']})",
        f"decoder blocks: {desc['nblocks']} x {desc['block_class']} at {desc['blocks_path']}",
        f"left dense: embeddings {', '.join(desc['embeddings']) or '-'}; "
        f"final norm {desc['final_norm'] or '-'}"
        + (f"; also {', '.join(desc['left_dense_modules'])}" if desc["left_dense_modules"] else ""),
        f"parameters: {total:,} in all; {pruned:,} in layers to prune ({pruned / max(total, 1):.1%}); "
        f"{dense:,} in block layers kept dense (routers, ignored)",
    ]
    layouts: dict[tuple[Any, ...], list[int]] = {}
    for block in desc["blocks"]:
        key = tuple(_layout(block, f"{desc['blocks_path']}.{block['index']}."))
        layouts.setdefault(key, []).append(block["index"])
    for layout, indices in layouts.items():
        nexp = {n for blk in desc["blocks"] if blk["index"] in indices for n in blk["experts"].values()}
        head = f"blocks {_ranges(indices)}: {len(layout)} weight matrices (an expert stack counts once)"
        lines.append(head + (f", experts per MoE layer: {', '.join(map(str, sorted(nexp)))}" if nexp else ""))
        width = max(len(r[0]) for r in layout)
        for name, shape, is_pruned, router, count in layout:
            what = "pruned" if is_pruned else ("dense (router)" if router else "dense (ignored)")
            per = f"{count} experts x " if "experts.*" in name else ""
            lines.append(f"  {name:<{width}}  {per}[{' x '.join(map(str, shape))}]  {what}")
    return "\n".join(lines) + "\n"
