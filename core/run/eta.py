"""A steady estimate of a job's remaining time from its progress fractions (pure, no clock of its own).

The naive ``elapsed * (1 - f) / f`` swings wildly early in a job: loading and calibration take much
longer per unit of fraction than pruning, so the first estimates say minutes for a job that takes
seconds (issue 13: 2m21s shown for a 30 s job). :class:`EtaEstimator` gives no estimate until a floor
of progress is reached (a fraction, and while pruning a number of blocks seen), then blends each new
raw estimate -- the pace since the first pruned block, not since the start -- into the previous one
counted down by the time passed (exponential smoothing).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FRACTION = 0.05
"""No estimate before this much of the job is done."""
MIN_BLOCKS = 2
"""No estimate before this many blocks have been pruned (the stages before pruning say little about
the pace of the rest)."""
ALPHA = 0.3
"""Weight of a new raw estimate against the counted-down previous one."""


@dataclass
class EtaEstimator:
    """Feed it ``update(t, fraction, stage, block)``; it returns seconds left or None."""

    min_fraction: float = MIN_FRACTION
    min_blocks: int = MIN_BLOCKS
    alpha: float = ALPHA
    t0: float | None = None
    last_t: float | None = None
    eta: float | None = None
    blocks_seen: int = 0
    last_block: int | None = None
    ref: tuple[float, float] | None = None
    """(t, fraction) the pace is measured from: the first pruned block (the slow start excluded)."""

    def update(
        self, t: float, fraction: float, stage: str | None = None, block: int | None = None
    ) -> float | None:
        """The smoothed remaining seconds at time ``t`` (any monotonic clock) for overall ``fraction``."""
        if self.t0 is None:
            self.t0 = t
        f = min(max(fraction, 0.0), 1.0)
        if stage == "pruning" and block is not None and block != self.last_block:
            self.last_block, self.blocks_seen = block, self.blocks_seen + 1
            if self.ref is None:
                self.ref = (t, f)
        if f >= 1.0:
            self.eta, self.last_t = 0.0, t
            return 0.0
        before_pruning = stage in ("loading", "calibrating", "pruning") or (
            stage == "evaluating" and self.blocks_seen == 0  # the dense baseline
        )
        early = f < self.min_fraction or (before_pruning and self.blocks_seen < self.min_blocks)
        if early and self.eta is None:
            return None
        t_ref, f_ref = self.ref if self.ref is not None else (self.t0, 0.0)
        if f <= f_ref:
            return self.eta
        raw = (t - t_ref) * (1 - f) / (f - f_ref)  # the pace since the reference point
        if self.eta is None or self.last_t is None:
            self.eta = raw
        else:
            counted_down = max(0.0, self.eta - (t - self.last_t))
            self.eta = self.alpha * raw + (1 - self.alpha) * counted_down
        self.last_t = t
        return round(self.eta, 1)
