"""A whole-model pruning oracle that captures nothing, for the architecture matrix.

Written independently of ``core``: it never calls the engine's discovery, capture or mask code.
For block ``i`` it runs the **whole model** forward on the calibration batches (blocks ``< i``
already pruned by the oracle itself, block ``i`` still dense) with hooks on block ``i``'s
weights, and computes each Wanda mask with a slow per-row Python sort. The semantics are the
engine's documented ones (docs/architecture.md, core/run/engine.py):

* a block's statistics are all gathered from the dense block in one pass, then every weight of
  the block is pruned, and the next block sees the pruned block's outputs;
* Wanda score ``|W| * sqrt(sum_t x_t ** 2)`` in fp32, compared within each output row;
  unstructured prunes ``floor(0.5 * in)`` per row, N:M prunes ``M - N`` of every ``M``
  consecutive inputs; ties: stable ascending sort, the lower input index is pruned first;
* prunable: every ``nn.Linear`` / GPT-2 ``Conv1D`` inside a decoder block of the text model,
  except routers and gates (:data:`ROUTER_NAMES`), plus fused 3-D expert parameters
  (``experts.gate_up_proj`` / ``experts.down_proj``) pruned expert by expert, each from the
  tokens the router sends to that expert (its ``down_proj`` from that expert's own gated
  intermediate activations). Vision towers, projectors, embeddings, norms, heads and biases
  are never touched.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
"""Attribute names of linears that route tokens (left dense)."""


@dataclass
class Target:
    """One prunable weight of a decoder block."""

    name: str
    """Qualified ``state_dict`` name of the parameter (``model.layers.0.mlp.experts.down_proj``)."""
    module: nn.Module
    kind: str
    """``linear``, ``conv1d`` (weight stored ``[in, out]``) or ``experts`` (fused ``[E, ...]``)."""
    param: str = "weight"
    """Parameter attribute on ``module``."""

    @property
    def tensor(self) -> Tensor:
        return getattr(self.module, self.param)

    def matrices(self) -> list[Tensor]:
        """The ``[out, in]`` fp32 matrices this target is pruned as (one per expert for fused experts)."""
        w = self.tensor.detach().float()
        if self.kind == "linear":
            return [w]
        if self.kind == "conv1d":
            return [w.t()]
        transposed = bool(getattr(self.module, "is_transposed", False))
        return [w[e].t() if transposed else w[e] for e in range(w.shape[0])]

    def stored(self, masks: list[Tensor]) -> Tensor:
        """Per-matrix ``[out, in]`` masks back in the parameter's own layout."""
        if self.kind == "linear":
            return masks[0]
        if self.kind == "conv1d":
            return masks[0].t()
        transposed = bool(getattr(self.module, "is_transposed", False))
        return torch.stack([m.t() if transposed else m for m in masks])


def text_config(model: nn.Module) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, ModuleList)`` of the text decoder's blocks."""
    decoder = model.get_decoder()
    n = text_config(model).num_hidden_layers
    found = [
        (name, mod)
        for name, mod in decoder.named_children()
        if isinstance(mod, nn.ModuleList) and len(mod) == n
    ]
    assert len(found) == 1, f"expected one list of {n} blocks in {type(decoder).__name__}, got {found}"
    blocks = found[0][1]
    prefix = next(name for name, mod in model.named_modules() if mod is blocks)
    return prefix, blocks


def _is_conv1d(mod: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(mod, Conv1D)


def _is_fused_experts(mod: nn.Module) -> bool:
    gu, down = getattr(mod, "gate_up_proj", None), getattr(mod, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(down, nn.Parameter) and gu.dim() == 3


def block_targets(prefix: str, block: nn.Module) -> list[Target]:
    """The prunable weights of one block, in module order."""
    out: list[Target] = []
    for name, mod in block.named_modules():
        if not name or name.rsplit(".", 1)[-1] in ROUTER_NAMES:
            continue
        q = f"{prefix}.{name}"
        if isinstance(mod, nn.Linear):
            out.append(Target(f"{q}.weight", mod, "linear"))
        elif _is_conv1d(mod):
            out.append(Target(f"{q}.weight", mod, "conv1d"))
        elif _is_fused_experts(mod):
            out.append(Target(f"{q}.gate_up_proj", mod, "experts", "gate_up_proj"))
            out.append(Target(f"{q}.down_proj", mod, "experts", "down_proj"))
    return out


def all_targets(model: nn.Module) -> list[Target]:
    prefix, blocks = decoder_blocks(model)
    return [t for i, b in enumerate(blocks) for t in block_targets(f"{prefix}.{i}", b)]


# ---------------------------------------------------------------------------------------------
# Statistics from whole-model forwards
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockStats:
    """fp64 sums of squared inputs, per target and per matrix (expert), and routed token counts."""

    sq: dict[str, list[Tensor]] = field(default_factory=dict)
    tokens: dict[str, list[int]] = field(default_factory=dict)


def routing(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``(hidden [T, H], expert indices [T, k])`` passed to a fused experts module."""
    names = ("hidden_states", "top_k_index", "router_indices")
    vals = list(args) + [kwargs[k] for k in names if k in kwargs]
    hidden, index = vals[0], vals[1]
    return hidden.reshape(-1, hidden.shape[-1]), index.reshape(
        hidden.reshape(-1, hidden.shape[-1]).shape[0], -1
    )


def expert_inputs(
    mod: nn.Module, hidden: Tensor, index: Tensor, route_all: bool = False
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Per expert: ``(e, gate_up input rows, down_proj input rows)`` of the tokens routed to ``e``
    (``route_all``: of every token, the deliberately wrong statistics tests compare against)."""
    transposed = bool(getattr(mod, "is_transposed", False))
    for e in range(mod.gate_up_proj.shape[0]):
        rows = torch.ones(hidden.shape[0], dtype=torch.bool) if route_all else (index == e).any(dim=-1)
        x = hidden[rows]
        w = mod.gate_up_proj[e]
        gu = x @ w if transposed else x @ w.t()
        bias = getattr(mod, "gate_up_proj_bias", None)
        if bias is not None:
            gu = gu + bias[e]
        yield e, x, mod._apply_gate(gu)


def _sq(x: Tensor) -> Tensor:
    x = x.detach().reshape(-1, x.shape[-1]).double()
    return (x * x).sum(dim=0)


@torch.no_grad()
def block_stats(
    model: nn.Module, prefix: str, block: nn.Module, ids: Tensor, batch: int, route_all: bool = False
) -> BlockStats:
    """Run the whole model on every batch of ``ids``, recording block ``block``'s weight inputs."""
    stats = BlockStats()
    handles = []
    for t in block_targets(prefix, block):
        if t.kind in ("linear", "conv1d"):

            def hook(_m: nn.Module, inp: tuple[Any, ...], _o: Any, t: Target = t) -> None:
                acc = stats.sq.setdefault(t.name, [torch.zeros(inp[0].shape[-1], dtype=torch.float64)])
                acc[0] += _sq(inp[0])
                stats.tokens.setdefault(t.name, [0])[0] += inp[0].reshape(-1, inp[0].shape[-1]).shape[0]

            handles.append(t.module.register_forward_hook(hook))
        elif t.param == "gate_up_proj":
            gu_name, down_name = t.name, t.name[: -len("gate_up_proj")] + "down_proj"

            def pre(
                mod: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                g: str = gu_name,
                d: str = down_name,
            ):
                hidden, index = routing(args, kwargs)
                n = mod.gate_up_proj.shape[0]
                gsq = stats.sq.setdefault(
                    g, [torch.zeros(hidden.shape[-1], dtype=torch.float64) for _ in range(n)]
                )
                dsq = stats.sq.setdefault(d, [None] * n)  # type: ignore[list-item]
                cnt = stats.tokens.setdefault(g, [0] * n)
                stats.tokens[d] = cnt
                for e, x, a in expert_inputs(mod, hidden, index, route_all):
                    gsq[e] += _sq(x)
                    dsq[e] = _sq(a) if dsq[e] is None else dsq[e] + _sq(a)
                    cnt[e] += x.shape[0]

            handles.append(t.module.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        for s in range(0, ids.shape[0], batch):
            model(input_ids=ids[s : s + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return stats


# ---------------------------------------------------------------------------------------------
# Slow masks
# ---------------------------------------------------------------------------------------------


def slow_wanda_mask(w: Tensor, xnorm_sq: Tensor, nm: tuple[int, int] | None, sparsity: float = 0.5) -> Tensor:
    """Per-row Wanda mask by Python sort: score ``|w| * sqrt(xnorm_sq)`` in fp32, ties to the lower index."""
    score = (w.abs() * torch.sqrt(xnorm_sq.to(torch.float32)).unsqueeze(0)).tolist()
    out_f, in_f = w.shape
    mask = [[False] * in_f for _ in range(out_f)]
    for r in range(out_f):
        row = score[r]
        if nm is None:
            groups, k = [range(in_f)], math.floor(sparsity * in_f)
        else:
            groups, k = [range(g, g + nm[1]) for g in range(0, in_f, nm[1])], nm[1] - nm[0]
        for g in groups:
            for j in sorted(g, key=lambda j: (row[j], j))[:k]:
                mask[r][j] = True
    return torch.tensor(mask, dtype=torch.bool).reshape(out_f, in_f)


# ---------------------------------------------------------------------------------------------
# The oracle run
# ---------------------------------------------------------------------------------------------


@dataclass
class OracleRun:
    """What the oracle did: the pruned model, each target's stored-layout mask, routed token counts."""

    model: nn.Module
    masks: dict[str, Tensor]
    tokens: dict[str, list[int]]


@torch.no_grad()
def wanda(
    dense: nn.Module,
    ids: Tensor,
    nm: tuple[int, int] | None,
    batch: int,
    *,
    block0_kwargs: bool = False,
    route_all: bool = False,
) -> OracleRun:
    """Prune a copy of ``dense`` block by block with Wanda, as the engine's semantics say.

    ``block0_kwargs=True`` is the deliberately *broken* variant the engine must not be: block
    ``i > 0`` is calibrated by running it on its true input but with the keyword arguments the
    model passed block 0 (attention mask, rotary embeddings...). Tests use it to show that a
    model really tells the two apart. ``route_all=True`` is the other broken variant: every
    expert calibrated on every token instead of the tokens routed to it.
    """
    model = copy.deepcopy(dense).eval()
    prefix, blocks = decoder_blocks(model)
    masks: dict[str, Tensor] = {}
    tokens: dict[str, list[int]] = {}
    for i, block in enumerate(blocks):
        bprefix = f"{prefix}.{i}"
        if block0_kwargs and i > 0:
            st = _stats_with_block0_kwargs(model, blocks, i, bprefix, ids, batch)
        else:
            st = block_stats(model, bprefix, block, ids, batch, route_all)
        for t in block_targets(bprefix, block):
            mats = t.matrices()
            assert t.name in st.sq, f"{t.name} was never called in a whole-model forward"
            per = []
            for e, w in enumerate(mats):
                sq = st.sq[t.name][e]
                if sq is None:  # an expert no token reached: no statistics at all
                    sq = torch.zeros(w.shape[1], dtype=torch.float64)
                per.append(slow_wanda_mask(w, sq, nm))
            mask = t.stored(per)
            masks[t.name] = mask
            tokens[t.name] = st.tokens[t.name]
        for t in block_targets(bprefix, block):
            t.tensor.data.masked_fill_(masks[t.name], 0)
    return OracleRun(model, masks, tokens)


def block_calls(model: nn.Module, ids: Tensor) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """``(args, kwargs)`` every decoder block receives in one whole-model forward of ``ids``."""
    _prefix, blocks = decoder_blocks(model)
    calls: list[Any] = [None] * len(blocks)
    handles = []
    for i, b in enumerate(blocks):

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int = i) -> None:
            calls[i] = (args, dict(kwargs))

        handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def _stats_with_block0_kwargs(
    model: nn.Module, blocks: nn.ModuleList, i: int, bprefix: str, ids: Tensor, batch: int
) -> BlockStats:
    """Block ``i``'s statistics when it is run on its true inputs with block 0's keyword arguments."""
    st = BlockStats()
    for s in range(0, ids.shape[0], batch):
        calls = block_calls(model, ids[s : s + batch])
        args_i, _kw_i = calls[i]
        _args0, kw0 = calls[0]
        hidden = args_i[0] if args_i else _kw_i["hidden_states"]
        kw = {k: v for k, v in kw0.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        runner = _Single(blocks[i], hidden, kw)
        part = block_stats(runner, f"{bprefix}", blocks[i], ids[s : s + batch], batch)
        for k, v in part.sq.items():
            if k not in st.sq:
                st.sq[k] = v
                st.tokens[k] = part.tokens[k]
            else:
                st.sq[k] = [
                    a if b is None else (b if a is None else a + b) for a, b in zip(st.sq[k], v, strict=True)
                ]
                st.tokens[k] = [a + b for a, b in zip(st.tokens[k], part.tokens[k], strict=True)]
    return st


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return a if b is None else (b if a is None else a + b)


class _Single(nn.Module):
    """Stands in for the whole model in :func:`block_stats`: runs one block on a fixed input."""

    def __init__(self, block: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.block, self.hidden, self.kw = block, hidden, kwargs

    def forward(self, input_ids: Tensor, use_cache: bool = False) -> Any:
        return self.block(self.hidden, **self.kw)
