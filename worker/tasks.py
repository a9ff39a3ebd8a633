"""The Celery task: a thin shell around `worker.runner.run_job`."""

from __future__ import annotations

from jobs.logs import job_context
from jobs.queue import RUN_TASK
from worker.app import app
from worker.runner import run_job


@app.task(name=RUN_TASK, acks_late=True, reject_on_worker_lost=True)
def run(job_id: str, token: str | None = None) -> str:
    """Run one job; the returned outcome is only logged (results are ignored). `token` is the job's
    delivery token (messages sent before tokens existed carry none and are accepted)."""
    with job_context(job_id):  # every log line of this job carries its id
        return run_job(job_id, token=token)
