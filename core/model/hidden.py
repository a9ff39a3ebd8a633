"""The hidden states carried from block to block: one tensor per batch, on the compute device, in
host memory (page-locked for CUDA) or spilled to disk, all bit-exact."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from core.model.capture import Args, Batch

__all__ = ["Batches", "HiddenStore"]


class HiddenStore(Sequence[torch.Tensor]):
    """Hidden state per batch: on the compute device, in host memory (``host``; page-locked when
    ``pin``) or spilled (``spill_dir``: one ``torch.save`` file per batch); all bit-exact. Items
    are handed out on ``device`` (default: where they were put)."""

    def __init__(
        self,
        spill_dir: Path | None = None,
        items: list[torch.Tensor] | None = None,
        *,
        device: torch.device | None = None,
        host: bool = False,
        pin: bool = False,
    ) -> None:
        self.spill_dir, self.device, self.host, self.pin = spill_dir, device, host, pin
        self._items: list[torch.Tensor | Path] = []
        for t in items or []:
            self.append(t)

    def _put(self, i: int, hidden: torch.Tensor) -> torch.Tensor | Path:
        if self.spill_dir is None:
            if self.host and hidden.device.type != "cpu":
                out = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=self.pin)
                return out.copy_(hidden)
            if not self.host and self.device is not None and hidden.device != self.device:
                return hidden.to(self.device)
            return hidden
        path = self.spill_dir / f"batch-{i:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(hidden.detach().to("cpu").contiguous(), tmp)
        os.replace(tmp, path)
        return path

    def append(self, hidden: torch.Tensor) -> None:
        self._items.append(self._put(len(self._items), hidden))

    def replace(self, i: int, hidden: torch.Tensor) -> None:
        self._items[i] = self._put(i, hidden)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        h = self._items[i]
        t = torch.load(h, weights_only=True) if isinstance(h, Path) else h
        if self.device is not None and t.device != self.device:
            t = t.to(self.device, non_blocking=self.pin)
        return t

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def nbytes(self) -> int:
        """Bytes held in (device or host) memory (0 when spilled)."""
        return sum(h.numel() * h.element_size() for h in self._items if isinstance(h, torch.Tensor))


class Batches(Sequence[Batch]):
    """``(hidden, args, kwargs)`` of one block per batch, from the store and that block's arguments."""

    def __init__(self, hidden: Sequence[torch.Tensor], args: list[Args]) -> None:
        self.hidden, self.args = hidden, args

    def __len__(self) -> int:
        return len(self.args)

    def __getitem__(self, j: int) -> Batch:  # type: ignore[override]
        return (self.hidden[j], *self.args[j])
