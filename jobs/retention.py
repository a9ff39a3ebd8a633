"""Retention: delete finished jobs older than `PRUNE_RETENTION_DAYS`, with their artifacts.

Every transition into succeeded, failed or cancelled records the job in `prune:finished` (score: the
time it finished) in the same transaction (`jobs.store`). `sweep` (run by every API process at
startup and then every `PRUNE_RETENTION_INTERVAL` seconds) takes the oldest entries finished before
the cutoff and, for each, deletes its artifacts first (`ArtifactStore.delete_prefix`, idempotent),
then its record, event stream, index entries and idempotency key in one Redis transaction
(`delete_finished`), which re-checks that the job is finished before the cutoff and takes
it out of the per-status counts. If the artifacts cannot be deleted (StorageError) the record stays
and a later sweep tries again: files are never left behind without a record that leads back to them.
A job that is not finished is never deleted. Several sweepers (API replicas) are safe: each may
delete the artifacts (idempotent), one transaction deletes the record, the others find it gone.
"""

from __future__ import annotations

import logging
import math
import time

import redis

from jobs.spec import TERMINAL, Job, JobStatus, UnreadableJob
from jobs.storage import ArtifactStore, StorageError
from jobs.store import JobStore, UnreadableRecord, parse_job

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
            delete_finished(store, job_id, before)
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
        if delete_finished(store, job_id, before):
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


def delete_finished(store: JobStore, job_id: str, before: float = math.inf) -> bool:
    """Delete a job that finished at or before `before` (Unix time): its record, event stream,
    index entries and idempotency key (while it points at this job), and take it out of the
    per-status counts; all in one WATCH/MULTI transaction. True when this call deleted it.

    A job that is not finished, finished later, or is already gone is left alone (False); a
    `prune:finished` entry whose record is gone is dropped. Concurrent callers delete a job once.
    The caller deletes the job's artifacts first (`jobs.retention.sweep`).
    """
    keys = store.keys
    key, ref = keys.job_key(job_id), keys.idemref(job_id)
    with store.r.pipeline() as pipe:
        while True:
            try:
                pipe.watch(key, ref)
                raw = pipe.get(key)
                if raw is None:
                    pipe.unwatch()
                    store.r.zrem(keys.finished_key, job_id)
                    return False
                try:
                    job: Job | UnreadableJob = parse_job(job_id, raw)
                except UnreadableRecord as e:  # its tenant and status are all this needs
                    job = e.info
                score = pipe.zscore(keys.finished_key, job_id)
                if job.status not in TERMINAL or job.tenant is None or score is None or score > before:
                    pipe.unwatch()
                    return False
                idem = pipe.get(ref)
                points = False
                if idem is not None:
                    pipe.watch(idem)
                    value = pipe.get(idem)
                    if isinstance(value, bytes):
                        value = value.decode()
                    points = value is not None and value.split(" ", 1)[0] == job_id
                pipe.multi()
                pipe.delete(key, keys.events(job_id), ref, keys.notice_key(job_id), keys.fan_key(job_id))
                if points:
                    pipe.delete(idem)
                pipe.zrem(keys.idx(job.tenant), job_id)
                for status in JobStatus:  # its own status' index, and any stray entry
                    pipe.zrem(keys.idx(job.tenant, status), job_id)
                pipe.zrem(keys.finished_key, job_id)
                pipe.zrem(keys.outbox_key, job_id)
                pipe.srem(keys.active(job.tenant), job_id)
                pipe.hincrby(keys.counts, job.status.value, -1)  # type: ignore[union-attr]
                pipe.incr(keys.deleted)
                pipe.execute()
                return True
            except redis.WatchError:
                continue
