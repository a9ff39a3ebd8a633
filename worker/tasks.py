"""The Celery task: a thin shell around `worker.runner.run_job`."""

from __future__ import annotations

import logging
import threading

from celery.signals import worker_shutdown
from celery.worker.request import Request
from celery.worker.state import task_ready

from jobs import lifecycle
from jobs.logs import job_context
from jobs.queue import RUN_TASK
from jobs.spec import TERMINAL, Job
from worker.app import app
from worker.runner import Context, context, notifier, notify_completed, run_job

log = logging.getLogger("worker.tasks")

MAX_NOTICES = 8
"""Completion webhooks the main process sends at once; past that a message goes to the pool as before."""
SHUTDOWN_WAIT_S = 10.0
"""How long a stopping worker waits for the main process's pending webhooks."""
_FINISHED = {s.value for s in TERMINAL}
"""Messages of finished jobs: dropped here, after sending the completion webhook if none went out
(a job cancelled while queued, one the lease sweeper failed or cancelled, a notice lost with a pool
child that died after finishing)."""
_slots = threading.BoundedSemaphore(MAX_NOTICES)
_senders: set[threading.Thread] = set()


def _notify_dropped(ctx: Context, job: Job) -> bool:
    """Send the completion webhook (`job.cancelled|failed|succeeded`, if none went out yet) of a
    finished job whose message the main process drops,
    on a daemon thread so the consumer never waits for a receiver. False when every slot is busy
    (the caller hands the message to the pool, which sends it)."""
    hooks = notifier(ctx, job)  # the pool's sender: same signing, same send-time address checks
    if not hooks.wants("completed"):
        return True
    if not _slots.acquire(blocking=False):
        return False

    def send() -> None:
        try:
            with job_context(job.id):
                notify_completed(ctx, job, hooks)
        finally:
            _senders.discard(threading.current_thread())
            _slots.release()

    thread = threading.Thread(target=send, name=f"notice-{job.id}", daemon=True)
    _senders.add(thread)
    thread.start()
    return True


@worker_shutdown.connect
def _drain_notices(**_: object) -> None:
    """A warm shutdown waits (at most SHUTDOWN_WAIT_S) for the webhooks the main process is sending."""
    for thread in list(_senders):
        thread.join(SHUTDOWN_WAIT_S)


class DropDeadMessages(Request):
    """In the worker's main process, before a message is handed to a pool process: a message that
    cannot run its job (cancelled or finished, superseded by a re-send, deleted) is acked and dropped
    here, costing one Redis read instead of a pool process. A finished job with a completion webhook
    gets its `job.cancelled|failed|succeeded` from here too if none went out yet (cancelled while
    queued; failed or cancelled by the API's lease sweeper, which sends such a job one more message),
    sent on a daemon thread (`_notify_dropped`, at most MAX_NOTICES at once) by the pool's own
    sender (`runner.notifier`/`runner.notify_completed`: payload, signing, send-time address policy)
    and once per job (`lifecycle.take_notice`); the message is dropped without waiting for the
    receiver.

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
            ctx = context()
            why = lifecycle.unrunnable(ctx.store, job_id, token)
            job = ctx.store.get(job_id) if why in _FINISHED else None
        except Exception as e:  # Redis away: the pool process decides, as before
            log.warning("job %s: pre-check failed (%s); handing the message to the pool", job_id, e)
            return False
        if why is None or (job is not None and not _notify_dropped(ctx, job)):
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
