"""Artifacts of a run, written atomically.

Layout of ``out_dir``: ``model/`` (Hugging Face directory, sharded safetensors, tokenizer; loads
with ``AutoModelForCausalLM.from_pretrained`` and no custom code), ``report.json``,
``report.md`` and ``manifest.json`` (``{"files": {relpath: {"size", "sha256"}}}`` for every
other file). Everything is written into a temporary sibling directory that is renamed to
``out_dir`` only when complete, and removed on any error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from core.artifacts.digest import sha256_file
from core.artifacts.report import markdown_sections
from core.errors import InvalidInput
from core.result import CalibrationInfo, ExpertTokens, RunReport
from core.spec import OutputSpec

__all__ = [
    "check_out_dir",
    "manifest",
    "render_markdown",
    "save_formats",
    "save_model",
    "sha256_file",
    "staging_dir",
    "write_reports",
]


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuse an ``out_dir`` that exists and is not an empty directory (checked before any work)."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InvalidInput(f"output directory {out} already exists and is not empty")
    return out


@contextlib.contextmanager
def staging_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``out_dir``; rename it to ``out_dir`` on success, delete it on error."""
    out = check_out_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def manifest(root: Path) -> dict[str, Any]:
    """``{"files": {relpath: {"size", "sha256"}}}`` for every file under ``root`` except manifest.json."""
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != "manifest.json":
            files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return {"files": files}


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: RunReport) -> str:
    """A short human summary of ``report``."""
    m, s, e, cal = report.model, report.sparsity, report.evaluation, report.calibration
    spec = report.spec["prune"]
    title = "# Pruning report" + (f" — variant {report.variant}" if report.variant else "")
    lines = [
        title,
        "",
        f"- Model: `{m.source}` ({m.architecture}, family {m.family}, {m.nblocks} blocks, "
        f"{m.params:,} parameters)",
        f"- Method: **{spec['method']}**, pattern `{spec['pattern']}`, target sparsity {_fmt(s.target)}"
        + (f", ignored {len(s.ignored)} layers" if s.ignored else ""),
        f"- Calibration: {cal.nsamples} windows x {cal.seqlen} tokens from `{cal.source}`, seed {cal.seed}",
        f"- Measured sparsity of pruned layers: {_fmt(s.overall, 4)}"
        + (f"; N:M pattern holds: {s.nm_ok}" if s.nm_ok is not None else ""),
        "",
    ]
    if report.sweep is not None:
        lines[-1:-1] = [f"- Sweep of {len(report.sweep.variants)} variants; the figures below are "
                        f"those of the headline variant `{report.sweep.headline}`"]  # fmt: skip
    streamed = report.streaming
    if streamed.get("used"):
        lines[-1:-1] = [
            f"- Streaming mode (block by block from the checkpoint); perplexity {streamed['evaluation']}"
        ]
    if e:
        lines += [
            "## Perplexity",
            "",
            "| model | perplexity |",
            "|---|---|",
            f"| dense | {_fmt(e.dense_ppl)} |",
            f"| pruned | {_fmt(e.pruned_ppl)} |",
            "",
            f"{e.windows} windows x {e.seqlen} tokens of `{e.source}` ({e.tokens} tokens). "
            f"Formula: {e.formula}.",
            "",
        ]
    lines += markdown_sections(report)
    lines += _layer_lines(report.layers)
    lines += _expert_lines(report.experts, cal)
    lines += _warning_lines(report.warnings)
    lines += _artifact_lines(report.artifacts)
    lines += ["## Timings (s)", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k.removesuffix('_s')} | {_fmt(v, 2)} |" for k, v in report.timings.items()]
    lines += ["", f"Peak RSS: {_fmt(report.peak_rss_mb, 0)} MB", ""]
    return "\n".join(lines)


def _expert_lines(experts: list[ExpertTokens], cal: CalibrationInfo) -> list[str]:
    """Calibration tokens the router sent to each expert, per experts module."""
    if not experts:
        return []
    lines = [
        "## Experts",
        "",
        f"Calibration tokens routed to each expert ({cal.nsamples * cal.seqlen:,} tokens in all; "
        "a token goes to top-k experts). An expert that saw none is pruned by magnitude.",
        "",
        "| experts module | tokens per expert (expert 0, 1, ...) | min | max | saw none (magnitude) |",
        "|---|---|---|---|---|",
    ]
    for e in experts:
        tok = e.tokens
        none = ", ".join(map(str, e.fallback_magnitude)) or "-"
        lines.append(f"| `{e.module}` | {' '.join(map(str, tok))} | {min(tok)} | {max(tok)} | {none} |")
    return [*lines, ""]


def _layer_lines(layers: dict[str, dict[str, Any]]) -> list[str]:
    """Which method, allocation and refinement produced each layer, its sparsity and its relative
    reconstruction error ``||WX - W'X|| / ||WX||`` on the calibration inputs (folded: one row a layer);
    with reconstruction (or ALPS): the error before it, the solver's ADMM + CG iterations and seconds."""
    if not layers:
        return []
    lines = [
        "## Layers",
        "",
        f"<details><summary>{len(layers)} pruned matrices: method, allocation, refinement, sparsity, "
        "reconstruction error</summary>",
        "",
        "| layer | method | allocation | refine | sparsity | recon. error | before recon. | solver iters "
        "| solver s | DSnoT swaps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in layers.items():
        swaps = (r.get("dsnot") or {}).get("swaps")
        solve = r.get("reconstruct") or r.get("alps") or {}
        iters = f"{solve['admm_iters']} + {solve['cg_iters']}" if solve else None
        lines.append(
            f"| `{name}` | {r.get('method', '-')} | {r.get('allocation') or '-'} | {r.get('refine') or '-'} "
            f"| {_fmt(r.get('sparsity'), 4)} | {_fmt(r.get('recon_error'), 4)} "
            f"| {_fmt(solve.get('err_before'), 4)} | {iters or '-'} | {_fmt(solve.get('seconds'))} "
            f"| {_fmt(swaps)} |"
        )
    return [*lines, "", "</details>", ""]


def _warning_lines(warnings: list[str] | None) -> list[str]:
    if not warnings:
        return []
    return ["## Warnings", "", *[f"- {w}" for w in warnings], ""]


def _artifact_lines(art: dict[str, Any] | None) -> list[str]:
    if not art:
        return []
    lines = [
        "## Artifacts",
        "",
        "| format | directory | size (bytes) | weights / dense fp16 | perplexity |",
        "|---|---|---|---|---|",
    ]
    for fmt, a in art["formats"].items():
        ratio, ppl = a["ratio_to_dense_fp16"], _fmt(a.get("ppl"))
        lines.append(f"| {fmt} | `{a['dir']}/` | {a['bytes']:,} | {ratio:.3f}x | {ppl} |")
    return [*lines, "", f"Dense fp16 size of the weights: {art['dense_fp16_bytes']:,} bytes.", ""]


def save_model(root: Path, model: Any, tokenizer: Any, outputs: OutputSpec) -> None:
    """Write the Hugging Face directory ``root/model`` (sharded safetensors + tokenizer) if requested."""
    if not outputs.model:
        return
    model_dir = root / "model"
    model.save_pretrained(model_dir, max_shard_size=outputs.max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(model_dir)
    _file_modes(model_dir)


def _file_modes(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open()`` would (0666 less the umask):
    safetensors writes through a private temporary file, which left model.safetensors 0600."""
    mask = os.umask(0)
    os.umask(mask)
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~mask)


def save_formats(
    root: Path, report: RunReport, outputs: OutputSpec, perplexity: Any = None
) -> dict[str, Any] | None:
    """Turn ``root/model`` into the artifacts ``outputs.formats`` names
    (:func:`core.artifacts.formats.export`)
    and return the report's ``artifacts`` section; None when no model is exported."""
    if not outputs.model:
        return None
    from core.artifacts import formats

    layers = list(report.sparsity.layers)
    pruned = report.evaluation.pruned_ppl if report.evaluation else None
    return formats.export(root, list(outputs.formats), layers, perplexity, pruned)


def write_reports(root: Path, report: RunReport, outputs: OutputSpec) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and finally ``manifest.json``; return the manifest.

    ``report.json`` is always written (it is the run's machine-readable record); ``report.md``
    only when ``outputs.report``.
    """
    (root / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    if outputs.report:
        (root / "report.md").write_text(render_markdown(report), encoding="utf-8")
    man = manifest(root)
    (root / "manifest.json").write_text(json.dumps(man, indent=2) + "\n", encoding="utf-8")
    return man
