"""Quality gates: compare a run's measured quality with the limits of its ``GateSpec``."""

from __future__ import annotations

from collections.abc import Sequence

from core.result import Evaluation, GateCheck, GateOutcome
from core.spec import GateSpec


def ppl_ratio(evaluation: Evaluation | None) -> float | None:
    """pruned/dense perplexity, or None when either was not measured."""
    return evaluation.ratio if evaluation is not None else None


def check(gate: GateSpec, evaluation: Evaluation | None, sparsity: float | None) -> GateOutcome:
    """Each limit of ``gate`` against the measured values; an unmeasured value fails its check."""
    ev = evaluation
    rows = (
        ("max_ppl_ratio", gate.max_ppl_ratio, ppl_ratio(ev), lambda v, lim: v <= lim),
        ("max_pruned_ppl", gate.max_pruned_ppl, ev.final_ppl if ev else None, lambda v, lim: v <= lim),
        ("min_sparsity", gate.min_sparsity, sparsity, lambda v, lim: v >= lim),
    )
    checks = [
        GateCheck(name=name, limit=limit, value=value, passed=value is not None and ok(value, limit))
        for name, limit, value, ok in rows
        if limit is not None
    ]
    return GateOutcome(passed=all(c.passed for c in checks), checks=checks)


def pick(outcomes: Sequence[tuple[str, float, GateOutcome]]) -> str | None:
    """The label of the sparsest passing ``(label, measured sparsity, outcome)``; None when none
    passes (equal sparsities: the first listed)."""
    passing = [(s, -i, label) for i, (label, s, o) in enumerate(outcomes) if o.passed]
    return max(passing)[2] if passing else None
