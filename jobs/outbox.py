"""The outbox sweeper: send again the jobs whose task message was never confirmed sent.

`POST /v1/jobs` creates the record and its outbox entry in one Redis script, sends the task with the
job's delivery token, then drops the entry (`JobStore.confirm_sent`). An API that dies in between
leaves the entry behind; `sweep` (run by every API process at startup and then every
`PRUNE_OUTBOX_INTERVAL` seconds) gives such a job, once its entry is older than `PRUNE_OUTBOX_AGE`, a
new token in the same transaction that moves the entry to now, then sends a message with that token.
Workers skip messages whose token is not the record's, so however many messages a job ends up with
(the dead API's may have been sent after all), only one runs it. Several sweepers are safe: the
token change is a WATCH/MULTI transaction that re-checks the entry's age, so one of them wins.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from jobs.store import JobStore

log = logging.getLogger("jobs.outbox")


class Sender(Protocol):
    """What the sweeper needs of `jobs.queue.Queue`."""

    def enqueue(self, job_id: str, token: str | None = None) -> None: ...


def sweep(store: JobStore, queue: Sender, older_than_s: float) -> list[str]:
    """Re-send every queued job whose outbox entry is older than `older_than_s`; drop the entries of
    jobs that are no longer queued. Returns the ids sent. A failed send stops the sweep: the entry
    stays (its age restarted) and is tried again by a later sweep."""
    before = time.time() - older_than_s
    sent: list[str] = []
    for job_id, _ in store.outbox(before):
        token = store.reissue(job_id, before)
        if token is None:
            continue
        try:
            queue.enqueue(job_id, token)
        except Exception as e:
            log.warning("job %s: re-send failed (%s); retrying in a later sweep", job_id, e)
            break
        store.confirm_sent(job_id, token)
        log.warning("job %s: its task was never confirmed sent; sent it again", job_id)
        sent.append(job_id)
    return sent
