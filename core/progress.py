"""Progress reporting and cancellation hooks the engine calls between steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.errors import Cancelled


@dataclass(frozen=True)
class Progress:
    """One progress update.

    stage: loading | calibrating | pruning | evaluating | exporting
    block / nblocks: 1-based block index while pruning, else None.
    fraction: overall fraction of the run done, in [0, 1].
    variant: the sweep variant being pruned, evaluated or exported (None outside sweeps).
    """

    stage: str
    fraction: float
    block: int | None = None
    nblocks: int | None = None
    message: str = ""
    variant: str | None = None


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


def check_cancel(should_cancel: CancelFn | None) -> None:
    """Raise Cancelled if the caller asked to stop."""
    if should_cancel is not None and should_cancel():
        raise Cancelled("cancelled by request")


def report_block(on_progress: ProgressFn | None, block: int, nblocks: int, note: str = "") -> None:
    """Report that decoder block `block` (1-based) of `nblocks` is pruned."""
    if on_progress is not None:
        on_progress(
            Progress(
                stage="pruning",
                fraction=block / nblocks,
                block=block,
                nblocks=nblocks,
                message=f"pruned block {block}/{nblocks}{note}",
            )
        )
