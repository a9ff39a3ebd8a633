"""A plain verdict on the pruned/dense perplexity ratio."""

from __future__ import annotations

from core.result import Evaluation, Verdict

BANDS: tuple[tuple[float, str, str], ...] = (
    (1.10, "good", "perplexity within 10% of the dense model"),
    (1.50, "fair", "noticeable quality loss; check the generations before shipping"),
    (3.00, "poor", "large quality loss; consider a lower sparsity or another method"),
)
"""(largest ratio, label, text) bands; above the last one the model is badly damaged."""


def verdict(evaluation: Evaluation | None) -> Verdict:
    """The verdict on the run's perplexities (label ``unknown`` when the ratio was not measured)."""
    ratio = evaluation.ratio if evaluation is not None else None
    if ratio is None:
        return Verdict(ratio=None, label="unknown", text="dense and pruned perplexity not both measured",
                       warning=False)  # fmt: skip
    for limit, label, text in BANDS:
        if ratio <= limit:
            return Verdict(ratio=ratio, label=label, text=f"ratio {ratio:.2f}: {text}", warning=False)
    text = f"ratio {ratio:.2f}: WARNING, the pruned model is badly damaged (perplexity x{ratio:.1f})"
    return Verdict(ratio=ratio, label="damaged", text=text, warning=True)
