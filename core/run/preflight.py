"""Checks of a run spec against the model's config, made before any weight is read.

A spec can be valid on its own and still impossible for a given model: an N:M pattern whose M does
not divide a layer's inputs, a sequence length beyond the model's context, ``ignore`` patterns that
leave no layer to prune, a text source that does not exist. Each used to surface only after the
weights had loaded (minutes for a large model); :func:`check` refuses them first, with the same
errors the engine would raise later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import CalibrationError, InvalidInput
from core.model import data, families
from core.spec import NAMED_DATASETS, RunSpec

__all__ = ["check", "check_text_source", "skeleton"]


def check_text_source(source: str, what: str) -> None:
    """Refuse a text source that is neither a named dataset nor an existing file or folder."""
    if source in NAMED_DATASETS or Path(source).expanduser().exists():
        return
    raise CalibrationError(
        f"{what} text source not found: {source!r} "
        f"(expected {', '.join(NAMED_DATASETS)}, a file, a folder or a .jsonl)"
    )


def skeleton(config: Any) -> Any | None:
    """The model built from its config on the meta device (no memory, no weights); None if the
    architecture cannot be built that way (the engine then checks shapes after loading)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception:
        return None


def check(spec: RunSpec, checked: Any = None) -> None:
    """Refuse what the model's config alone shows to be impossible (InvalidInput / CalibrationError).
    ``checked``: the run's :func:`core.model.loading.check_source` (default: checked here)."""
    from core.model.loading import checked_config, model_context
    from core.run.engine import check_nm_shapes

    check_text_source(spec.calibration.source, "calibration")
    if spec.evaluation.enabled:
        check_text_source(spec.evaluation.source, "evaluation")
    config, family = (checked.config, checked.family) if checked is not None else checked_config(spec.model)
    context = model_context(config)
    data.resolve_seqlen(spec.calibration.seqlen, context)
    data.resolve_seqlen(spec.evaluation.seqlen, context)
    model = skeleton(config)
    if model is None:
        return
    linears = families.prunable_linears(model, family)
    if linears and all(families.is_ignored(name, spec.prune.ignore) for name in linears):
        raise InvalidInput(
            f"ignore {spec.prune.ignore} matches all {len(linears)} prunable layers: nothing would be pruned"
        )
    check_nm_shapes(model, family, spec.prune)
