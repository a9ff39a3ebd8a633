"""The worker with the plan's `kill` / `hold` faults (`celery -A tests.faults.worker_hooks worker`);
test-only. Importing it wraps `worker.runner._Reporter.progress` so that each progress report of a
job whose model source matches the plan may fire its fault (`tests.faults.plan.maybe_fire`).
Production runs `celery -A worker.app`, which never imports this."""

from __future__ import annotations

from typing import Any

from core.progress import Progress
from tests.faults.plan import fault_for, maybe_fire
from worker import runner
from worker.app import app

__all__ = ["app"]

_progress = runner._Reporter.progress


def _progress_with_faults(self: runner._Reporter, p: Progress, share: float = runner.ENGINE_SHARE) -> None:
    _progress(self, p, share)
    if not hasattr(self, "fault"):
        job = self.ctx.store.get(self.job_id)
        self.fault: dict[str, Any] | None = fault_for(job.request.model.source, job.attempts) if job else None
    maybe_fire(self.fault, p.stage, p.block, self.should_cancel)


runner._Reporter.progress = _progress_with_faults  # type: ignore[method-assign]
