"""A timings table whose rows add up to the run's total."""

from __future__ import annotations

DISJOINT = (
    "load_s",
    "calibrate_s",
    "dense_eval_s",
    "generate_s",
    "prune_s",
    "pruned_eval_s",
    "recovery_s",
    "recovered_eval_s",
    "export_s",
)
"""Timings that do not overlap (``eval_s`` is their dense+pruned sum, ``mask_s`` is inside ``prune_s``)."""


def time_breakdown(timings: dict[str, float]) -> list[tuple[str, float]]:
    """Disjoint stages, ``other`` (the rest) and ``total``: the rows add up to the total."""
    total = timings.get("total_s")
    if total is None:
        return []
    rows = [(k.removesuffix("_s"), float(timings[k])) for k in DISJOINT if k in timings]
    rows.append(("other", float(total) - sum(v for _, v in rows)))
    return [*rows, ("total", float(total))]
