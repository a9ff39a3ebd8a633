"""Job webhooks from the worker: signed deliveries on a background thread, every attempt recorded in
the job's event stream (type `webhook`). A delivery can never fail or stall the job."""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any

from jobs.events import EventLog
from jobs.spec import Job
from jobs.webhooks import deliver

log = logging.getLogger("worker.webhooks")

MAX_ATTEMPTS = 5
"""Tries per `started` / `completed` delivery (backoff 1, 2, 4, 8 s); `progress` is tried once."""
MAX_BACKOFF_S = 60.0
MAX_PENDING_PROGRESS = 32
"""Progress messages are shed only when this many deliveries are already waiting (a slow receiver)."""
DRAIN_TIMEOUT_S = 120.0
"""How long the end of a job waits for pending deliveries before the worker process moves on."""


class Notifier:
    """Sends the job's subscribed events (`started`, `progress`, `completed`) to its webhook URL."""

    def __init__(
        self,
        events: EventLog,
        job: Job,
        secret: str | None,
        *,
        max_attempts: int = MAX_ATTEMPTS,
        backoff: float = 1.0,
        allow_private: bool = False,
    ) -> None:
        self.events, self.job_id, self.tenant = events, job.id, job.tenant
        hook = job.request.webhook
        self.url = hook.url if hook else None
        self.subscribed = set(hook.events) if hook else set()
        self.secret = secret
        self.max_attempts, self.backoff = max_attempts, backoff
        self.allow_private = allow_private  # PRUNE_WEBHOOK_ALLOW_PRIVATE
        self._queue: queue.Queue[tuple[str, dict[str, Any], int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        if hook and not secret:
            log.warning("job %s: webhook requested but PRUNE_WEBHOOK_SECRET is not set; not sent", job.id)

    @property
    def enabled(self) -> bool:
        """Whether the job has a webhook this worker can sign."""
        return bool(self.url and self.secret)

    def wants(self, kind: str) -> bool:
        """Whether a `kind` event would be sent (the job subscribed to it and this worker can sign)."""
        return self.enabled and kind in self.subscribed

    def send(self, kind: str, event_type: str, data: dict[str, Any]) -> None:
        """Queue `event_type` (e.g. `job.started`) if the job subscribed to `kind`. Progress events are
        shed only behind a backlog of MAX_PENDING_PROGRESS deliveries (each is only a snapshot), so a
        responsive receiver gets every stage and block."""
        if not self.wants(kind):
            return
        if kind == "progress" and self._queue.qsize() >= MAX_PENDING_PROGRESS:
            return
        payload = {"job_id": self.job_id, "tenant": self.tenant, **data}
        self._queue.put((event_type, payload, 1 if kind == "progress" else self.max_attempts))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"webhooks-{self.job_id}", daemon=True)
            self._thread.start()

    def close(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        """Wait (at most `timeout`) for queued deliveries to finish."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("job %s: webhook deliveries still pending after %.0f s", self.job_id, timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            event_type, payload, attempts = item
            try:
                self._deliver(event_type, payload, attempts)
            except Exception:  # never let a delivery problem escape into the job
                log.exception("job %s: webhook %s not delivered", self.job_id, event_type)

    def _deliver(self, event_type: str, payload: dict[str, Any], max_attempts: int) -> None:
        """One `deliver` call per try (same message id), so each attempt is recorded as it happens."""
        assert self.url and self.secret
        msg_id = f"msg_{uuid.uuid4().hex}"
        for n in range(1, max_attempts + 1):
            (a,) = deliver(
                self.url, self.secret, event_type, payload, max_attempts=1, msg_id=msg_id,
                allow_private=self.allow_private,  # checked again where the name resolves now
            )  # fmt: skip
            record = {"event": event_type, "msg_id": msg_id, "url": self.url, **a.to_dict(), "attempt": n}
            try:
                self.events.publish(self.job_id, "webhook", record)
            except Exception as e:
                log.warning("job %s: webhook attempt not recorded: %s", self.job_id, e)
            if a.ok:
                log.info("job %s: webhook %s delivered (attempt %d)", self.job_id, event_type, n)
                return
            if (a.error or "").startswith("refused:"):
                break  # the address policy refuses it now: retrying cannot help
            if n < max_attempts:
                time.sleep(min(MAX_BACKOFF_S, self.backoff * 2 ** (n - 1)))
        log.warning("job %s: webhook %s failed after %d attempts: %s", self.job_id, event_type, n, a.error)
