"""The Celery task: a thin shell around `worker.runner.run_job`."""

from __future__ import annotations

import logging

from celery.worker.request import Request
from celery.worker.state import task_ready

from jobs import lifecycle
from jobs.logs import job_context
from jobs.queue import RUN_TASK
from worker.app import app
from worker.runner import context, run_job

log = logging.getLogger("worker.tasks")


class DropDeadMessages(Request):
    """In the worker's main process, before a message is handed to a pool process: a message that
    cannot run its job (cancelled or finished, superseded by a re-send, deleted) is acked and dropped
    here, costing one Redis read instead of a pool process. A job cancelled while queued with a
    completion webhook still goes to the pool, which sends the webhook.

    The hook is `revoked()`, which Celery asks right before it uses the pool (a True answer ends the
    request as revoked: acked, no pool process, no result)."""

    _checked = False

    def revoked(self) -> bool:
        if super().revoked():
            return True
        if self._checked:
            return False
        self._checked = True
        job_id, token = [*list(self.args or []), None, None][:2]
        try:
            store = context().store
            why = lifecycle.unrunnable(store, job_id, token)
            job = store.get(job_id) if why == "cancelled" else None
        except Exception as e:  # Redis away: the pool process decides, as before
            log.warning("job %s: pre-check failed (%s); handing the message to the pool", job_id, e)
            return False
        if why is None or (job is not None and job.request.webhook is not None):
            return False
        log.info("job %s: message dropped before the pool (%s)", job_id, why, extra={"job_id": job_id})
        task_ready(self)
        self.acknowledge()
        self._already_revoked = True
        return True


@app.task(name=RUN_TASK, acks_late=True, reject_on_worker_lost=True, Request=DropDeadMessages)
def run(job_id: str, token: str | None = None) -> str:
    """Run one job; the returned outcome is only logged (results are ignored). `token` is the job's
    delivery token (messages sent before tokens existed carry none and are accepted)."""
    with job_context(job_id):  # every log line of this job carries its id
        return run_job(job_id, token=token)
