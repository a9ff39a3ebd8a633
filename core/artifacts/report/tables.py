"""Rows of the report's tables, shared by report.md and report.html."""

from __future__ import annotations

from core.result import GateOutcome, TaskScore, Variant


def num(v: float | None, nd: int = 4) -> str:
    """A short number, or an em dash when not measured."""
    return "—" if v is None else f"{v:.{nd}g}"


def sweep_rows(variants: list[Variant]) -> tuple[list[str], list[list[str]]]:
    """The table behind the sweep plot: one row per variant."""
    header = ["variant", "method", "pattern", "target", "measured sparsity", "pruned ppl", "ratio",
              "verdict", "gate", "directory"]  # fmt: skip
    rows = [
        [
            v.label,
            v.method,
            v.pattern,
            f"{v.target:g}",
            f"{v.sparsity:.4f}",
            num(v.pruned_ppl),
            num(v.ppl_ratio, 3),
            v.verdict,
            "—" if v.gate is None else ("pass" if v.gate.passed else "FAIL"),
            f"{v.dir}/",
        ]
        for v in variants
    ]
    return header, rows


def gate_rows(g: GateOutcome) -> list[list[str]]:
    return [
        [
            c.name,
            f"{c.limit:g}",
            "not measured" if c.value is None else f"{c.value:.4g}",
            "yes" if c.passed else "no",
        ]
        for c in g.checks
    ]


def task_rows(tasks: list[TaskScore]) -> tuple[list[str], list[list[str]]]:
    header = ["task", "metric", "dense", "pruned", "samples", "source"]
    rows = [[t.task, t.metric, num(t.dense), num(t.pruned), str(t.samples or "—"), t.source] for t in tasks]
    return header, rows
