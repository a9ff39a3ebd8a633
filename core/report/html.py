"""``report.html``: the report as one self-contained page (plots embedded as data URIs)."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from core.report.timing import time_breakdown

STYLE = (
    "body{font-family:sans-serif;max-width:60em;margin:2em auto}th{text-align:left;padding-right:1em}"
    ".warn{color:#b00}.ok{color:#070}img{max-width:100%}"
)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _num(v: Any, nd: int = 4) -> str:
    return "—" if v is None else (f"{v:.{nd}g}" if isinstance(v, float) else str(v))


def render_html(root: Path, report: dict[str, Any]) -> str:
    """The HTML page of ``report`` (reads the plot files written under ``root``)."""
    m, s = report.get("model") or {}, report.get("sparsity") or {}
    ev, t = report.get("evaluation") or {}, report.get("timings") or {}
    prune = (report.get("spec") or {}).get("prune") or {}
    parts = ["<h1>Pruning report</h1>"]
    v = report.get("verdict") or {}
    if v:
        cls = "warn" if v.get("warning") else "ok"
        parts.append(f'<p class="{cls}"><b>{html.escape(v["label"])}</b>: {html.escape(v["text"])}</p>')
    parts.append("<h2>Setup</h2>")
    parts.append(
        _table(
            [
                ("model", f"{m.get('source')} ({m.get('architecture')}, {m.get('nblocks')} blocks)"),
                ("method", f"{prune.get('method')} {prune.get('pattern')} target {_num(s.get('target'))}"),
                ("measured sparsity", _num(s.get("overall"))),
            ]
        )
    )
    if ev:
        parts.append("<h2>Perplexity</h2>")
        dense = _num(ev.get("dense_ppl")) + (" (cached baseline)" if ev.get("dense_cached") else "")
        rows = [("dense", dense), ("pruned", _num(ev.get("pruned_ppl")))]
        parts.append(_table([*rows, ("ratio", _num(v.get("ratio")))]))
    g = report.get("gate")
    if g:
        parts.append(f"<h2>Quality gate: {'passed' if g['passed'] else 'FAILED'}</h2>")
        parts.append(_table([(c["name"], f"limit {c['limit']:g}, measured {_num(c['value'])}, "
                              f"{'pass' if c['passed'] else 'FAIL'}") for c in g["checks"]]))  # fmt: skip
    for rel in report.get("plots") or []:
        data = base64.b64encode((root / rel).read_bytes()).decode()
        parts.append(f'<img alt="{html.escape(Path(rel).stem)}" src="data:image/png;base64,{data}">')
    gens = report.get("generations") or []
    if gens:
        parts.append("<h2>Generations (greedy, fixed prompts)</h2><table><tr><th>prompt</th><th>dense</th>"
                     "<th>pruned</th></tr>")  # fmt: skip
        for g in gens:
            cells = "".join(
                f"<td>{html.escape(str(g[k] or '—'))}</td>" for k in ("prompt", "dense", "pruned")
            )
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</table>")
    rows = time_breakdown(t)
    if rows:
        parts.append("<h2>Where the time went (s)</h2>")
        parts.append(_table([(k, f"{v:.2f}") for k, v in rows]))
    body = "\n".join(parts)
    head = '<!doctype html><meta charset="utf-8"><title>Pruning report</title>'
    return f"{head}<style>{STYLE}</style>\n{body}\n"
