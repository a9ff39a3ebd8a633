"""Model discovery: where a causal LM keeps its decoder blocks, and what inside them is prunable.

Nothing here is a list of architectures. For any model transformers builds:

* **blocks**: the ``nn.ModuleList`` of the (language-model) decoder whose children are instances
  of the model's ``_no_split_modules`` classes (the largest such list; without
  ``_no_split_modules``, the largest list of identical modules holding linears). A multimodal
  ``…ForConditionalGeneration`` is searched under its language model only
  (``model.get_decoder()`` / ``language_model``), so the vision tower and projector stay dense.
* **embeddings / final norm**: ``get_input_embeddings()`` and the norm module beside the blocks.
* **prunable weights** (:class:`Target`) in each block: every ``nn.Linear``, GPT-2 style ``Conv1D``
  (stored ``[in, out]``: transposed on read and write), and every expert of fused 3-D expert
  parameters (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``; transposed
  layouts such as GPT-OSS's ``[E, H, 2I]`` are read from the module's ``is_transposed``). Each
  expert of a fused parameter is its own target named ``….experts.<e>.<param>``, like per-expert
  ``nn.Linear`` modules (``….experts.<e>.w1``).
* **routers** (a linear or router module named ``gate``/``router``/``shared_expert_gate`` beside an
  ``experts`` module): dense unless ``PruneSpec.prune_routers``.

What cannot be pruned (encoder-decoder and bidirectional encoders, no block list, no prunable
weight) is refused with :class:`UnsupportedModel` saying what was found. :data:`QUIRKS` holds the
only per-family knowledge (none is needed by the families tested today).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.errors import UnsupportedModel

__all__ = [
    "QUIRKS",
    "Family",
    "Target",
    "block_linears",
    "block_targets",
    "check_config",
    "describe",
    "family_for",
    "get_blocks",
    "get_weight",
    "in_features",
    "is_ignored",
    "is_transposed",
    "model_class",
    "prunable_linears",
    "prunable_targets",
    "set_weight",
]

QUIRKS: dict[str, dict[str, Any]] = {}
"""Per-``model_type`` overrides of what discovery finds (``{"blocks": "dotted.path"}``)."""

ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate", "switch_mlp_gate"})
FUSED_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "gate_proj", "down_proj")
_VISION_HINTS = ("vision", "visual", "image", "projector", "audio", "speech")


@dataclass(frozen=True)
class Family:
    """What discovery found in one model (dotted paths from the model root)."""

    name: str
    blocks: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    block_class: str
    conv1d: bool = False
    dense_parts: tuple[str, ...] = field(default=())
    """Top-level submodules left dense because they are not the language model (vision tower...)."""


# --------------------------------------------------------------------------------------------
# Prunable targets
# --------------------------------------------------------------------------------------------


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_transposed(module: Any) -> bool:
    """True for GPT-2 style ``Conv1D`` (weight stored ``[in, out]``) and transposed fused experts."""
    if isinstance(module, Target):
        return module.transposed
    return _is_conv1d(module)


@dataclass(eq=False)
class Target:
    """One prunable ``[out, in]`` matrix: a linear's weight or one expert of a fused 3-D parameter."""

    name: str
    module: nn.Module
    param: str = "weight"
    expert: int | None = None
    """Expert index: of the fused parameter, or of the ``experts`` list holding this linear."""
    fused: bool = False
    transposed: bool = False
    router: bool = False

    def raw(self) -> torch.Tensor:
        p = getattr(self.module, self.param)
        return p[self.expert] if self.fused else p

    @property
    def in_features(self) -> int:
        w = self.raw()
        return int(w.shape[0] if self.transposed else w.shape[1])

    @property
    def numel(self) -> int:
        return self.raw().numel()

    def get_weight(self) -> torch.Tensor:
        """A fresh fp32 ``[out, in]`` copy."""
        w = self.raw().detach()
        w = w.t() if self.transposed else w
        return w.to(torch.float32).contiguous().clone()

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Write an ``[out, in]`` weight back in the parameter's own layout and dtype."""
        dst = self.raw()
        w = weight.t() if self.transposed else weight
        dst.data.copy_(w.to(dtype=dst.dtype, device=dst.device))

    @property
    def is_expert(self) -> bool:
        return self.expert is not None


def _expert_index(local: str) -> int | None:
    m = re.search(r"(?:^|\.)experts\.(\d+)(?:\.|$)", local)
    return int(m.group(1)) if m else None


def _is_router(local: str, block: nn.Module) -> bool:
    parent, _, last = local.rpartition(".")
    if last not in ROUTER_NAMES:
        return False
    owner = block.get_submodule(parent) if parent else block
    return last == "router" or hasattr(owner, "experts")


def block_targets(block: nn.Module, prefix: str, routers: bool = False) -> dict[str, Target]:
    """The prunable matrices of one block, by qualified name (routers only when ``routers``)."""
    out: dict[str, Target] = {}
    for local, mod in block.named_modules():
        if not local:
            continue
        name = f"{prefix}.{local}"
        if isinstance(mod, nn.Linear) or _is_conv1d(mod):
            router = _is_router(local, block)
            if router and not routers:
                continue
            out[name] = Target(
                name, mod, expert=_expert_index(local), transposed=_is_conv1d(mod), router=router
            )
            continue
        if _is_router(local, block) and isinstance(getattr(mod, "weight", None), nn.Parameter):
            if routers and mod.weight.dim() == 2:
                out[name] = Target(name, mod, router=True)
            continue
        for pname in FUSED_EXPERT_PARAMS:
            p = mod._parameters.get(pname)
            if isinstance(p, nn.Parameter) and p.dim() == 3:
                tr = bool(getattr(mod, "is_transposed", False))
                for e in range(p.shape[0]):
                    tname = f"{name}.{e}.{pname}"
                    out[tname] = Target(tname, mod, pname, e, fused=True, transposed=tr)
    return out


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` modules of one block, by qualified name (routers included)."""
    return {
        f"{prefix}.{name}": mod
        for name, mod in block.named_modules()
        if name and (isinstance(mod, nn.Linear) or _is_conv1d(mod))
    }


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


def _no_split(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for m in model.modules():
        ns = getattr(m, "_no_split_modules", None)
        if ns:
            names.update(ns)
    return names


def _decoder_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The language-model submodule to search for blocks, and its path ('' = whole model)."""
    for name in ("language_model", "text_model"):
        for holder_path, holder in (("", model), ("model", getattr(model, "model", None))):
            sub = getattr(holder, name, None) if holder is not None else None
            if isinstance(sub, nn.Module):
                return sub, ".".join(p for p in (holder_path, name) if p)
    return model, ""


def _has_weights(block: nn.Module) -> bool:
    return bool(block_targets(block, "b", routers=True))


def _find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    qk = QUIRKS.get(getattr(getattr(model, "config", None), "model_type", ""), {})
    if "blocks" in qk:
        return qk["blocks"], model.get_submodule(qk["blocks"])
    root, root_path = _decoder_root(model)
    wanted = _no_split(model)
    candidates: list[tuple[int, int, str, nn.ModuleList]] = []
    for local, mod in root.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if root_path == "" and any(h in local.lower() for h in _VISION_HINTS):
            continue
        classes = {type(c).__name__ for c in mod}
        if len(classes) != 1:
            continue
        by_name = bool(classes & wanted)
        if not by_name and wanted:
            continue
        if not _has_weights(mod[0]):
            continue
        path = ".".join(p for p in (root_path, local) if p)
        candidates.append((int(by_name), len(mod), path, mod))
    if not candidates:
        lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        raise UnsupportedModel(
            f"cannot prune {type(model).__name__}: found no decoder block list "
            f"(_no_split_modules={sorted(wanted) or None}; ModuleLists: {lists[:8] or 'none'}); "
            "load a decoder-only causal LM"
        )
    candidates.sort(key=lambda c: (c[0], c[1], -len(c[2])), reverse=True)
    return candidates[0][2], candidates[0][3]


def _check_decoder(model: nn.Module, block: nn.Module) -> None:
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", type(model).__name__)
    if getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModel(
            f"cannot prune {mtype!r} ({type(model).__name__}): it is an encoder-decoder model; "
            "only decoder-only causal LMs (and multimodal wrappers around one) are supported"
        )
    flags = [m.is_causal for m in block.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if flags and not any(flags):
        raise UnsupportedModel(
            f"cannot prune {mtype!r} ({type(model).__name__}): its blocks ({type(block).__name__}) "
            "use bidirectional attention (is_causal=False): it is an encoder, not a decoder-only causal LM"
        )


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((n for n, m in model.named_modules() if m is target), None)


def family_for(model: nn.Module) -> Family:
    """Discover where ``model`` keeps its blocks, embeddings and final norm (cached on the model)."""
    cached = model.__dict__.get("_prune_family")
    if isinstance(cached, Family):
        return cached
    path, blocks = _find_blocks(model)
    _check_decoder(model, blocks[0])
    emb: list[str] = []
    try:
        e = _path_of(model, model.get_input_embeddings())
        if e:
            emb.append(e)
    except (NotImplementedError, AttributeError):
        pass
    parent_path = path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    for n, m in parent.named_children():
        full = f"{parent_path}.{n}" if parent_path else n
        if isinstance(m, nn.Embedding) and full not in emb:
            emb.append(full)
    norm = None
    for n, m in parent.named_children():
        if "norm" in type(m).__name__.lower() or "norm" in n.lower() or n in ("ln_f",):
            norm = f"{parent_path}.{n}" if parent_path else n  # the last one wins: after the blocks
    dense: tuple[str, ...] = ()
    _root, root_path = _decoder_root(model)
    if root_path:
        holder_path = root_path.rpartition(".")[0]
        holder = model.get_submodule(holder_path) if holder_path else model
        pre = f"{holder_path}." if holder_path else ""
        dense = tuple(
            pre + n
            for n, m in holder.named_children()
            if pre + n != root_path and any(True for _ in m.parameters())
        )
    conv = any(_is_conv1d(m) for m in blocks[0].modules())
    fam = Family(
        name=str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__),
        blocks=path,
        embeddings=tuple(emb),
        final_norm=norm,
        block_class=type(blocks[0]).__name__,
        conv1d=conv,
        dense_parts=dense,
    )
    if not block_targets(blocks[0], path + ".0", routers=True):
        raise UnsupportedModel(f"cannot prune {fam.name!r}: its blocks hold no linear or expert weight")
    model.__dict__["_prune_family"] = fam
    return fam


def get_blocks(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    """The decoder blocks of ``model``."""
    family = family or family_for(model)
    return model.get_submodule(family.blocks)


def prunable_targets(
    model: nn.Module, family: Family | None = None, routers: bool = False
) -> dict[str, Target]:
    """Every prunable matrix inside the decoder blocks, by qualified name."""
    family = family or family_for(model)
    out: dict[str, Target] = {}
    for i, block in enumerate(get_blocks(model, family)):
        out.update(block_targets(block, f"{family.blocks}.{i}", routers))
    return out


def prunable_linears(model: nn.Module, family: Family | None = None) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``Conv1D`` inside the decoder blocks (see also :func:`prunable_targets`)."""
    family = family or family_for(model)
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(get_blocks(model, family)):
        out.update(block_linears(block, f"{family.blocks}.{i}"))
    return out


def model_class(config: Any) -> Any:
    """The transformers auto class building ``config``: a causal LM, else an image-text-to-text
    wrapper (whose language model is pruned); UnsupportedModel when neither maps the config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from core.errors import UnsupportedModel

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    raise UnsupportedModel(
        f"model type {getattr(config, 'model_type', None)!r} ({type(config).__name__}) has no causal-LM "
        "or image-text-to-text class in transformers: only decoder-only causal LMs can be pruned"
    )


def skeleton(config: Any) -> nn.Module:
    """The model ``config`` describes, built on the ``meta`` device (no memory, no weights)."""
    from accelerate import init_empty_weights

    try:
        cls = model_class(config)
        with init_empty_weights(include_buffers=True):
            return cls.from_config(config)
    except UnsupportedModel:
        raise
    except Exception as exc:
        raise UnsupportedModel(
            f"cannot build model type {getattr(config, 'model_type', None)!r} to inspect it: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from None


def check_config(config: Any) -> Family:
    """Refuse, before any weight is read, a config whose model discovery cannot prune.

    Builds the model skeleton (:func:`skeleton`) and discovers it.
    """
    return family_for(skeleton(config))


def describe(model: nn.Module, routers: bool = False, ignore: list[str] | None = None) -> dict[str, Any]:
    """What would be pruned, as JSON-able data (``python -m core inspect``)."""
    fam = family_for(model)
    blocks = get_blocks(model, fam)
    out_blocks = []
    pruned = dense = 0
    for i, block in enumerate(blocks):
        ts = block_targets(block, f"{fam.blocks}.{i}", routers=True)
        layers = []
        experts: dict[str, int] = {}
        for name, t in ts.items():
            skip = (t.router and not routers) or is_ignored(name, ignore or [])
            layers.append(
                {
                    "name": name,
                    "shape": [t.numel // t.in_features, t.in_features],
                    "params": t.numel,
                    "expert": t.expert,
                    "fused": t.fused,
                    "router": t.router,
                    "pruned": not skip,
                }
            )
            if t.expert is not None:
                key = name.rsplit(f".{t.expert}.", 1)[0] if t.fused else name.split(f".experts.{t.expert}")[0]
                experts[key] = max(experts.get(key, 0), t.expert + 1)
            if skip:
                dense += t.numel
            else:
                pruned += t.numel
        out_blocks.append({"index": i, "class": type(block).__name__, "layers": layers, "experts": experts})
    total = sum(p.numel() for p in model.parameters())
    return {
        "model_type": fam.name,
        "architecture": type(model).__name__,
        "blocks_path": fam.blocks,
        "block_class": fam.block_class,
        "nblocks": len(blocks),
        "embeddings": list(fam.embeddings),
        "final_norm": fam.final_norm,
        "left_dense_modules": list(fam.dense_parts),
        "params_total": total,
        "params_pruned_layers": pruned,
        "params_dense_in_blocks": dense,
        "blocks": out_blocks,
    }


def is_ignored(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """Whether the qualified layer ``name`` matches any fnmatch pattern."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def in_features(module: Any) -> int:
    """Input width of a prunable linear or target."""
    if isinstance(module, Target):
        return module.in_features
    w = module.weight
    return int(w.shape[0] if is_transposed(module) else w.shape[1])


def get_weight(module: Any) -> torch.Tensor:
    """A fresh fp32 ``[out, in]`` copy of a linear's (or target's) weight."""
    if isinstance(module, Target):
        return module.get_weight()
    w = module.weight.detach()
    w = w.t() if is_transposed(module) else w
    return w.to(torch.float32).contiguous().clone()


@torch.no_grad()
def set_weight(module: Any, weight: torch.Tensor) -> None:
    """Write an ``[out, in]`` weight back into the module (or target), in its own layout and dtype."""
    if isinstance(module, Target):
        module.set_weight(weight)
        return
    w = weight.t() if is_transposed(module) else weight
    module.weight.data.copy_(w.to(dtype=module.weight.dtype, device=module.weight.device))
