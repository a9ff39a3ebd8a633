"""Job records in the service's own Redis keys.

The key names and Lua scripts are `jobs.keys`; counters and histograms are read by `jobs.metrics`,
and retention deletes finished jobs (`jobs.retention`).

Every status change is a WATCH/MULTI transaction that also appends a `status` event, so a
concurrent cancel and start can never both win, and the stream and record always agree.

Outbox: `create` records the job in `prune:outbox` and gives it a delivery token (`Job.delivery`) in
the same script; the API sends the task with that token, then `confirm_sent` drops the entry. A job
leaving `queued` leaves the outbox in the same transaction. `jobs.lifecycle.resend_unsent` re-sends
old entries with a fresh token (`reissue`), so a job whose API died before sending it still runs,
once. The job lifecycle built on these transactions (claims, leases, re-queues) is jobs.lifecycle.

Retention: every transition into a terminal status adds the job to `prune:finished` in the same
transaction (`jobs.retention.delete_finished` deletes it later). Leases: `take_lease`, `renew_lease`,
`lease_owner` keep the `prune:lease:<id>` keys and the `prune:leases` deadlines the lifecycle decides on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import redis
from pydantic import ValidationError

from jobs import metrics
from jobs.events import MAXLEN, encode
from jobs.keys import CONFIRM, CREATE, DELETE_IF, PUBLISH, RENEW, Keys
from jobs.spec import (
    ACTIVE,
    HELD,
    TERMINAL,
    UNREADABLE,
    Job,
    JobError,
    JobPage,
    JobProgress,
    JobRequest,
    JobStatus,
    UnreadableJob,
)

IDEMPOTENCY_TTL = 24 * 3600


class JobNotFound(KeyError):
    """No job with this id."""


class UnreadableRecord(Exception):
    """The job's stored record does not parse as a `Job` (edited by hand, or written by another
    version); `info` holds what could be read of it (id, tenant, status) and why."""

    def __init__(self, info: UnreadableJob) -> None:
        super().__init__(info.error.message)
        self.info = info


def _lenient(raw: bytes | str) -> dict[str, Any]:
    """The record as a JSON object, or {} when it is not one."""
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _reason(e: Exception) -> str:
    if isinstance(e, ValidationError) and e.errors():
        err = e.errors()[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "record"
        return f"{where}: {err.get('msg', '')}"[:300]
    return f"not a JSON object ({type(e).__name__})"


def parse_job(job_id: str, raw: bytes | str) -> Job:
    """The stored record as a `Job`; raise UnreadableRecord (with what is readable) otherwise."""
    try:
        return Job.model_validate_json(raw)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        d = _lenient(raw)
        tenant = d.get("tenant") if isinstance(d.get("tenant"), str) else None
        status = d.get("status") if d.get("status") in {s.value for s in JobStatus} else None
        kept = d.get("error") if isinstance(d.get("error"), dict) else {}
        if kept.get("code") == UNREADABLE and isinstance(kept.get("message"), str):
            message = kept["message"]  # rewritten by end_unreadable: the original reason
        else:
            message = f"the stored record of job {job_id} cannot be read ({_reason(e)})"
        error = JobError(code=UNREADABLE, message=message)
        raise UnreadableRecord(UnreadableJob(id=job_id, tenant=tenant, status=status, error=error)) from None


class InvalidTransition(Exception):
    """The job is not in a status the requested change can start from."""

    def __init__(self, job: Job, target: JobStatus) -> None:
        super().__init__(f"job {job.id} is {job.status.value}; cannot move to {target.value}")
        self.job = job
        self.target = target


class Fenced(Exception):
    """A write carried a delivery token that is no longer the job's (or the job is no longer held):
    the job was sent again and another attempt owns it now. Nothing was written."""

    def __init__(self, job_id: str, token: str | None) -> None:
        super().__init__(f"job {job_id}: delivery token {token} is no longer the job's; write refused")
        self.job_id, self.token = job_id, token


class TooManyActiveJobs(Exception):
    """The tenant already has its maximum number of queued or running jobs."""

    def __init__(self, tenant: str, active: int, limit: int) -> None:
        super().__init__(f"tenant {tenant!r} has {active} active jobs (limit {limit})")
        self.tenant, self.active, self.limit = tenant, active, limit


class IdempotencyConflict(Exception):
    """The Idempotency-Key was already used with a different request body."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"Idempotency-Key already used for job {job_id} with a different request body")
        self.job_id = job_id


def now() -> datetime:
    """The current UTC time."""
    return datetime.now(UTC)


_last_us = 0
_id_lock = threading.Lock()


def new_job_id() -> str:
    """A 20-hex-character id that sorts by creation time (µs, strictly increasing per process)."""
    global _last_us
    with _id_lock:
        _last_us = max(time.time_ns() // 1000, _last_us + 1)
        us = _last_us
    return f"{us:014x}{os.urandom(3).hex()}"


def new_delivery_token() -> str:
    """A fresh token for a job's task message (16 hex characters)."""
    return secrets.token_hex(8)


def request_digest(request: JobRequest) -> str:
    """sha256 of the normalised request (field order and defaults do not matter)."""
    canon = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def status_event(previous: JobStatus | None, job: Job, **extra: Any) -> dict[str, Any]:
    """The payload of the `status` event recording `job`'s move from `previous` (the only place it is
    built): status, previous, attempts, and the error (failed) or summary (succeeded)."""
    data: dict[str, Any] = {
        "status": job.status.value,
        "previous": previous.value if previous else None,
        "attempts": job.attempts,
        **extra,
    }
    if job.error is not None and job.status == JobStatus.failed:
        data["error"] = job.error.model_dump()
    if job.summary is not None and job.status == JobStatus.succeeded:
        data["summary"] = job.summary.model_dump()
    return data


Extra = Callable[[Any], None]
Change = tuple[Job, list[tuple[str, dict[str, Any]]]]
Mutation = Callable[[Job], "Change | tuple[Job, list[tuple[str, dict[str, Any]]], Extra] | None"]


class JobStore:
    """CRUD and atomic status transitions of job records."""

    def __init__(self, client: redis.Redis, prefix: str = "prune") -> None:
        self.r = client
        self.prefix = prefix
        self.keys = Keys(prefix)
        self._create = client.register_script(CREATE)
        self._confirm = client.register_script(CONFIRM)
        self._delete_if = client.register_script(DELETE_IF)
        self._renew = client.register_script(RENEW)
        self._publish = client.register_script(PUBLISH)

    # reads
    def ping(self) -> None:
        """Raise redis.RedisError if Redis is unreachable."""
        self.r.ping()

    def get(self, job_id: str) -> Job | None:
        """The job record, or None; raise UnreadableRecord when it does not parse."""
        raw = self.r.get(self.keys.job_key(job_id))
        return parse_job(job_id, raw) if raw is not None else None

    def status_of(self, job_id: str) -> JobStatus | None:
        """The job's status read leniently from its record (no validation: cheap, and works for an
        unreadable record); None when the job is gone or its status cannot be read."""
        raw = self.r.get(self.keys.job_key(job_id))
        status = _lenient(raw).get("status") if raw is not None else None
        return JobStatus(status) if status in {s.value for s in JobStatus} else None

    def owns(self, tenant: str, job_id: str) -> bool:
        """Whether the job is in the tenant's index (ownership without reading the record)."""
        return self.r.zscore(self.keys.idx(tenant), job_id) is not None

    def _indexed_status(self, tenant: str, job_id: str) -> JobStatus | None:
        with self.r.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.zscore(self.keys.idx(tenant, status), job_id)
            found = pipe.execute()
        return next((s for s, score in zip(JobStatus, found, strict=True) if score is not None), None)

    def require(self, job_id: str) -> Job:
        """The job record; raise JobNotFound."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def list(
        self, tenant: str, after: str | None = None, limit: int = 20, status: JobStatus | None = None
    ) -> JobPage:
        """Newest first; `after` is the last id of the previous page."""
        ids = self.r.zrevrangebylex(
            self.keys.idx(tenant, status), "(" + after if after else "+", "-", start=0, num=limit + 1
        )
        ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
        more = len(ids) > limit
        ids = ids[:limit]
        raws = self.r.mget([self.keys.job_key(i) for i in ids]) if ids else []
        items, unreadable = [], []
        for job_id, raw in zip(ids, raws, strict=True):
            if raw is None:
                continue
            try:
                items.append(parse_job(job_id, raw))
            except UnreadableRecord as e:  # one bad record must not hide the tenant's other jobs
                unreadable.append(e.info.model_copy(update={"tenant": tenant}))
        return JobPage(items=items, unreadable=unreadable, next=ids[-1] if more and ids else None)

    def outbox(self, before: float = math.inf, limit: int = 500) -> list[tuple[str, float]]:
        """(job id, score) of outbox entries with a score up to `before`, oldest first."""
        return self._up_to(self.keys.outbox_key, before, limit)

    def leases(self, before: float = math.inf, limit: int = 500) -> list[tuple[str, float]]:
        """(job id, lease deadline) of held jobs whose lease expires up to `before`, oldest first."""
        return self._up_to(self.keys.leases_key, before, limit)

    def finished(self, before: float = math.inf, limit: int = 500) -> list[tuple[str, float]]:
        """(job id, finish time) of jobs that finished up to `before` (Unix time), oldest first."""
        return self._up_to(self.keys.finished_key, before, limit)

    def _up_to(self, key: str, before: float, limit: int) -> list[tuple[str, float]]:
        rows = self.r.zrangebyscore(key, "-inf", before, start=0, num=limit, withscores=True)
        return [(k.decode() if isinstance(k, bytes) else k, float(v)) for k, v in rows]

    def active_count(self, tenant: str) -> int:
        """The tenant's queued, running and cancelling jobs."""
        return int(self.r.scard(self.keys.active(tenant)))

    # writes
    def create(
        self,
        tenant: str,
        request: JobRequest,
        idempotency_key: str | None = None,
        ttl: int = IDEMPOTENCY_TTL,
        *,
        max_active: int | None = None,
        sources: dict[str, str] | None = None,
    ) -> tuple[Job, bool]:
        """Create a queued job; with an idempotency key, return (existing job, False) on a retry.

        `max_active` caps the tenant's queued + running jobs, counted atomically with the insert
        (an idempotent replay is answered even at the cap). `sources` are the checked locations the
        worker loads. Raises IdempotencyConflict (key reused with another body) or TooManyActiveJobs.
        """
        digest = request_digest(request)
        job = Job(
            id=new_job_id(),
            tenant=tenant,
            status=JobStatus.queued,
            request=request,
            created_at=now(),
            sources=sources or {},
            delivery=new_delivery_token(),
        )
        keys = [
            self.keys.idem(tenant, idempotency_key or ""),
            self.keys.job_key(job.id),
            self.keys.idx(tenant),
            self.keys.idx(tenant, JobStatus.queued),
            self.keys.counts,
            self.keys.events(job.id),
            self.keys.active(tenant),
            self.keys.outbox_key,
            self.keys.idemref(job.id),
        ]
        event = encode("status", status_event(None, job))["data"]
        idem = "1" if idempotency_key else "0"
        args = [job.id, job.model_dump_json(), digest, ttl, idem, event, MAXLEN, max_active or 0]
        while True:
            created, value = self._create(keys=keys, args=[*args, time.time()])
            if created == 2:
                if self.release_unreadable(tenant):  # unreadable records no longer hold the quota
                    continue
                raise TooManyActiveJobs(tenant, int(value), int(max_active or 0))
            if created:
                return job, True
            value = value.decode() if isinstance(value, bytes) else value
            existing_id, existing_digest = value.split(" ")
            if existing_digest != digest:
                raise IdempotencyConflict(existing_id)
            existing = self.get(existing_id)
            if existing is not None:
                return existing, False
            # the key outlived its job (deleted by retention meanwhile): drop it and create anew
            self._delete_if(keys=[keys[0]], args=[value])

    def confirm_sent(self, job_id: str, token: str | None) -> bool:
        """The task message carrying `token` was sent: drop the job's outbox entry, unless the record
        already carries another token (a sweeper re-sent it meanwhile and confirms its own send)."""
        keys = [self.keys.job_key(job_id), self.keys.outbox_key]
        return bool(self._confirm(keys=keys, args=[job_id, token or ""]))

    def reissue(self, job_id: str, before: float) -> str | None:
        """Give a queued job whose outbox entry is not newer than `before` a new delivery token, and
        move the entry to now, in one transaction; return the token (send it, then `confirm_sent`).

        None when the entry is newer or gone (another sweeper handled it) or the job is no longer
        queued or no longer exists; the entry of such a job is dropped.
        """
        token = new_delivery_token()

        def fn(job: Job) -> tuple[Job, list[tuple[str, dict[str, Any]]]] | None:
            # a sweeper moves the entry only together with the (watched) record, so two sweepers
            # cannot both re-send it; a confirm_sent landing meanwhile costs one superseded message
            score = self.r.zscore(self.keys.outbox_key, job_id)
            if job.status != JobStatus.queued or score is None or score > before:
                return None
            message = "re-enqueued: the first task message was never confirmed sent"
            return job.model_copy(update={"delivery": token}), [("log", {"message": message})]

        try:
            job, changed = self.mutate(
                job_id, fn, extra=lambda pipe: pipe.zadd(self.keys.outbox_key, {job_id: time.time()})
            )
        except JobNotFound:
            self.r.zrem(self.keys.outbox_key, job_id)
            return None
        if not changed and job.status != JobStatus.queued:  # a job never becomes queued again
            self.r.zrem(self.keys.outbox_key, job_id)
        return token if changed else None

    def mutate(
        self, job_id: str, fn: Mutation, *, extra: Extra | None = None, watch: Iterable[str] = ()
    ) -> tuple[Job, bool]:
        """Apply `fn` to the record atomically (optimistic WATCH/MULTI, retried on conflicts).

        `fn` returns None to leave the job as is, or (new job, events to append[, extra of this change]).
        `extra(pipe)` (and the one `fn` returned) add commands to the same transaction when the job
        changes. `watch`: other keys `fn` reads, whose
        change meanwhile retries the whole step too. Returns the resulting job and whether it changed.
        """
        key = self.keys.job_key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key, *watch)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    old = parse_job(job_id, raw)
                    result = fn(old)
                    if result is None:
                        pipe.unwatch()
                        return old, False
                    new, events, *more = result
                    pipe.multi()
                    pipe.set(key, new.model_dump_json())
                    if new.status != old.status:
                        self._reindex(pipe, old, new)
                    for add in [extra, *more]:
                        if add is not None:
                            add(pipe)
                    for type_, data in events:
                        pipe.xadd(
                            self.keys.events(job_id),
                            encode(type_, data),
                            maxlen=MAXLEN,
                            approximate=True,
                        )
                    pipe.execute()
                    return new, True
                except redis.WatchError:
                    continue

    def _reindex(self, pipe: Any, old: Job, new: Job) -> None:
        self._move(pipe, new.id, new.tenant, old.status, new.status, new.finished_at or now())
        if new.status in TERMINAL and new.started_at and new.finished_at:
            metrics.record_duration(pipe, self.keys, (new.finished_at - new.started_at).total_seconds())

    def _move(
        self, pipe: Any, job_id: str, tenant: str, old: JobStatus, new: JobStatus, finished_at: datetime
    ) -> None:
        """Index, count, outbox, lease and quota changes of a status change (in `pipe`'s transaction)."""
        pipe.zrem(self.keys.idx(tenant, old), job_id)
        pipe.zadd(self.keys.idx(tenant, new), {job_id: 0})
        pipe.hincrby(self.keys.counts, old.value, -1)
        pipe.hincrby(self.keys.counts, new.value, 1)
        if old == JobStatus.queued:  # claimed, cancelled or failed: never to be re-sent
            pipe.zrem(self.keys.outbox_key, job_id)
        if old in HELD and new not in HELD:  # finished or re-queued: nobody holds it
            pipe.delete(self.keys.lease_key(job_id))
            pipe.zrem(self.keys.leases_key, job_id)
        if new in ACTIVE:
            pipe.sadd(self.keys.active(tenant), job_id)
        else:
            pipe.srem(self.keys.active(tenant), job_id)
        if new in TERMINAL:  # retention deletes it once it is older than the cutoff
            pipe.zadd(self.keys.finished_key, {job_id: finished_at.timestamp()})

    def end_unreadable(
        self, job_id: str, to: JobStatus = JobStatus.failed, tenant: str | None = None
    ) -> tuple[UnreadableJob, bool] | None:
        """Move a job whose record does not parse to `to` (failed or cancelled), in one WATCH/MULTI
        transaction: its indexes, quota, outbox and lease change as for any job, a `status` event
        records why, and the record keeps its unreadable content with the new status and an
        `unreadable_record` error holding the original reason. Its status is taken from the tenant's
        indexes (`tenant` when the record does not name one).

        None when the record parses (use the ordinary transitions); else (what is known of it,
        whether this call changed it). Raises JobNotFound."""
        key = self.keys.job_key(job_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(job_id)
                    try:
                        parse_job(job_id, raw)
                        pipe.unwatch()
                        return None
                    except UnreadableRecord as e:
                        info = e.info
                    tenant = info.tenant or tenant
                    old = self._indexed_status(tenant, job_id) if tenant else None
                    old = old or info.status
                    if tenant is None or old is None or old in TERMINAL:
                        pipe.unwatch()
                        return info.model_copy(update={"tenant": tenant, "status": old}), False
                    finished = now()
                    record = _lenient(raw) or {"id": job_id, "tenant": tenant, "unreadable": str(raw)[:2000]}
                    record.update(status=to.value, finished_at=finished.isoformat())
                    event = {"status": to.value, "previous": old.value, "reason": UNREADABLE}
                    record["error"] = info.error.model_dump()  # why, for every later read
                    if to == JobStatus.failed:
                        event["error"] = record["error"]
                    pipe.multi()
                    pipe.set(key, json.dumps(record))
                    self._move(pipe, job_id, tenant, old, to, finished)
                    pipe.xadd(
                        self.keys.events(job_id),
                        encode("status", event),
                        maxlen=MAXLEN,
                        approximate=True,
                    )
                    pipe.execute()
                    return info.model_copy(update={"tenant": tenant, "status": to}), True
                except redis.WatchError:
                    continue

    def release_unreadable(self, tenant: str) -> int:
        """Fail the tenant's active jobs whose record does not parse (they would hold its quota for
        good); the number failed. Called when the tenant is at its active-job limit."""
        n = 0
        for member in self.r.smembers(self.keys.active(tenant)):
            job_id = member.decode() if isinstance(member, bytes) else member
            raw = self.r.get(self.keys.job_key(job_id))
            try:
                if raw is not None:
                    parse_job(job_id, raw)
            except UnreadableRecord:
                with contextlib.suppress(JobNotFound):
                    done = self.end_unreadable(job_id, JobStatus.failed, tenant)
                    n += bool(done and done[1])
        return n

    def transition(
        self,
        job_id: str,
        allowed: Iterable[JobStatus],
        to: JobStatus,
        *,
        token: str | None = None,
        **changes: Any,
    ) -> Job:
        """Move the job to `to` if its status is in `allowed`; raise InvalidTransition otherwise.

        `token`: only while the record still carries this delivery token (else Fenced, nothing
        written). `changes` are other record fields to set; terminal statuses stamp `finished_at`.
        """
        allowed = frozenset(allowed)

        def fn(job: Job) -> tuple[Job, list[tuple[str, dict[str, Any]]]]:
            if token is not None and job.delivery != token:
                raise Fenced(job_id, token)
            if job.status not in allowed:
                raise InvalidTransition(job, to)
            update = dict(changes)
            if to in TERMINAL:
                update.setdefault("finished_at", now())
            new = job.model_copy(update={"status": to, **update})
            return new, [("status", status_event(job.status, new))]

        return self.mutate(job_id, fn)[0]

    def set_progress(self, job_id: str, progress: JobProgress, token: str | None = None) -> bool:
        """Record progress of a running (or cancelling) job and append a progress event.

        With `token`: raise Fenced (nothing written) unless the job is held under that delivery token.
        Without: False when the job is not held."""

        def fn(job: Job) -> tuple[Job, list[tuple[str, dict[str, Any]]]] | None:
            if token is not None and (job.delivery != token or job.status not in HELD):
                raise Fenced(job_id, token)
            if job.status not in HELD:
                return None
            return job.model_copy(update={"progress": progress}), [("progress", progress.model_dump())]

        return self.mutate(job_id, fn)[1]

    # leases, notices and held writes (the lifecycle decides when; these are the Redis side)
    def lease_owner(self, job_id: str) -> str | None:
        """Id of the worker whose lease on the job is live, or None."""
        owner = self.r.get(self.keys.lease_key(job_id))
        return owner.decode() if isinstance(owner, bytes) else owner

    def lease_live(self, job_id: str) -> bool:
        """Whether a worker's lease on the job is live."""
        return bool(self.r.exists(self.keys.lease_key(job_id)))

    def forget_lease(self, job_id: str) -> None:
        """Drop the job's entry from the lease deadlines (it is no longer held, or gone)."""
        self.r.zrem(self.keys.leases_key, job_id)

    def take_lease(self, pipe: Any, job_id: str, worker: str, lease_s: float) -> None:
        """In `pipe`'s transaction: `worker` holds the job's lease for `lease_s` seconds."""
        pipe.set(self.keys.lease_key(job_id), worker, px=int(lease_s * 1000))
        pipe.zadd(self.keys.leases_key, {job_id: time.time() + lease_s})

    def renew_lease(self, job_id: str, token: str, worker: str, lease_s: float) -> bool:
        """Extend `worker`'s lease by `lease_s` seconds while the job is held under `token`; False
        (nothing written) otherwise."""
        keys = [self.keys.job_key(job_id), self.keys.lease_key(job_id), self.keys.leases_key]
        args = [token, worker, int(lease_s * 1000), time.time() + lease_s, job_id]
        return bool(self._renew(keys=keys, args=args))

    def add_to_outbox(self, pipe: Any, job_id: str) -> None:
        """In `pipe`'s transaction: record the (re-queued) job in the outbox as of now."""
        pipe.zadd(self.keys.outbox_key, {job_id: time.time()})

    def publish_held(self, job_id: str, token: str, type_: str, data: dict[str, Any]) -> str | None:
        """Append an event while the job is held under `token`; its id, or None (nothing appended)."""
        keys = [self.keys.job_key(job_id), self.keys.events(job_id)]
        eid = self._publish(keys=keys, args=[token, MAXLEN, type_, encode(type_, data)["data"]])
        if eid is None:
            return None
        return eid.decode() if isinstance(eid, bytes) else str(eid)

    # sweeps fanned out over workers (jobs.lifecycle decides; these are the Redis side)
    def add_variant_jobs(self, pipe: Any, parent: str, children: list[Job]) -> None:
        """In `pipe`'s transaction: create the queued variant jobs of sweep `parent` (records,
        indexes, quota set, outbox, first event), drop the sweep's lease (no worker holds it while
        its variants run) and list it among the fan-outs."""
        for child in children:
            pipe.set(self.keys.job_key(child.id), child.model_dump_json())
            pipe.zadd(self.keys.idx(child.tenant), {child.id: 0})
            pipe.zadd(self.keys.idx(child.tenant, JobStatus.queued), {child.id: 0})
            pipe.hincrby(self.keys.counts, JobStatus.queued.value, 1)
            pipe.sadd(self.keys.active(child.tenant), child.id)
            pipe.zadd(self.keys.outbox_key, {child.id: time.time()})
            event = encode("status", status_event(None, child, sweep=parent))
            pipe.xadd(self.keys.events(child.id), event, maxlen=MAXLEN, approximate=True)
        pipe.delete(self.keys.lease_key(parent))
        pipe.zrem(self.keys.leases_key, parent)
        pipe.sadd(self.keys.fanouts_key, parent)

    def fanouts(self) -> list[str]:
        """The sweep jobs fanned out and not yet finished."""
        members = self.r.smembers(self.keys.fanouts_key)
        return sorted(m.decode() if isinstance(m, bytes) else m for m in members)

    def drop_fanout(self, pipe: Any, parent: str, *, data: bool) -> None:
        """In `pipe`: the sweep is no longer watched (finished); `data` also drops its variant hash."""
        pipe.srem(self.keys.fanouts_key, parent)
        if data:
            pipe.delete(self.keys.fan_key(parent))

    def statuses(self, job_ids: list[str]) -> dict[str, JobStatus | None]:
        """Each job's status read leniently (None: gone or unreadable), in one round trip."""
        raws = self.r.mget([self.keys.job_key(i) for i in job_ids]) if job_ids else []
        out: dict[str, JobStatus | None] = {}
        for job_id, raw in zip(job_ids, raws, strict=True):
            status = _lenient(raw).get("status") if raw is not None else None
            out[job_id] = JobStatus(status) if status in {s.value for s in JobStatus} else None
        return out

    def fan_progress(self, parent: str, label: str, fraction: float, labels: list[str]) -> float:
        """Record a variant job's fraction done; the sweep's overall fraction (mean over `labels`)."""
        key = self.keys.fan_key(parent)
        with self.r.pipeline() as pipe:
            pipe.hset(key, f"p:{label}", fraction)
            pipe.hmget(key, [f"p:{x}" for x in labels])
            _, values = pipe.execute()
        return sum(float(v) for v in values if v is not None) / max(len(labels), 1)

    def put_variant_report(self, parent: str, label: str, report_json: str) -> None:
        """Keep a succeeded variant's report for the sweep's gather step."""
        self.r.hset(self.keys.fan_key(parent), f"r:{label}", report_json)

    def variant_reports(self, parent: str, labels: list[str]) -> dict[str, str]:
        """The reports stored for `labels` (a missing one is absent)."""
        values = self.r.hmget(self.keys.fan_key(parent), [f"r:{x}" for x in labels])
        pairs = zip(labels, values, strict=True)
        return {x: v.decode() if isinstance(v, bytes) else v for x, v in pairs if v}

    def mark_notice(self, job_id: str, holder: str, ttl_s: float) -> bool:
        """Set the job's completion-webhook marker unless it is set (SET NX); whether this call set it."""
        return bool(self.r.set(self.keys.notice_key(job_id), holder, nx=True, px=int(ttl_s * 1000)))
