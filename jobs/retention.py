"""Retention: delete finished jobs older than `PRUNE_RETENTION_DAYS`, with their artifacts.

Every transition into succeeded, failed or cancelled records the job in `prune:finished` (score: the
time it finished) in the same transaction (`jobs.store`). `sweep` (run by every API process at
startup and then every `PRUNE_RETENTION_INTERVAL` seconds) takes the oldest entries finished before
the cutoff and, for each, deletes its artifacts first (`ArtifactStore.delete_prefix`, idempotent),
then its record, event stream, index entries and idempotency key in one Redis transaction
(`JobStore.delete_finished`), which re-checks that the job is finished before the cutoff and takes
it out of the per-status counts. If the artifacts cannot be deleted (StorageError) the record stays
and a later sweep tries again: files are never left behind without a record that leads back to them.
A job that is not finished is never deleted. Several sweepers (API replicas) are safe: each may
delete the artifacts (idempotent), one transaction deletes the record, the others find it gone.
"""

from __future__ import annotations

import logging
import time

from jobs.spec import Job, UnreadableJob
from jobs.storage import ArtifactStore, StorageError
from jobs.store import JobStore, UnreadableRecord

log = logging.getLogger("jobs.retention")

BATCH = 500
"""Jobs one `sweep` call looks at; `sweep_all` sweeps batch after batch while they are full."""
MAX_STORAGE_FAILURES = 3
"""Consecutive StorageErrors after which a sweep stops (the store is probably down)."""


def sweep(store: JobStore, artifacts: ArtifactStore, older_than_s: float, limit: int = BATCH) -> list[str]:
    """Delete up to `limit` jobs that finished more than `older_than_s` seconds ago, oldest first:
    artifacts, then the record with everything Redis keeps about it. Returns the ids this call
    deleted. A job whose artifacts could not be deleted is kept for a later sweep;
    `MAX_STORAGE_FAILURES` such failures in a row end the sweep."""
    before = time.time() - older_than_s
    deleted: list[str] = []
    failures = 0
    for job_id, _ in store.finished(before, limit):
        try:
            job: Job | UnreadableJob | None = store.get(job_id)
        except UnreadableRecord as e:  # finished all the same: its id, tenant and status suffice
            job = e.info
        if job is None:  # another sweeper deleted it: drop a stray entry, if any
            store.delete_finished(job_id, before)
            continue
        if job.status is None or job.tenant is None or not job.status.terminal:  # never delete it
            log.error("job %s is %s but listed as finished; keeping it", job_id, job.status)
            continue
        try:
            artifacts.delete_prefix(f"{job.tenant}/{job.id}")
        except StorageError as e:
            failures += 1
            log.warning("job %s: artifacts not deleted (%s); retrying in a later sweep", job_id, e)
            if failures >= MAX_STORAGE_FAILURES:
                break
            continue
        failures = 0
        if store.delete_finished(job_id, before):
            deleted.append(job_id)
    if deleted:
        log.info("retention: deleted %d finished jobs older than %.0f s", len(deleted), older_than_s)
    return deleted


def sweep_all(store: JobStore, artifacts: ArtifactStore, older_than_s: float, batch: int = BATCH) -> int:
    """Sweep batch after batch while each one deleted a full batch; the number of jobs deleted."""
    total = 0
    while True:
        n = len(sweep(store, artifacts, older_than_s, batch))
        total += n
        if n < batch:
            return total
