"""Report plots drawn with matplotlib (Agg backend, PNG files under ``plots/``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLOTS_DIR = "plots"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def write_plots(root: Path, report: dict[str, Any]) -> list[str]:
    """Write the plots this report has data for; their paths relative to ``root``."""
    layers = (report.get("sparsity") or {}).get("layers") or {}
    if not layers:
        return []
    plt = _pyplot()
    (root / PLOTS_DIR).mkdir(exist_ok=True)
    names = list(layers)
    values = [float(v if not isinstance(v, dict) else v.get("sparsity", 0.0)) for v in layers.values()]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.12 * len(names) + 1)), dpi=100)
    ax.barh(range(len(names)), values, color="#3b6ea5")
    ax.set_yticks(range(len(names)), [n.removeprefix("model.") for n in names], fontsize=6)
    ax.invert_yaxis()
    target = (report.get("sparsity") or {}).get("target")
    if target is not None:
        ax.axvline(float(target), color="#c0392b", linestyle="--", label=f"target {float(target):g}")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of zero weights")
    ax.set_title("Per-layer sparsity")
    fig.tight_layout()
    rel = f"{PLOTS_DIR}/layer_sparsity.png"
    fig.savefig(root / rel)
    plt.close(fig)
    return [rel]
