"""Human reports of a run: verdict, gate, plots (matplotlib) and ``report.html``.

:func:`finish` is called by the pipeline on the report before the reports are written: it sets
``verdict`` (and ``gate`` when the spec has one and the run did not decide it already, as a sweep
does) and writes ``plots/*.png`` and ``report.html``.
"""

from __future__ import annotations

from pathlib import Path

from core.artifacts.report.html import render_html
from core.artifacts.report.plots import write_plots
from core.artifacts.report.tables import gate_rows, sweep_rows, task_rows
from core.artifacts.report.timing import time_breakdown
from core.artifacts.report.verdict import verdict
from core.evaluation import gate as gates
from core.result import RunReport
from core.spec import RunSpec

__all__ = ["finish", "markdown_sections", "verdict"]


def finish(root: Path, report: RunReport, spec: RunSpec) -> None:
    """Set the verdict and gate outcome of ``report``; write plots and ``report.html`` under ``root``
    (when ``outputs.report``)."""
    report.verdict = verdict(report.evaluation)
    if spec.gate is not None and report.gate is None:
        report.gate = gates.check(spec.gate, report.evaluation, report.sparsity.overall)
    if not spec.outputs.report:
        return
    report.plots = write_plots(root, report)
    (root / "report.html").write_text(render_html(root, report), encoding="utf-8")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: " ".join(str(c).split()).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return [*lines, *("| " + " | ".join(esc(c) for c in r) + " |" for r in rows), ""]


def recovery_lines(report: RunReport) -> list[str]:
    """The recovery section: perplexity dense / pruned / recovered, budget spent, sparsity check."""
    rec = report.recovery
    if rec is None:
        return []
    ev = report.evaluation
    fmt = lambda v: "—" if v is None else f"{v:.4g}"  # noqa: E731
    c = rec.check
    nm = "" if c.nm_ok is None else f"; every N:M group valid: **{'yes' if c.nm_ok else 'NO'}**"
    resumed = f" (resumed from step {rec.resumed_from_step})" if rec.resumed_from_step else ""
    lines = [
        "## Recovery",
        "",
        f"Mode **{rec.mode}**: {rec.steps} steps x {rec.batch} windows x {rec.seqlen} "
        f"tokens = {rec.tokens} tokens of {rec.source} in {rec.seconds:.1f} s{resumed}; lr {rec.lr:g}, "
        f"seed {rec.seed}, {rec.trainable_params} trained parameters.",
        "",
    ]
    lines += _md_table(
        ["dense ppl", "pruned ppl (one-shot)", "recovered ppl"],
        [[fmt(ev.dense_ppl if ev else None), fmt(rec.pruned_ppl), fmt(rec.recovered_ppl)]],
    )
    lines += [
        f"Sparsity after the merge: all {c.pruned_entries} pruned weights still exactly zero: "
        f"**{'yes' if c.zeros_kept else 'NO'}**; per-row zero counts kept: "
        f"**{'yes' if c.rows_ok else 'NO'}**{nm}.",
        "",
    ]
    return lines


def markdown_sections(report: RunReport) -> list[str]:
    """Markdown lines for the verdict, sweep, gate, zero-shot tasks, generations, time and plots."""
    lines: list[str] = []
    v = report.verdict
    if v:
        lines += ["## Verdict", "", f"**{v.label}** — {v.text}", ""]
    if report.evaluation is not None and report.evaluation.dense_cached:
        lines += [
            "The dense perplexity was reused from the cached dense baseline (same weights and "
            "evaluation tokens); it was not measured again by this run.",
            "",
        ]
    sw = report.sweep
    if sw:
        how = "the sparsest variant that passes the gate" if sw.chosen_by_gate else "the sparsest variant"
        lines += [
            "## Sweep",
            "",
            f"Headline variant: **{sw.headline}** ({how}); each variant's "
            "artifacts and report are under its directory.",
            "",
        ]
        header, rows = sweep_rows(sw.variants)
        lines += _md_table(header, rows)
    g = report.gate
    if g:
        lines += [f"## Quality gate: {'passed' if g.passed else 'FAILED'}", ""]
        if sw is not None:
            lines += [f"Chosen variant: **{g.variant}**" if g.variant else "No variant passes the gate.", ""]
        lines += _md_table(["check", "limit", "measured", "passed"], gate_rows(g))
    lines += recovery_lines(report)
    tasks = report.evaluation.tasks if report.evaluation else []
    if tasks:
        lines += ["## Zero-shot tasks (lm-evaluation-harness)", ""]
        lines += _md_table(*task_rows(tasks))
    if report.generations:
        lines += ["## Generations (greedy, fixed prompts)", ""]
        cell = lambda t: "—" if t is None else t  # noqa: E731
        rows = [[g.prompt, cell(g.dense), cell(g.pruned)] for g in report.generations]
        lines += _md_table(["prompt", "dense", "pruned"], rows)
    rows_t = time_breakdown(report.timings)
    if rows_t:
        lines += ["## Where the time went", ""]
        lines += _md_table(["stage", "seconds"], [[name, f"{sec:.2f}"] for name, sec in rows_t])
    for name in report.plots:
        lines += [f"![{Path(name).stem}]({name})", ""]
    return lines
