"""The Celery app configuration shared by the API (sends tasks by name) and the worker (runs them).

Nothing here imports worker code or the engine: the API enqueues `RUN_TASK` with `send_task`.
"""

from __future__ import annotations

import redis
from celery import Celery

from jobs.settings import Settings

RUN_TASK = "prune.run_job"


def make_celery(settings: Settings, include: list[str] | None = None) -> Celery:
    """A Celery app on the Redis broker with at-least-once, one-job-at-a-time semantics.

    Late acks + reject on worker loss redeliver a job whose worker died; the visibility timeout
    (job time limit + 1 h) is above the longest allowed job so a running job is never redelivered
    while its worker is alive.
    """
    app = Celery(
        "prune",
        broker=settings.redis_url,
        backend=settings.redis_url,
        include=include or [],
        set_as_current=include
        is not None,  # a sender (API, a worker's re-send) never replaces the worker's app
    )
    vt = settings.visibility_timeout
    transport = {
        "visibility_timeout": vt,
        # sweep for abandoned (unacked, older than vt) messages often enough for short timeouts
        "unacked_restore_interval": min(10, max(1, vt // 4)),
        "unacked_restore_throttle": 1 if vt < 600 else 10,
    }
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,  # fresh process per job: no leaked torch memory between jobs
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        visibility_timeout=settings.visibility_timeout,
        broker_connection_retry_on_startup=True,
        broker_connection_retry=True,  # reconnect after a Redis restart instead of exiting
        broker_connection_max_retries=None,  # ... however long Redis is away
        task_default_queue=settings.queue,
        task_routes={RUN_TASK: {"queue": settings.queue}},
        task_soft_time_limit=settings.job_time_limit,
        task_time_limit=settings.job_time_limit + 300,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


class Queue:
    """Enqueue jobs and count the broker's messages."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.app = make_celery(settings)
        self.r = client or redis.Redis.from_url(settings.redis_url)

    def enqueue(self, job_id: str, token: str | None = None, countdown: float | None = None) -> None:
        """Send the run task for `job_id` to the GPU queue, carrying the job's delivery token (a worker
        skips a message whose token is no longer the record's: it was superseded by a re-send);
        `countdown`: seconds before a worker may start it."""
        self.app.send_task(
            RUN_TASK, args=[job_id, token], queue=self.settings.queue, ignore_result=True, countdown=countdown
        )

    def messages(self) -> int:
        """Messages waiting in the broker queue, runnable or not (a cancelled or superseded job's
        message stays until a worker's main process drops it; not counting the one being run)."""
        return int(self.r.llen(self.settings.queue))
