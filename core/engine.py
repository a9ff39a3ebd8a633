"""Sequential, block-by-block pruning of a causal LM, in place.

1. Capture what the model passes its first decoder block, batch by batch, with a forward
   pre-hook (``with_kwargs=True``) that records ``(args, kwargs)`` and aborts the forward.
   Attention masks, rotary ``position_embeddings``, BLOOM's ``alibi``, position ids... are
   therefore exactly what the model itself would pass. Cache objects are dropped.
2. For each block: hook its prunable linears to accumulate :class:`core.stats.StatsAccumulator`
   (fp32) over every batch, prune each linear from its statistics, then re-run the block on
   the same inputs so that the next block is calibrated on the *pruned* outputs.

Block keyword arguments are captured once at block 0 and reused for every block (the model
passes the same ones to every block for the supported families).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core import families
from core.errors import InvalidInput
from core.progress import CancelFn, ProgressFn, check_cancel, report_block
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.methods.base import Method

__all__ = ["BlockResult", "capture_block_inputs", "prune", "prune_block", "run_block"]


class _Captured(Exception):
    """Raised by the pre-hook to stop the forward once block 0's inputs are recorded."""


Batch = tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return value
    return None if isinstance(value, Cache) else value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, family: families.Family | None = None
) -> list[Batch]:
    """Run ``model`` on ``calibration`` in batches; return block 0's ``(hidden, args, kwargs)`` per batch."""
    blocks = families.get_blocks(model, family)
    device = next(model.parameters()).device
    captured: list[Batch] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if args:
            hidden, rest = args[0], tuple(_drop_cache(a) for a in args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        kw = {k: _drop_cache(v) for k, v in kwargs.items()}
        if "use_cache" in kw:
            kw["use_cache"] = False
        captured.append((hidden.detach(), rest, kw))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("the first decoder block was never called")
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, batch: Batch) -> torch.Tensor:
    """Run one block on a captured batch and return its hidden-state output."""
    hidden, rest, kwargs = batch
    out = block(hidden, *rest, **kwargs)
    if isinstance(out, tuple | list):
        out = out[0]
    return out


def _method(name: str) -> Any:
    from core.methods import get_method

    return get_method(name)


@dataclass
class BlockResult:
    """What :func:`prune_block` did to one block."""

    layers: dict[str, float] = field(default_factory=dict)
    """``{qualified name: achieved sparsity}`` of every pruned linear."""
    numel: dict[str, int] = field(default_factory=dict)
    """``{qualified name: number of weights}`` of every pruned linear."""
    ignored: list[str] = field(default_factory=list)
    """Linears of the block left dense by ``spec.ignore``."""
    mask_s: float = 0.0
    """Seconds spent in the method's score-and-mask step, refinement and the mask application."""
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer report records (method, allocation, refine, sparsity, recon_error, ...)."""


class _StatsComplete(Exception):
    """Raised by the statistics pre-hook of a block's last linear once its input is recorded."""


class _CallOrder:
    """Ends a statistics pass as soon as every target linear has recorded its input.

    The statistics pass needs the *inputs* of a block's linears, not the block's output: the
    last linear's matmul and whatever follows it (residual add, dropout) are wasted work — about
    a quarter of a LLaMA block's linear FLOPs (``down_proj``). The first batch runs whole and
    records the call order; when it called each target exactly once, later batches stop in the
    pre-hook of the last one (statistics unchanged: every input is recorded before the stop).
    """

    def __init__(self) -> None:
        self.order: list[str] = []
        self.stop_at: str | None = None
        self.learning = True

    def pre_hook(self, name: str, feed: Callable[[Any, tuple[Any, ...]], None]) -> Callable[..., None]:
        def fn(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            feed(module, inputs)
            if self.learning:
                self.order.append(name)
            elif name == self.stop_at:
                raise _StatsComplete

        return fn

    def batch_done(self, ntargets: int) -> None:
        if self.learning:
            self.learning = False
            if len(self.order) == ntargets == len(set(self.order)):
                self.stop_at = self.order[-1]


@torch.no_grad()
def prune_block(
    block: nn.Module,
    block_prefix: str,
    batches: Iterable[Batch],
    method: Method,
    spec: PruneSpec,
    budgets: dict[str, int] | None = None,
) -> BlockResult:
    """Collect statistics of ``block``'s linears over ``batches``, then prune them in place.

    The single per-block step shared by :func:`prune` and ``core.streaming.prune_streaming``
    (which is why both produce identical masks). ``block_prefix`` qualifies layer names
    (``model.layers.3``). Statistics are only gathered when ``method.needs`` asks for them;
    producing the next block's inputs is left to the caller. ``budgets`` (OWL) maps layer names
    to exact pruned counts; each layer goes through :func:`core.layer_prune.prune_layer`.
    """
    from core.layer_prune import layer_needs, prune_layer
    from core.stats import LayerStats, SharedInputs, StatsAccumulator

    needs = layer_needs(method, spec)
    linears = families.block_linears(block, block_prefix)
    targets = {n: m for n, m in linears.items() if not families.is_ignored(n, spec.ignore)}
    res = BlockResult(ignored=[n for n in linears if n not in targets])
    stats: dict[str, LayerStats] = {}
    if targets and needs.any:
        accs = {
            n: StatsAccumulator(
                families.in_features(m),
                needs.xnorm,
                needs.hessian,
                need_xsum=needs.xsum,
                gram_tokens=needs.gram_tokens,
            )
            for n, m in targets.items()
        }
        # Linears fed the same tensor (q/k/v, gate/up) share its fp32 cast and squared sums.
        shared = SharedInputs()
        calls = _CallOrder()
        handles = [
            m.register_forward_pre_hook(calls.pre_hook(n, shared.hook(accs[n]))) for n, m in targets.items()
        ]
        try:
            for b in batches:
                try:
                    run_block(block, b)
                except _StatsComplete:
                    pass
                calls.batch_done(len(targets))
                shared.clear()
        finally:
            shared.clear()
            for h in handles:
                h.remove()
        stats = {n: a.result() for n, a in accs.items()}
    for name, mod in targets.items():
        weight = families.get_weight(mod)
        st = stats.pop(name, None) or LayerStats(xnorm_sq=None, hessian=None, ntokens=0)
        tm = time.perf_counter()
        outcome = prune_layer(weight, st, method, spec, None if budgets is None else budgets.get(name))
        mask = outcome.mask
        res.mask_s += time.perf_counter() - tm
        families.set_weight(mod, weight)
        res.layers[name] = outcome.record["sparsity"]
        res.records[name] = outcome.record
        res.numel[name] = mask.numel()
        del st
    return res


def check_nm_shapes(model: nn.Module, family: families.Family, spec: PruneSpec) -> None:
    """Refuse, before any work, an N:M pattern whose M does not divide a pruned layer's inputs."""
    nm = spec.nm
    if nm is None:
        return
    for name, mod in families.prunable_linears(model, family).items():
        if not families.is_ignored(name, spec.ignore) and families.in_features(mod) % nm[1]:
            raise InvalidInput(
                f"layer {name} has {families.in_features(mod)} input features, "
                f"not a multiple of M={nm[1]} for pattern {spec.pattern}"
            )


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: PruneSpec,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """Prune ``model`` in place, block by block, on calibration ids ``[n, seqlen]``.

    Returns ``{"layers": {name: sparsity}, "ignored": [names], "mask_s", "prune_s", "nblocks",
    "method", "pattern", "target"}``. Progress is reported once per block with stage
    ``pruning`` and ``fraction = block / nblocks``; ``should_cancel`` is checked between blocks.
    """
    t0 = time.perf_counter()
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise InvalidInput(
            f"calibration must be a [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}"
        )
    from core.layer_prune import layer_needs

    method = _method(spec.method)
    need_stats = layer_needs(method, spec).any or spec.allocation == "owl"
    family = families.family_for(model)
    blocks = families.get_blocks(model, family)
    nblocks = len(blocks)
    check_nm_shapes(model, family, spec)
    was_training = model.training
    model.eval()
    check_cancel(should_cancel)
    device = next(model.parameters()).device
    batch_size = spec.batch_for(calibration.shape[-1], device.type)
    # Methods that read no statistics (magnitude) need no forward passes at all.
    batches = (
        capture_block_inputs(model, calibration.to(torch.long), batch_size, family) if need_stats else []
    )
    layers: dict[str, float] = {}
    records: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    mask_s = 0.0
    budgets: dict[str, int] | None = None
    owl_info: dict[str, Any] | None = None
    if spec.allocation == "owl":
        from core.owl_pass import owl_budgets

        budgets, owl_info = owl_budgets(blocks, f"{family.blocks}", batches, spec, should_cancel)
    try:
        for i, block in enumerate(blocks):
            check_cancel(should_cancel)
            res = prune_block(block, f"{family.blocks}.{i}", batches, method, spec, budgets)
            layers.update(res.layers)
            records.update(res.records)
            ignored.extend(res.ignored)
            mask_s += res.mask_s
            if need_stats and i + 1 < nblocks:
                batches = [(run_block(block, b), b[1], b[2]) for b in batches]
            report_block(on_progress, i + 1, nblocks)
    finally:
        model.train(was_training)
    return {
        "method": spec.method,
        "pattern": spec.pattern,
        "target": spec.target_sparsity,
        "nblocks": nblocks,
        "layers": layers,
        "layer_records": records,
        "owl": owl_info,
        "ignored": ignored,
        "mask_s": mask_s,
        "prune_s": time.perf_counter() - t0,
    }
