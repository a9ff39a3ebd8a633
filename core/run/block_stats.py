"""Statistics of one decoder block: the inputs of every pruned matrix over the calibration batches.

Forward pre-hooks on linears feed :mod:`core.methods.stats` accumulators (float32 / float64 whatever the
weights' dtype); for fused 3-D experts a torch-function tap inside the experts module records each
expert's own inputs (the routed tokens for ``gate_up_proj``, that expert's intermediate activations
for ``down_proj``). A statistics pass stops at the block's last linear once the call order is known.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from core.methods import stats
from core.model import families
from core.model.capture import Batch, run_block

if TYPE_CHECKING:
    from core.methods.stats import LayerStats

__all__ = ["collect_stats", "eager_experts"]


class _StatsComplete(Exception):
    """Raised by the statistics pre-hook of a block's last linear once its input is recorded."""


class _CallOrder:
    """Ends a statistics pass as soon as every target linear has recorded its input.

    The first batch runs whole and records the call order; when it called each target exactly
    once (never for blocks with experts, whose calls depend on routing), later batches stop in
    the pre-hook of the last one (statistics unchanged: every input is recorded before the stop).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.order: list[str] = []
        self.stop_at: str | None = None
        self.learning = enabled

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


_MATMULS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _ExpertTap(TorchFunctionMode):
    """Feeds each fused-expert matrix's accumulator the input of every product with that expert's slice.

    Inside an experts module the model computes, per expert ``e``, ``linear(x_e, W[e])`` (or
    ``x_e @ W[e]`` for transposed layouts) on exactly the tokens routed to ``e``; the tap
    recognises ``W[e]`` by storage and offset, so the statistics are those of the model's own
    computation (routing, activation, clamps and biases included).
    """

    def __init__(self, fused: dict[str, families.Target], feed: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.feed = feed
        self.by_slice: dict[tuple[int, int], str] = {}
        for name, t in fused.items():
            p = getattr(t.module, t.param)
            off = p.storage_offset() + int(t.expert or 0) * p.stride(0)
            self.by_slice[(p.untyped_storage().data_ptr(), off)] = name

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) >= 2:
            x, w = args[0], args[1]
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type != "meta":
                name = self.by_slice.get((w.untyped_storage().data_ptr(), w.storage_offset()))
                if name is not None:
                    self.feed(name, x)
        return func(*args, **kwargs)


@contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Run fused experts modules with transformers' eager per-expert loop while pruning (the
    statistics tap reads it, and the re-run producing the next block's inputs matches it)."""
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(m, "is_transposed") and cfg is not None and hasattr(cfg, "_experts_implementation"):
            configs.append((cfg, cfg._experts_implementation))
    try:
        for cfg, _ in configs:
            cfg._experts_implementation = "eager"
        yield
    finally:
        for cfg, old in configs:
            cfg._experts_implementation = old


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    targets: dict[str, families.Target],
    batches: Sequence[Batch],
    needs: Any,
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, LayerStats]:
    """The per-matrix statistics ``needs`` asks for, over every batch (the loop's stats point).

    ``outputs``: when given, every batch runs the whole block and its output is appended there
    (OWL's dense first pass); otherwise a batch may stop at the block's last linear.
    """
    accs = {
        n: stats.StatsAccumulator(
            t.in_features,
            needs.xnorm,
            needs.hessian,
            need_xsum=needs.xsum,
            gram_tokens=needs.gram_tokens,
            sample_tokens=needs.sample_tokens,
            sample_every=needs.sample_every,
        )
        for n, t in targets.items()
    }
    shared = stats.SharedInputs()
    linears = {n: t for n, t in targets.items() if not t.fused}
    fused = {n: t for n, t in targets.items() if t.fused}
    calls = _CallOrder(enabled=outputs is None and not any(t.is_expert for t in targets.values()))
    handles = [
        t.module.register_forward_pre_hook(calls.pre_hook(n, shared.hook(accs[n])))
        for n, t in linears.items()
    ]

    def feed(name: str, x: torch.Tensor) -> None:
        accs[name].add_partial(shared.partial_for(x, accs[name]))

    tap = _ExpertTap(fused, feed) if fused else nullcontext()
    try:
        for b in batches:
            try:
                with tap:
                    out = run_block(block, b)
                if outputs is not None:
                    outputs.append(out)
            except _StatsComplete:
                pass
            calls.batch_done(len(linears))
            shared.clear()
    finally:
        shared.clear()
        for h in handles:
            h.remove()
    return {n: a.result() for n, a in accs.items()}
