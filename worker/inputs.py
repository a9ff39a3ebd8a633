"""Bring a job's s3:// sources to the worker's scratch directory before the engine runs.

The engine loads local paths; a spec naming `s3://…` for its model, calibration or evaluation
text is rewritten to the local copies (under `work/inputs/`, removed with the job's scratch).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from core.errors import Cancelled
from core.progress import Progress
from core.spec import RunSpec
from jobs.storage.s3_inputs import S3InputFetcher

FIELDS = ("model", "calibration", "evaluation")


def _s3_fields(spec: RunSpec) -> list[str]:
    """The spec's fields whose source is an s3:// URI (evaluation only when enabled)."""
    return [
        f
        for f in FIELDS
        if getattr(spec, f).source.startswith("s3://") and (f != "evaluation" or spec.evaluation.enabled)
    ]


def has_s3(spec: RunSpec) -> bool:
    """Whether the spec reads any s3:// source."""
    return bool(_s3_fields(spec))


def localize(
    spec: RunSpec,
    work: Path,
    fetcher: S3InputFetcher,
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> RunSpec:
    """Copy each s3:// source below `work/inputs/<field>` and return the spec pointing at the copies.

    Raises jobs.storage.StorageError subclasses (missing, refused, unreachable) and Cancelled."""
    update: dict[str, Any] = {}
    copied: dict[str, Path] = {}
    for field in _s3_fields(spec):
        sub = getattr(spec, field)
        uri = sub.source
        if uri in copied:  # e.g. calibration and evaluation from one file
            local = copied[uri]
        else:
            if on_progress is not None:
                on_progress(Progress(stage="loading", fraction=0.0, message=f"copying {field} from {uri}"))
            try:
                local = fetcher.fetch(uri, work / "inputs" / field, should_cancel)
            except InterruptedError as e:
                raise Cancelled(str(e)) from None
            copied[uri] = local
        update[field] = sub.model_copy(update={"source": str(local)})
    return spec.model_copy(update=update) if update else spec
