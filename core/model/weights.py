"""Weight sources: where the block loop (:func:`core.run.engine.run_blocks`) gets each block's weights.

* :class:`InMemory`: every block already sits on the compute device; nothing moves.
* :class:`Onload`: the weights live in host memory (or anywhere but the compute device); each
  block is copied to the device for its statistics, masks and re-run, then copied back into its
  host tensors (pruned in place there) and its device copy released. The modules outside the
  blocks (embeddings, rotary buffers, final norm, head) come to the device for the argument
  capture and for the block-by-block evaluation (:meth:`Onload.outside_context`).
* ``core.run.streaming._ShardSource``: weights on disk (safetensors), materialised block by block.

Moving a tensor between devices and back is exact, so an onloaded run prunes bit for bit as a
resident one on the same device.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from core.model.placement import Where

__all__ = [
    "InMemory",
    "Onload",
    "Restorer",
    "WeightSource",
    "compute_device",
    "outside_modules",
    "source_for",
    "weights_device",
]


class Restorer(Protocol):
    """What a weight source needs from the block checkpoints (:class:`core.run.resume.BlockCheckpoints`)."""

    def restore_block(self, index: int, block: nn.Module) -> None: ...

    def linked(self, index: int) -> Path | None: ...


class WeightSource:
    """Where block weights live. The in-memory source does nothing; others load, write and
    release each block."""

    where: Where = "disk"
    """Where the weights are kept between their blocks' turns (for :mod:`core.model.placement`)."""

    def capture_context(self) -> Any:
        """Context in which the model can run up to its blocks (embeddings and block 0 ready)."""
        return nullcontext()

    def load(self, index: int, block: nn.Module) -> None:
        """Make ``block``'s dense weights available on the compute device."""

    def done(self, index: int, block: nn.Module) -> None:
        """``block`` is pruned (and, when not last, has produced the next inputs): write it back."""

    def release(self, index: int, block: nn.Module) -> None:
        """``block`` was only read (evaluation): drop what :meth:`load` brought, write nothing."""

    def written(self, index: int) -> Path | None:
        """The file :meth:`done` writes block ``index`` to, when it holds that block alone (a resume
        checkpoint then links it instead of saving a copy of the weights); None otherwise."""
        return None

    def restore(self, index: int, block: nn.Module, ckpt: Restorer) -> None:
        """Bring block ``index`` back as an earlier, interrupted run pruned it (resume)."""
        self.load(index, block)
        ckpt.restore_block(index, block)

    def outside_context(self) -> Any:
        """Context in which the modules outside the blocks (embeddings, final norm, head) can run."""
        return nullcontext()


class InMemory(WeightSource):
    """Every block is already on the compute device; nothing to load or write."""

    where: Where = "device"


def weights_device(model: nn.Module) -> torch.device:
    """The device of the model's first non-meta parameter (cpu when all are on meta)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def compute_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """``device`` (default: where the weights are), refused when it is CUDA and there is none."""
    from core.errors import InvalidInput

    dev = torch.device(device) if device is not None else weights_device(model)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA device is available")
    return dev


def source_for(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> WeightSource:
    """In memory when every (non-meta) weight is on ``device``, else :class:`Onload`."""
    resident = all(_same_device(p.device, device) for p in model.parameters() if p.device.type != "meta")
    return InMemory() if resident else Onload(model, blocks, device)


def outside_modules(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The modules of ``model`` that hold tensors outside its decoder blocks."""
    inside = {id(m) for m in blocks.modules()}
    return [m for m in model.modules() if id(m) not in inside]


# A moved tensor: (module, "_parameters" or "_buffers", name, the host tensor it came from).
_Moved = list[tuple[nn.Module, str, str, torch.Tensor]]


def _move_in(modules: list[nn.Module], device: torch.device) -> _Moved:
    """Copy the direct parameters and buffers of ``modules`` to ``device`` (a tied parameter once)."""
    moved: _Moved = []
    seen: set[int] = set()
    nb = device.type == "cuda"
    for m in modules:
        for kind in ("_parameters", "_buffers"):
            table = getattr(m, kind)
            for name, t in table.items():
                if t is None or t.device == device or id(t) in seen:
                    continue
                seen.add(id(t))
                if kind == "_parameters":
                    moved.append((m, kind, name, t.data))
                    t.data = t.data.to(device, non_blocking=nb)
                else:
                    moved.append((m, kind, name, t))
                    table[name] = t.to(device, non_blocking=nb)
    return moved


def _move_out(moved: _Moved, write_back: bool) -> None:
    """Undo :func:`_move_in`: parameters return to their host tensors (first copying the device
    values into them when ``write_back``); device buffers are dropped for their host originals."""
    for m, kind, name, host in moved:
        table = getattr(m, kind)
        if kind == "_parameters":
            p = table[name]
            if write_back:
                host.copy_(p.data)
            p.data = host
        else:
            table[name] = host


class Onload(WeightSource):
    """Blocks kept in host memory (or anywhere off the device), brought to ``device`` one at a time."""

    where: Where = "host"

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, device: torch.device | str) -> None:
        self.model, self.blocks, self.device = model, blocks, torch.device(device)
        self._held: dict[int, _Moved] = {}
        self.bytes_in = 0
        """Bytes copied to the device so far (weights only)."""

    @contextmanager
    def outside_context(self) -> Iterator[None]:
        """The modules outside the blocks on the device (read only: nothing is written back)."""
        moved = _move_in(outside_modules(self.model, self.blocks), self.device)
        self.bytes_in += sum(h.numel() * h.element_size() for *_, h in moved)
        try:
            yield
        finally:
            _move_out(moved, write_back=False)

    @contextmanager
    def capture_context(self) -> Iterator[None]:
        with self.outside_context():
            self.load(0, self.blocks[0])  # a recorder may run block 0 once to learn its return shape
            try:
                yield
            finally:
                _move_out(self._held.pop(0), write_back=False)

    def load(self, index: int, block: nn.Module) -> None:
        moved = _move_in(list(block.modules()), self.device)
        self.bytes_in += sum(h.numel() * h.element_size() for *_, h in moved)
        self._held[index] = moved

    def done(self, index: int, block: nn.Module) -> None:
        _move_out(self._held.pop(index), write_back=True)

    def release(self, index: int, block: nn.Module) -> None:
        _move_out(self._held.pop(index), write_back=False)
