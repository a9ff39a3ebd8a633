"""Report plots drawn with matplotlib (Agg backend, PNG files under ``plots/``): per-layer sparsity,
per-block reconstruction error, for sweeps perplexity against sparsity, and the recovery loss curve."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from core.result import RunReport, Variant

PLOTS_DIR = "plots"
_BLOCK = re.compile(r"\.(\d+)\.")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(root: Path, fig: Any, name: str) -> str:
    plt = _pyplot()
    fig.tight_layout()
    rel = f"{PLOTS_DIR}/{name}.png"
    fig.savefig(root / rel)
    plt.close(fig)
    return rel


def write_plots(root: Path, report: RunReport) -> list[str]:
    """Write the plots this report has data for; their paths relative to ``root``."""
    (root / PLOTS_DIR).mkdir(exist_ok=True)
    plots = [
        _layer_sparsity(root, report),
        _block_recon(root, report),
        _sweep_curve(root, report),
        _recovery_loss(root, report),
    ]
    return [p for p in plots if p is not None]


def _layer_sparsity(root: Path, report: RunReport) -> str | None:
    layers = report.sparsity.layers
    if not layers:
        return None
    plt = _pyplot()
    names, values = list(layers), [float(v) for v in layers.values()]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.12 * len(names) + 1)), dpi=100)
    ax.barh(range(len(names)), values, color="#3b6ea5")
    ax.set_yticks(range(len(names)), [n.removeprefix("model.") for n in names], fontsize=6)
    ax.invert_yaxis()
    target = report.sparsity.target
    if target is not None:
        ax.axvline(float(target), color="#c0392b", linestyle="--", label=f"target {float(target):g}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of zero weights")
    ax.set_title("Per-layer sparsity")
    return _save(root, fig, "layer_sparsity")


def block_recon(layers: dict[str, dict[str, Any]], before: bool = False) -> list[tuple[int, float, float]]:
    """``(block, mean, max)`` relative reconstruction error over each block's layers that have one;
    ``before``: the error before the reconstruction stage (layers that had one)."""
    per: dict[int, list[float]] = {}
    for name, rec in layers.items():
        err = (rec.get("reconstruct") or {}).get("err_before") if before else rec.get("recon_error")
        m = _BLOCK.search(name)
        if m is not None and err is not None:
            per.setdefault(int(m.group(1)), []).append(float(err))
    return [(b, sum(v) / len(v), max(v)) for b, v in sorted(per.items())]


def _block_recon(root: Path, report: RunReport) -> str | None:
    rows = block_recon(report.layers)
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    blocks = [b for b, _, _ in rows]
    ax.bar(blocks, [mx for _, _, mx in rows], color="#e3b5a4", label="worst layer")
    ax.plot(blocks, [mean for _, mean, _ in rows], "o-", color="#8e2c1a", label="mean over layers")
    pre = block_recon(report.layers, before=True)
    if pre:
        ax.plot([b for b, _, _ in pre], [mean for _, mean, _ in pre], "s--", color="#7f8c8d",
                label="mean before reconstruction")  # fmt: skip
    ax.set_xlabel("decoder block")
    ax.set_ylabel("||WX - W'X|| / ||WX||")
    ax.set_title("Per-block reconstruction error (calibration inputs)")
    ax.legend(fontsize=7)
    return _save(root, fig, "block_recon_error")


def curve_lines(variants: list[Variant]) -> dict[str, list[tuple[float, float]]]:
    """``{"method pattern": [(measured sparsity, pruned perplexity)]}`` sorted by sparsity."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for v in variants:
        if v.pruned_ppl is not None:
            lines.setdefault(f"{v.method} {v.pattern}", []).append((v.sparsity, v.pruned_ppl))
    return {k: sorted(pts) for k, pts in lines.items()}


def _sweep_curve(root: Path, report: RunReport) -> str | None:
    if report.sweep is None:
        return None
    lines = curve_lines(report.sweep.variants)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, pts in lines.items():
        ax.plot([s for s, _ in pts], [p for _, p in pts], "o-", label=name)
    dense = report.evaluation.dense_ppl if report.evaluation else None
    if dense:
        ax.axhline(dense, color="#555", linestyle="--", label=f"dense {dense:.4g}")
    ax.set_yscale("log")
    ax.set_xlabel("measured sparsity of the pruned layers")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity against sparsity")
    ax.legend(fontsize=7)
    return _save(root, fig, "sweep_ppl")


def _recovery_loss(root: Path, report: RunReport) -> str | None:
    rec = report.recovery
    if rec is None or not rec.losses:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    tokens = [step * rec.batch * rec.seqlen for step, _ in rec.losses]
    ax.plot(tokens, [loss for _, loss in rec.losses], "-", color="#3b6ea5", lw=1, label="training loss")
    ax.set_xlabel("recovery tokens")
    ax.set_ylabel("mean next-token loss (nats)")
    parts = [
        f"{name} {v:.4g}"
        for name, v in (("pruned ppl", rec.pruned_ppl), ("recovered", rec.recovered_ppl))
        if v is not None
    ]
    ax.set_title(f"Recovery ({rec.mode}): " + ", ".join(parts) if parts else f"Recovery ({rec.mode})")
    ax.legend(fontsize=7)
    return _save(root, fig, "recovery_loss")
