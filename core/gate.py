"""Quality gates: compare a run's measured quality with the limits of its ``GateSpec``."""

from __future__ import annotations

from typing import Any

from core.spec import GateSpec


def ppl_ratio(evaluation: dict[str, Any] | None) -> float | None:
    """pruned/dense perplexity, or None when either was not measured."""
    ev = evaluation or {}
    dense, pruned = ev.get("dense_ppl"), ev.get("pruned_ppl")
    if not dense or pruned is None:
        return None
    return float(pruned) / float(dense)


def check(gate: GateSpec, report: dict[str, Any]) -> dict[str, Any]:
    """``{passed, checks: [{name, limit, value, passed}]}``; an unmeasured value fails its check."""
    ev = report.get("evaluation") or {}
    sparsity = (report.get("sparsity") or {}).get("overall")
    rows = (
        ("max_ppl_ratio", gate.max_ppl_ratio, ppl_ratio(ev), lambda v, lim: v <= lim),
        ("max_pruned_ppl", gate.max_pruned_ppl, ev.get("pruned_ppl"), lambda v, lim: v <= lim),
        ("min_sparsity", gate.min_sparsity, sparsity, lambda v, lim: v >= lim),
    )
    checks = [
        {"name": name, "limit": limit, "value": value, "passed": value is not None and ok(value, limit)}
        for name, limit, value, ok in rows
        if limit is not None
    ]
    return {"passed": all(c["passed"] for c in checks), "checks": checks}
