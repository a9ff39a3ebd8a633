"""Argument capture: what the model passes each decoder block, recorded in one forward per batch.

:func:`capture` runs the model once per calibration batch with every decoder block stood in by a
recorder that stores the ``(args, kwargs)`` the model passes *that* block (its own attention mask
per layer type, rotary ``position_embeddings``, ALiBi, position ids...) and returns its input
unchanged; the last recorder stops the forward (no final norm / head). Cache objects are dropped,
``use_cache`` forced to False; a value equal to the previous block's is stored once (shared, not
copied). :func:`run_block` runs one block on a captured batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.model import families
from core.model.weights import weights_device

__all__ = [
    "Args",
    "Batch",
    "CaptureCache",
    "Captured",
    "StandIn",
    "capture",
    "capture_block_inputs",
    "run_block",
    "split_args",
]

Batch = tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]
Args = tuple[tuple[Any, ...], dict[str, Any]]


class _Captured(Exception):
    """Raised by the last recorder: every block's arguments of this batch are recorded."""


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return value
    return None if isinstance(value, Cache) else value


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def _share(value: Any, previous: Any) -> Any:
    """``previous`` when it holds the same values as ``value`` (one copy shared by the blocks)."""
    return previous if previous is not None and _same(value, previous) else value


def split_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Batch:
    if args:
        hidden, rest = args[0], tuple(_drop_cache(a) for a in args[1:])
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    kw = {k: _drop_cache(v) for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return hidden, rest, kw


def _declared_return(block: nn.Module) -> int | None:
    """0 when the block's ``forward`` is annotated to return a plain tensor, else None (unknown)."""
    import inspect

    try:
        ann = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):  # pragma: no cover
        return None
    return 0 if ann is torch.Tensor or ann in ("torch.Tensor", "Tensor", "torch.FloatTensor") else None


class StandIn(nn.Module):
    """Takes a decoder block's place in the model's forward; attributes the model reads from its
    layers (``attention_type``...) come from the real block."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", block)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)


class _Recorder(StandIn):
    """Stands in for block ``index``: records its arguments, returns its input hidden state."""

    def __init__(self, block: nn.Module, index: int, sink: Callable[[int, Batch], Any], last: bool) -> None:
        super().__init__(block)
        self.index, self.sink, self.last = index, sink, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, rest, kw = split_args(args, kwargs)
        shape = self.sink(self.index, (hidden, rest, kw))
        if self.last:
            raise _Captured
        if shape is None:  # first batch: learn what the model expects back from a block
            orig = object.__getattribute__(self, "_orig")
            shape = _declared_return(orig)
            if shape is None:  # not declared: ask the real block once
                out = orig(*args, **kwargs)
                shape = len(out) if isinstance(out, tuple | list) else 0
            self.sink(self.index, None, shape)
        return (hidden, *([None] * (shape - 1))) if shape else hidden


@dataclass
class Captured:
    """Block 0's hidden input per batch and every block's own ``(args, kwargs)`` per batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[Args]] = field(default_factory=list)
    """``args[block][batch]``; identical values are shared between blocks."""
    returns: int | None = None
    """What a block returns: 0 a tensor, k a k-tuple (hidden state first); None: not learned."""


@torch.no_grad()
def capture(
    model: nn.Module,
    blocks: nn.ModuleList,
    calibration: torch.Tensor,
    batch_size: int,
    device: torch.device | None = None,
) -> Captured:
    """Every block's arguments for ``calibration`` ``[n, seqlen]``, in one recorder forward per batch
    (the ids go to ``device``, default: where the model's first non-meta tensor is)."""
    device = device if device is not None else weights_device(model)
    n = len(blocks)
    out = Captured(args=[[] for _ in range(n)])
    ret_shape: list[int | None] = [None]

    def sink(i: int, batch: Batch | None, shape: int | None = None) -> int | None:
        if batch is None:
            ret_shape[0] = shape
            return None
        hidden, rest, kw = batch
        if i == 0:
            out.hidden.append(hidden.detach())
        prev = out.args[i - 1][-1] if i > 0 and out.args[i - 1] else None
        if prev is not None:
            rest = (
                tuple(_share(v, p) for v, p in zip(rest, prev[0], strict=False))
                if len(rest) == len(prev[0])
                else rest
            )
            kw = {k: _share(v, prev[1].get(k)) for k, v in kw.items()}
        out.args[i].append((rest, kw))
        return ret_shape[0]

    originals = list(blocks)
    try:
        for i, b in enumerate(originals):
            blocks[i] = _Recorder(b, i, sink, i == n - 1)
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
            else:  # pragma: no cover - the last recorder always fires
                raise RuntimeError("the last decoder block was never called")
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    out.returns = ret_shape[0]
    return out


class CaptureCache:
    """Block arguments captured once and handed to every prune of the same dense model (a sweep):
    the capture stops before the first block, so it does not depend on the blocks' weights."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._cap: Captured | None = None
        self.captures = 0
        """How many capture forwards this cache ran."""

    def get(
        self,
        model: nn.Module,
        blocks: nn.ModuleList,
        calibration: torch.Tensor,
        batch_size: int,
        device: torch.device | None = None,
    ) -> Captured:
        """A fresh view of the captured arguments (the loop consumes its lists; tensors are shared)."""
        key = (calibration.data_ptr(), tuple(calibration.shape), batch_size, len(blocks), str(device))
        if self._cap is None or key != self._key:
            self._cap, self._key = capture(model, blocks, calibration, batch_size, device), key
            self.captures += 1
        cap = self._cap
        return Captured(hidden=list(cap.hidden), args=[list(a) for a in cap.args], returns=cap.returns)


def capture_block_inputs(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, family: families.Family | None = None
) -> list[Batch]:
    """Block 0's ``(hidden, args, kwargs)`` per batch (see :func:`capture`)."""
    cap = capture(model, families.get_blocks(model, family), calibration, batch_size)
    return [(h, *cap.args[0][j]) for j, h in enumerate(cap.hidden)]


@torch.no_grad()
def run_block(block: nn.Module, batch: Batch) -> torch.Tensor:
    """Run one block on a captured batch and return its hidden-state output."""
    hidden, rest, kwargs = batch
    out = block(hidden, *rest, **kwargs)
    if isinstance(out, tuple | list):
        out = out[0]
    return out
