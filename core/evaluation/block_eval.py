"""Perplexity block by block: any model size on any device, equal to the whole-model forward.

The evaluation windows (:func:`core.evaluation.evaluate.eval_windows`) go through the model the way the
pruning loop's calibration does, so only one decoder block's weights need be on the compute device
at a time:

1. **capture** (:func:`core.run.engine.capture`): one recorder forward per batch of windows records
   every block's own arguments (masks, rotary embeddings...) and block 0's input;
2. **blocks**: each block comes to the device through its :class:`core.model.weights.WeightSource`, runs
   every batch (the hidden states carried in a :class:`core.run.engine.HiddenStore`: on the device, in
   host memory or on disk, as :func:`core.model.placement.plan` places them) and is released unwritten;
3. **head**: the model's own forward runs once more per batch with every block stood in by a
   pass-through, the last one handing back the carried hidden state, so the final norm, the head
   and any logit scaling or soft-capping are the model's own; the NLL is summed per batch of
   ``batch_size`` windows (:func:`core.evaluation.evaluate.window_nll`), which bounds the logits' memory.

Each block runs the same batches with the same arguments as in a whole-model forward, so the
result equals :func:`core.evaluation.evaluate.perplexity` (tests/core/test_block_eval.py: every family).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from core.evaluation.evaluate import eval_windows, ppl_result, window_nll
from core.model import families, placement
from core.model.capture import StandIn, capture, split_args
from core.model.hidden import HiddenStore
from core.model.weights import WeightSource, compute_device, source_for
from core.progress import CancelFn, check_cancel

__all__ = ["forward_rows", "perplexity"]


class _PassThrough(StandIn):
    """Stands in for a block in the head pass: hands back its input, or ``final`` when set."""

    def __init__(self, block: nn.Module, returns: int) -> None:
        super().__init__(block)
        self.returns = returns
        self.final: torch.Tensor | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = self.final if self.final is not None else split_args(args, kwargs)[0]
        return (hidden, *([None] * (self.returns - 1))) if self.returns else hidden


def _run_blocks(
    blocks: nn.ModuleList,
    source: WeightSource,
    store: HiddenStore,
    args: list[list[Any]],
    returns: int | None,
    progress: Callable[[int], None],
) -> int:
    """Carry every batch through every block (weights onloaded and released); what a block returns."""
    for i, block in enumerate(blocks):
        source.load(i, block)
        try:
            for j in range(len(store)):
                rest, kw = args[i][j]
                out = block(store[j], *rest, **kw)
                if isinstance(out, tuple | list):
                    returns, out = len(out), out[0]
                elif returns is None:
                    returns = 0
                store.replace(j, out)
        finally:
            source.release(i, block)
        args[i] = []
        progress(i + 1)
    assert returns is not None
    return returns


def _head(
    model: nn.Module,
    blocks: nn.ModuleList,
    data: torch.Tensor,
    batch_size: int,
    store: HiddenStore,
    returns: int,
    device: torch.device,
    each: Callable[[torch.Tensor, torch.Tensor], None],
) -> None:
    """``each(batch ids, logits)`` per batch: the carried hidden states through the model's final norm
    and head (the model's own forward with every block stood in)."""
    originals = list(blocks)
    stand_ins = [_PassThrough(b, returns) for b in originals]
    try:
        for i, s in enumerate(stand_ins):
            blocks[i] = s
        for j, start in enumerate(range(0, data.shape[0], batch_size)):
            batch = data[start : start + batch_size].to(device)
            stand_ins[-1].final = store[j]
            each(batch, model(input_ids=batch, use_cache=False).logits)
    finally:
        stand_ins[-1].final = None
        for i, b in enumerate(originals):
            blocks[i] = b


@torch.no_grad()
def forward_rows(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int,
    each: Callable[[torch.Tensor, torch.Tensor], None],
    on_step: Callable[[int, int], None] | None = None,
    *,
    device: torch.device | str | None = None,
    source: WeightSource | None = None,
    max_device_memory: int | None = None,
    max_host_memory: int | None = None,
    should_cancel: CancelFn | None = None,
) -> placement.Placement:
    """The model's logits for the rows ``data`` ``[n, length]``, block by block: ``each(ids, logits)``
    per batch of ``batch_size`` rows, in order; equal to ``model(data).logits`` batch by batch.
    Returns where weights and activations were placed. ``on_step(done, total)``: after the capture
    (0), each block and the head (``nblocks + 1``)."""
    blocks = families.get_blocks(model)
    dev = compute_device(model, device)
    source = source or source_for(model, blocks, dev)
    limits = (max_device_memory, max_host_memory)
    place = placement.plan_run(model, blocks, data.shape, batch_size, dev, source.where, False, limits)
    steps = len(blocks) + 1

    def progress(done: int) -> None:
        check_cancel(should_cancel)
        if on_step is not None:
            on_step(done, steps)

    was_training = model.training
    model.eval()
    try:
        with placement.spill_area(place, None) as sdir:
            with source.capture_context():
                cap = capture(model, blocks, data, batch_size, dev)
            host = place.activations == "host"
            store = HiddenStore(sdir, cap.hidden, device=dev, host=host, pin=place.pinned)
            cap.hidden = []
            progress(0)
            returns = _run_blocks(blocks, source, store, cap.args, cap.returns, progress)
            with source.outside_context():
                _head(model, blocks, data, batch_size, store, returns, dev, each)
            progress(steps)
    finally:
        model.train(was_training)
    return place


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    max_windows: int | None = None,
    batch_size: int = 1,
    on_step: Callable[[int, int], None] | None = None,
    *,
    device: torch.device | str | None = None,
    source: WeightSource | None = None,
    max_device_memory: int | None = None,
    max_host_memory: int | None = None,
    should_cancel: CancelFn | None = None,
) -> dict[str, Any]:
    """:func:`core.evaluation.evaluate.perplexity`'s record, computed block by block on ``device`` (default:
    where the weights are; weights elsewhere are onloaded block by block), plus ``placement``.

    ``on_step(done, total)``: after the capture (0), each block and the head (``nblocks + 1``).
    """
    data = eval_windows(ids, seqlen, max_windows)
    source = source or source_for(model, families.get_blocks(model), compute_device(model, device))
    nll = [0.0]

    def add(batch: torch.Tensor, logits: torch.Tensor) -> None:
        nll[0] += window_nll(logits, batch)

    place = forward_rows(
        model, data, batch_size, add, on_step, device=device, source=source,
        max_device_memory=max_device_memory, max_host_memory=max_host_memory, should_cancel=should_cancel,
    )  # fmt: skip
    out = {**ppl_result(nll[0], data.shape[0], seqlen, int(ids.numel())), "placement": place.report()}
    if hasattr(source, "read_s"):  # weights read from disk (core.run.streaming.CheckpointSource)
        out["read_s"] = source.read_s
    return out
