"""``report.html``: the report as one self-contained page (plots embedded as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from core.artifacts.report.tables import gate_rows, num, sweep_rows, task_rows
from core.artifacts.report.timing import time_breakdown
from core.result import RunReport

STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:1em}"
    "td{padding-right:1em}.warn{color:#b00}.ok{color:#070}img{max-width:100%}"
)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _grid(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(root: Path, report: RunReport) -> str:
    """The HTML page of ``report`` (reads the plot files written under ``root``)."""
    m, s, ev = report.model, report.sparsity, report.evaluation
    prune = report.spec.get("prune") or {}
    parts = ["<h1>Pruning report</h1>"]
    v = report.verdict
    if v:
        cls = "warn" if v.warning else "ok"
        parts.append(f'<p class="{cls}"><b>{html.escape(v.label)}</b>: {html.escape(v.text)}</p>')
    parts.append("<h2>Setup</h2>")
    method = f"{prune.get('method')} {prune.get('pattern')} target {num(s.target)}"
    if report.variant:
        method = f"variant {report.variant}: {method}"
    parts.append(
        _table(
            [
                ("model", f"{m.source} ({m.architecture}, {m.nblocks} blocks)"),
                ("method", method),
                ("measured sparsity", num(s.overall)),
            ]
        )
    )
    if ev:
        parts.append("<h2>Perplexity</h2>")
        dense = num(ev.dense_ppl) + (" (cached baseline)" if ev.dense_cached else "")
        rows = [("dense", dense), ("pruned", num(ev.pruned_ppl))]
        if ev.recovered_ppl is not None:
            rows.append(("recovered", num(ev.recovered_ppl)))
        parts.append(_table([*rows, ("ratio", num(v.ratio if v else None))]))
    rec = report.recovery
    if rec:
        c = rec.check
        parts.append("<h2>Recovery</h2>")
        parts.append(
            _table(
                [
                    ("mode", f"{rec.mode}, lr {rec.lr:g}, seed {rec.seed}"),
                    ("budget spent", f"{rec.steps} steps, {rec.tokens} tokens, {rec.seconds:.1f} s"),
                    ("pruned weights still zero", f"{'yes' if c.zeros_kept else 'NO'} ({c.pruned_entries})"),
                    ("per-row zero counts kept", "yes" if c.rows_ok else "NO"),
                    ("N:M groups valid", "—" if c.nm_ok is None else ("yes" if c.nm_ok else "NO")),
                ]
            )
        )
    sw = report.sweep
    if sw:
        how = "gate's pick" if sw.chosen_by_gate else "sparsest variant"
        parts.append(f"<h2>Sweep</h2><p>Headline variant: <b>{html.escape(sw.headline)}</b> ({how})</p>")
        parts.append(_grid(*sweep_rows(sw.variants)))
    g = report.gate
    if g:
        parts.append(f"<h2>Quality gate: {'passed' if g.passed else 'FAILED'}</h2>")
        if sw is not None:
            chosen = f"chosen variant: {g.variant}" if g.variant else "no variant passes the gate"
            parts.append(f"<p>{html.escape(chosen)}</p>")
        parts.append(_grid(["check", "limit", "measured", "passed"], gate_rows(g)))
    if ev and ev.tasks:
        parts.append("<h2>Zero-shot tasks (lm-evaluation-harness)</h2>")
        parts.append(_grid(*task_rows(ev.tasks)))
    for rel in report.plots:
        data = base64.b64encode((root / rel).read_bytes()).decode()
        parts.append(f'<img alt="{html.escape(Path(rel).stem)}" src="data:image/png;base64,{data}">')
    if report.generations:
        parts.append("<h2>Generations (greedy, fixed prompts)</h2>")
        rows_g = [[gen.prompt, gen.dense or "—", gen.pruned or "—"] for gen in report.generations]
        parts.append(_grid(["prompt", "dense", "pruned"], rows_g))
    rows_t = time_breakdown(report.timings)
    if rows_t:
        parts.append("<h2>Where the time went (s)</h2>")
        parts.append(_table([(k, f"{sec:.2f}") for k, sec in rows_t]))
    body = "\n".join(parts)
    head = '<!doctype html><meta charset="utf-8"><title>Pruning report</title>'
    return f"{head}<style>{STYLE}</style>\n{body}\n"
