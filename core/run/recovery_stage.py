"""The recovery stage inside a run (:mod:`core.run.pipeline`): glue between the run and
:mod:`core.run.recovery`.

The pipeline calls :func:`run` once per variant, after the pruned perplexity and before
generations, tasks and export; everything after it (evaluation, gate, sweep table, export) sees the
recovered model. Its checkpoint lives beside the variant's block checkpoints:
``<resume_dir>/recovery/`` (a sweep: ``<resume_dir>/variants/<label>/recovery/``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.progress import Progress
from core.result import RecoveryInfo
from core.run.recovery import TrainText, recover

__all__ = ["run"]


def run(
    job: Any, i: int, blocks_dir: Path | None, pruned: dict[str, Any] | None, timings: dict[str, float]
) -> RecoveryInfo | None:
    """Recover variant ``i`` of ``job`` (a ``core.run.pipeline._InMemoryRun``) when its spec asks for it.

    ``blocks_dir``: the variant's block-checkpoint directory (its parent holds ``recovery/``);
    ``pruned``: the one-shot pruned perplexity measured just before; ``timings``: the variant's
    timings, to which ``recovery_s`` and ``recovered_eval_s`` are added.
    """
    spec = job.spec
    rs = spec.recovery
    if not rs.enabled:
        return None
    label, tag = job._tag(i)
    prune = job.variants[i][1]
    cal, ev = spec.calibration, spec.evaluation
    where = TrainText(
        source=rs.source or cal.source,
        text_field=rs.text_field or cal.text_field,
        data_dir=job.data_dir,
        eval_source=ev.source if ev.enabled else None,
        eval_text_field=ev.text_field,
    )

    def on_step(p: Progress) -> None:
        job.stages.emit(f"recovering{i}", p.fraction, "recovering", tag + p.message, variant=label)

    eval_s = [0.0]

    def evaluate() -> float:
        t = time.perf_counter()
        ppl = float(job._ppl(f"recovered_eval{i}", f"{tag}recovered", i, variant=label)["ppl"])
        eval_s[0] = time.perf_counter() - t
        return ppl

    job.stages.emit(f"recovering{i}", 0.0, "recovering", f"{tag}recovery ({rs.mode})", variant=label)
    t = time.perf_counter()
    info = recover(
        job.model,
        job.tok,
        rs,
        prune,
        where,
        job.seqlen,
        on_step,
        job.should_cancel,
        blocks_dir.parent / "recovery" if blocks_dir is not None else None,
        evaluate if ev.enabled else None,
    )
    timings["recovery_s"] = time.perf_counter() - t - eval_s[0]
    if ev.enabled:
        timings["recovered_eval_s"] = eval_s[0]
        timings["eval_s"] = timings.get("eval_s", 0.0) + eval_s[0]
    info.pruned_ppl = pruned["ppl"] if pruned else None
    return info
