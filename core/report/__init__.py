"""Human reports of a run: verdict, gate, plots (matplotlib) and ``report.html``.

:func:`finish` is called by the pipeline on the report dict before the reports are written: it adds
``verdict`` (and ``gate`` when the spec has one) and writes ``plots/*.png`` and ``report.html``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core import gate as gates
from core.report.html import render_html
from core.report.plots import write_plots
from core.report.timing import time_breakdown
from core.report.verdict import verdict
from core.spec import RunSpec

__all__ = ["finish", "markdown_sections", "verdict"]


def finish(root: Path, report: dict[str, Any], spec: RunSpec) -> None:
    """Add the verdict and gate outcome to ``report``; write plots and ``report.html`` under ``root``
    (when ``outputs.report``)."""
    report["verdict"] = verdict(report.get("evaluation"))
    if spec.gate is not None:
        report["gate"] = gates.check(spec.gate, report)
    if not spec.outputs.report:
        return
    report["plots"] = write_plots(root, report)
    (root / "report.html").write_text(render_html(root, report), encoding="utf-8")


def markdown_sections(report: dict[str, Any]) -> list[str]:
    """Markdown lines for the verdict, the gate and the plots (appended to report.md)."""
    lines: list[str] = []
    v = report.get("verdict")
    if v:
        lines += ["## Verdict", "", f"**{v['label']}** — {v['text']}", ""]
    if (report.get("evaluation") or {}).get("dense_cached"):
        lines += ["The dense perplexity was reused from the cached dense baseline (same weights and "
                  "evaluation tokens); it was not measured again by this run.", ""]  # fmt: skip
    g = report.get("gate")
    if g:
        lines += [f"## Quality gate: {'passed' if g['passed'] else 'FAILED'}", ""]
        lines += ["| check | limit | measured | passed |", "|---|---|---|---|"]
        for c in g["checks"]:
            value = "not measured" if c["value"] is None else f"{c['value']:.4g}"
            lines.append(f"| {c['name']} | {c['limit']:g} | {value} | {'yes' if c['passed'] else 'no'} |")
        lines.append("")
    gens = report.get("generations") or []
    if gens:
        lines += [
            "## Generations (greedy, fixed prompts)",
            "",
            "| prompt | dense | pruned |",
            "|---|---|---|",
        ]
        cell = lambda t: "—" if t is None else " ".join(str(t).split()).replace("|", "\\|")  # noqa: E731
        lines += [f"| {cell(g['prompt'])} | {cell(g['dense'])} | {cell(g['pruned'])} |" for g in gens]
        lines.append("")
    rows = time_breakdown(report.get("timings") or {})
    if rows:
        lines += ["## Where the time went", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {name} | {sec:.2f} |" for name, sec in rows]
        lines.append("")
    for name in report.get("plots") or []:
        lines += [f"![{Path(name).stem}]({name})", ""]
    return lines
