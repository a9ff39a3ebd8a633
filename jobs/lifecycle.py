"""The job lifecycle: every status change of a job and who makes it, in one place.

```
            submit                claim                       finish
  (none) ──────────► queued ─────────────► running ───────────────────► succeeded | failed
                      │  ▲                  │   │ ▲
               cancel │  └── requeue ───────┘   │ └ claim again (its pool child died; same worker)
                      ▼     (lease expired,     │ cancel
                  cancelled  upload failed)     ▼        finish
                                            cancelling ────────► cancelled
```

- The API (`api/routes.py`) calls `submit` and `cancel`; every API process runs `sweep_leases` and
  `resend_unsent` in the background (`api/maintenance.py`).
- The worker (`worker/runner.py`) calls `claim`, holds a `Lease` while it runs the job, writes through
  `progress` / `publish` / `finish`, and calls `give_back` when its upload failed. Its main process
  asks `unrunnable` before handing a message to a pool process (`worker/tasks.py`); whoever sends a
  job's completion webhook first takes it with `take_notice` (once per job). Its work-dir sweep
  (`worker/workdirs.py`) asks `stale_work` which scratch dirs can go.

Delivery tokens fence every attempt. `Job.delivery` is the token of the job's current task message:
`submit` sets it, and every re-send (`resend_unsent`, `sweep_leases`, `give_back`) replaces it in the
same transaction that re-queues the job. A worker's message carries the token it was sent with, and
every write the worker makes (progress, events, status, the artifact upload check) names that token;
a write under a token that is no longer the record's raises `Fenced` and changes nothing. So a worker
that lost its job (a zombie: paused, partitioned, or just slow to notice) cannot touch it any more.

Leases. A worker holding a job (running or cancelling) keeps `prune:lease:<id>` alive: it holds the
worker's id and expires `lease_expire_s` after the last renewal (`renew`, every `lease_renew_s`,
refused once the token is stale). `prune:leases` indexes the deadlines. `sweep_leases` takes every job
whose lease key is gone: a cancelling one becomes cancelled, one that already used its attempts fails
(`worker_lost`), any other goes back to queued with a new token and is sent again (through the outbox,
so an API dying meanwhile loses nothing). The broker's visibility timeout remains as a last resort:
a message it redelivers is dropped while another live worker holds the job's lease.

The Redis side of each step (keys, scripts, transactions) is `jobs.store` over `jobs.keys`; this
module only decides. Counters and the workers' heartbeats are `jobs.metrics`.

Outbox. `submit` creates the record and its `prune:outbox` entry in one script, sends the task, then
drops the entry (`JobStore.confirm_sent`); `resend_unsent` re-sends entries older than an age with a
fresh token (`JobStore.reissue`), so a job whose API died between the two writes still runs, once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import redis

from jobs import metrics
from jobs.settings import Settings
from jobs.spec import HELD, TERMINAL, FanOut, Job, JobError, JobProgress, JobRequest, JobStatus
from jobs.store import (
    Fenced,
    InvalidTransition,
    JobNotFound,
    JobStore,
    Mutation,
    UnreadableRecord,
    new_delivery_token,
    new_job_id,
    now,
    status_event,
)

__all__ = [
    "CancelConflict",
    "Fenced",
    "HeldElsewhere",
    "JobFinished",
    "Lease",
    "QueueUnavailable",
    "Superseded",
    "cancel",
    "claim",
    "fan_check",
    "fan_done",
    "fan_out",
    "finish",
    "give_back",
    "progress",
    "publish",
    "renew",
    "resend_unsent",
    "stale_work",
    "submit",
    "sweep_fanouts",
    "sweep_leases",
    "sweep_stopped",
    "take_notice",
    "unrunnable",
    "variant_progress",
    "variant_tenant",
    "worker_id",
]

log = logging.getLogger("jobs.lifecycle")
Events = list[tuple[str, dict[str, Any]]]


class Sender(Protocol):
    """What the lifecycle needs of `jobs.queue.Queue`."""

    def enqueue(self, job_id: str, token: str | None = None, countdown: float | None = None) -> None: ...


class QueueUnavailable(Exception):
    """The task could not be sent; the job was marked failed (`queue_unavailable`)."""


class JobFinished(Exception):
    """Cancel of a job that already finished."""

    def __init__(self, job: Job) -> None:
        super().__init__(f"job {job.id} is already {job.status.value}")
        self.job = job


class CancelConflict(Exception):
    """The job changed status too often during a cancel; the caller may retry."""


class Superseded(Exception):
    """The message carries a delivery token the job no longer has: the job was sent again."""


class HeldElsewhere(Exception):
    """Another live worker holds the job's lease (a broker redelivery of a job still running)."""


def worker_id() -> str:
    """This worker's id (the one place it is derived): PRUNE_WORKER_ID (the worker's main process
    sets it to its own id for its pool children, so a job whose pool child died is claimed again by
    the same worker at once), else host:pid."""
    return Settings.from_env().worker_id or f"{socket.gethostname()}:{os.getpid()}"


def _lost(attempts: int) -> JobError:
    return JobError(code="worker_lost", message=f"worker died {attempts} times while running this job")


def _requeued(job: Job, message: str) -> Job:
    """`job` back in the queue under a new delivery token."""
    return job.model_copy(
        update={
            "status": JobStatus.queued,
            "delivery": new_delivery_token(),
            "progress": JobProgress(message=message),
        }
    )


# ---- API side -------------------------------------------------------------------------------------


def submit(
    store: JobStore,
    queue: Sender,
    tenant: str,
    request: JobRequest,
    idempotency_key: str | None = None,
    *,
    max_active: int | None = None,
    sources: dict[str, str] | None = None,
) -> tuple[Job, bool]:
    """Create the job (with its outbox entry), send its task, confirm the send; (job, created).

    An idempotent replay returns (existing job, False) and sends nothing. Raises the store's
    IdempotencyConflict / TooManyActiveJobs, or QueueUnavailable (the job is then failed). A confirm
    that fails after the send only costs a superseded message (`resend_unsent` sends it again).
    """
    job, created = store.create(tenant, request, idempotency_key, max_active=max_active, sources=sources)
    if not created:
        return job, False
    try:
        queue.enqueue(job.id, job.delivery)
    except Exception as e:
        log.exception("enqueue failed for job %s", job.id)
        err = JobError(code="queue_unavailable", message="the job queue is unavailable")
        store.transition(job.id, [JobStatus.queued], JobStatus.failed, error=err)
        raise QueueUnavailable(f"could not queue the job: {type(e).__name__}") from None
    try:
        store.confirm_sent(job.id, job.delivery)
    except Exception as e:
        log.warning("job %s: sent but not confirmed (%s)", job.id, e)
    return job, True


def cancel(store: JobStore, job_id: str, tries: int = 5) -> Job:
    """A queued job is cancelled at once (it never starts); a running one becomes cancelling and its
    worker stops at the next block boundary; a cancelling one is returned as is. Raises JobFinished,
    JobNotFound (deleted meanwhile) or CancelConflict."""
    job = store.require(job_id)
    for _ in range(tries):
        try:
            if job.status == JobStatus.queued:
                return store.transition(job_id, [JobStatus.queued], JobStatus.cancelled)
            if job.status == JobStatus.running:
                job = store.transition(job_id, [JobStatus.running], JobStatus.cancelling)
                if job.fanout is not None:  # its variants still queued never start
                    _stop_queued(store, job.fanout.variants)
                return job
            if job.status == JobStatus.cancelling:
                return job
            raise JobFinished(job)
        except InvalidTransition as e:  # it moved meanwhile (e.g. started): retry on its new status
            job = e.job
    raise CancelConflict(f"job {job_id} changed too often; retry")


def end_unreadable(store: JobStore, job_id: str, to: JobStatus = JobStatus.failed) -> None:
    """Fail (or cancel) a job whose stored record does not parse, once, with a clear reason in its
    record and event stream (`store.end_unreadable`); a job already gone or finished is left alone."""
    try:
        done = store.end_unreadable(job_id, to)
    except JobNotFound:
        return
    if done is not None and done[1]:
        log.error("job %s: %s; %s", job_id, done[0].error.message, to.value)


def resend_unsent(store: JobStore, queue: Sender, older_than_s: float) -> list[str]:
    """Re-send every queued job whose outbox entry is older than `older_than_s` (new token each);
    drop entries of jobs no longer queued. A failed send stops the sweep (its entry stays, its age
    restarted). Returns the ids sent."""
    before = time.time() - older_than_s
    sent: list[str] = []
    for job_id, _ in store.outbox(before):
        try:
            token = store.reissue(job_id, before)
        except UnreadableRecord:
            end_unreadable(store, job_id)
            continue
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


def sweep_leases(
    store: JobStore, queue: Sender, cap: int, on_finished: Callable[[Job], None] | None = None
) -> list[str]:
    """Act on every held job whose lease expired (its worker stopped renewing it): re-queue it with a
    new token and send it (attempts left), fail it (`worker_lost`, attempts used) or finish a
    cancelling one as cancelled. `on_finished(job)` cleans up after the last two (artifacts), and
    a job with a webhook gets a message that makes a worker send its completion webhook.
    Safe in any number of API processes at once: each job is taken by one transaction. Returns the
    ids of the jobs re-queued."""
    requeued: list[str] = []
    for job_id, _ in store.leases(time.time()):
        lease = store.keys.lease_key(job_id)

        def fn(job: Job, job_id: str = job_id) -> tuple[Job, Events] | None:
            if job.status not in HELD or store.lease_live(job_id):
                return None  # finished, or renewed meanwhile
            if job.status == JobStatus.cancelling:
                new = job.model_copy(update={"status": JobStatus.cancelled, "finished_at": now()})
            elif job.attempts >= cap:
                new = job.model_copy(
                    update={"status": JobStatus.failed, "finished_at": now(), "error": _lost(job.attempts)}
                )
            else:
                new = _requeued(job, "re-queued: its worker stopped renewing the lease")
            return new, [("status", status_event(job.status, new, reason="lease_expired"))]

        try:
            job, changed = store.mutate(job_id, _outboxed(store, fn, "leases_expired"), watch=[lease])
        except JobNotFound:
            store.forget_lease(job_id)
            continue
        except UnreadableRecord:
            end_unreadable(store, job_id)
            store.forget_lease(job_id)
            continue
        if not changed:
            if job.status not in HELD:
                store.forget_lease(job_id)
            continue
        log.warning("job %s: lease expired (attempt %d); now %s", job_id, job.attempts, job.status.value)
        if job.status == JobStatus.queued:
            _send(store, queue, job)
            requeued.append(job_id)
        else:
            if on_finished is not None:
                on_finished(job)
            if job.request.webhook is not None:
                _send_notice(queue, job)
    return requeued


def _send_notice(queue: Sender, job: Job) -> None:
    """Send one more task message for a job the sweeper finished, so that its completion webhook
    goes out: a worker's main process finds the job finished and sends `job.failed|cancelled`
    (once per job: `take_notice`) instead of running it. A failed send is logged only."""
    try:
        queue.enqueue(job.id, job.delivery)
    except Exception as e:
        log.warning("job %s: completion notice not sent (%s)", job.id, e)


def _outboxed(store: JobStore, fn: Mutation, counter: str) -> Mutation:
    """`fn` as a mutation that also counts `counter` and, when the job ends up queued, counts a
    re-queue and records the job in the outbox in the same transaction (`_send` drops the entry once
    the message is sent; `resend_unsent` sends it if that never happens)."""

    def step(job: Job) -> tuple[Job, Events] | None:
        result = fn(job)
        if result is None:
            return None
        new, events = result

        def extra(pipe: Any) -> None:
            metrics.count_lifecycle(pipe, store.keys, counter)
            if new.status == JobStatus.queued:
                metrics.count_lifecycle(pipe, store.keys, "requeued")
                store.add_to_outbox(pipe, new.id)

        return new, events, extra

    return step


def _send(store: JobStore, queue: Sender, job: Job, countdown: float | None = None) -> None:
    """Send a re-queued job's task; on failure its outbox entry makes `resend_unsent` send it."""
    try:
        queue.enqueue(job.id, job.delivery, countdown=countdown)
    except Exception as e:
        log.warning("job %s: re-queued but not sent (%s); the outbox sweeper sends it", job.id, e)
        return
    store.confirm_sent(job.id, job.delivery)


# ---- worker side ----------------------------------------------------------------------------------


def unrunnable(store: JobStore, job_id: str, token: str | None) -> str | None:
    """Why a task message cannot run its job, decided from the record alone (the worker's main
    process asks this before using a pool process): `missing`, `superseded` (older token) or the
    job's terminal status; None when a pool process must look at it (`claim` decides)."""
    try:
        job = store.get(job_id)
    except UnreadableRecord:
        end_unreadable(store, job_id)
        return "unreadable"
    if job is None:
        return "missing"
    if token is not None and token != job.delivery:
        return "superseded"
    if job.status in TERMINAL:
        return job.status.value
    return None


NOTICE_TTL_S = 7 * 24 * 3600.0
"""How long the completion-webhook marker outlives its sender (redeliveries come within hours)."""


def take_notice(store: JobStore, job_id: str, ttl_s: float = NOTICE_TTL_S) -> bool:
    """Whether the caller sends the finished job's completion webhook: True for the first caller only
    (a SET NX marker). The worker's main process (a job cancelled while queued: its message is
    dropped there) and a pool process (an attempt that finished, or a message the main process
    handed on) both ask, so a job's `job.succeeded|failed|cancelled` goes out once however many of
    its messages arrive."""
    return store.mark_notice(job_id, worker_id(), ttl_s)


def host_of(worker: str) -> str:
    """The host part of a worker id (`host:pid` → `host`; an id without `:` is its own host)."""
    return worker.rsplit(":", 1)[0]


def stale_work(store: JobStore, job_id: str, worker: str) -> str | None:
    """Why the work dir a host keeps for the job (resume checkpoints, a kept export) can go: `missing`
    (deleted or never known), the job's terminal status, or `held by <owner>` (an attempt on another
    host holds its lease). None keeps it: a queued job (re-queued from this host, it may come back
    here and resume), a job held by `worker` or another worker of the same host (the same dir), or a
    held job without a live lease (the lease sweeper re-queues it)."""
    try:
        job = store.get(job_id)
    except UnreadableRecord as e:  # a worker fails it on delivery; until then keep its dir
        return e.info.status.value if e.info.status in TERMINAL else None  # type: ignore[union-attr]
    if job is None:
        return "missing"
    if job.status in TERMINAL:
        return job.status.value
    if job.status in HELD:
        owner = store.lease_owner(job_id)
        if owner is not None and host_of(owner) != host_of(worker):
            return f"held by {owner}"
    return None


def claim(store: JobStore, job_id: str, token: str | None, *, worker: str, cap: int, lease_s: float) -> Job:
    """Atomically take the job for `worker`: queued → running (counting the attempt) with a lease of
    `lease_s` seconds, or to its final status; the resulting record is returned.

    A held job whose message is delivered again (its pool child died, the broker redelivered) is
    claimed again by the same worker, or once its lease expired; a cancelling one becomes cancelled,
    and one that used `cap` attempts fails. Raises Superseded (older token; a message without one
    is accepted) or HeldElsewhere (another live worker holds the lease), changing nothing.
    """

    def take(pipe: Any) -> None:
        store.take_lease(pipe, job_id, worker, lease_s)

    def fn(job: Job) -> tuple[Job, Events] | tuple[Job, Events, Callable[[Any], None]] | None:
        if token is not None and token != job.delivery:
            raise Superseded(job_id)
        if job.status in TERMINAL:
            return None  # e.g. cancelled while queued: skip, the task is acked
        if job.status in HELD:
            owner = store.lease_owner(job_id)
            if owner is not None and owner != worker:
                raise HeldElsewhere(f"job {job_id} is held by live worker {owner}")
        if job.status == JobStatus.cancelling:  # its worker died after a cancel request
            new = job.model_copy(update={"status": JobStatus.cancelled, "finished_at": now()})
            return new, [("status", status_event(job.status, new))]
        if job.attempts >= cap:
            update = {"status": JobStatus.failed, "finished_at": now(), "error": _lost(job.attempts)}
            new = job.model_copy(update=update)
            return new, [("status", status_event(job.status, new))]
        new = job.model_copy(
            update={
                "status": JobStatus.running,
                "attempts": job.attempts + 1,
                "started_at": now(),
                "progress": JobProgress(stage="loading", message="starting"),
            }
        )
        return new, [("status", status_event(job.status, new, worker=worker))], take

    return store.mutate(job_id, fn, watch=[store.keys.lease_key(job_id)])[0]


def renew(store: JobStore, job_id: str, token: str, worker: str, lease_s: float) -> bool:
    """Extend `worker`'s lease on the job by `lease_s` seconds; False (nothing written) when the job
    is no longer held under `token`."""
    return store.renew_lease(job_id, token, worker, lease_s)


def publish(store: JobStore, job_id: str, token: str, type_: str, data: dict[str, Any]) -> str:
    """Append an event for the job held under `token`; raise Fenced (nothing appended) otherwise."""
    eid = store.publish_held(job_id, token, type_, data)
    if eid is None:
        raise Fenced(job_id, token)
    return eid


def check_held(store: JobStore, job_id: str, token: str) -> Job:
    """The record while the job is held under `token` (before writing artifacts); raise Fenced."""
    job = store.require(job_id)
    if job.delivery != token or job.status not in HELD:
        raise Fenced(job_id, token)
    return job


def progress(store: JobStore, job_id: str, token: str, prog: JobProgress) -> None:
    """Record progress of the job held under `token` (with its event); raise Fenced otherwise."""
    store.set_progress(job_id, prog, token=token)


def finish(store: JobStore, job_id: str, token: str, to: JobStatus, **changes: Any) -> Job:
    """End the attempt held under `token`: succeeded (from running only), failed or cancelled (from
    running or cancelling). Raises Fenced (another attempt owns the job) or InvalidTransition (e.g.
    succeeded while a cancel was requested)."""
    allowed = [JobStatus.running] if to == JobStatus.succeeded else list(HELD)
    return store.transition(job_id, allowed, to, token=token, **changes)


def give_back(
    store: JobStore, queue: Sender, job_id: str, token: str, *, cap: int, reason: str, delay_s: float
) -> Job | None:
    """Put the running job held under `token` back in the queue for a later attempt (its upload
    failed; the exported output stays in the work dir) and send it after `delay_s` seconds.

    None, changing nothing, when the job already used `cap` attempts (the caller fails it). Raises
    Fenced or InvalidTransition (e.g. cancelling: the caller finishes it as cancelled)."""

    def fn(job: Job) -> tuple[Job, Events] | None:
        if job.delivery != token:
            raise Fenced(job_id, token)
        if job.status != JobStatus.running:
            raise InvalidTransition(job, JobStatus.queued)
        if job.attempts >= cap:
            return None
        new = _requeued(job, f"re-queued: {reason}")
        return new, [("status", status_event(job.status, new, reason=reason))]

    job, changed = store.mutate(job_id, _outboxed(store, fn, "given_back"))
    if not changed:
        return None
    _send(store, queue, job, countdown=delay_s)
    return job


class Lease:
    """Renews the worker's lease on a job every `renew_s` seconds on a daemon thread while the
    `with` block runs. `lost` turns True once a renewal is refused (the job was re-queued)."""

    def __init__(
        self, store: JobStore, job_id: str, token: str, worker: str, renew_s: float, expire_s: float
    ) -> None:
        self.store, self.job_id, self.token, self.worker = store, job_id, token, worker
        self.renew_s, self.expire_s = renew_s, expire_s
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                ok = renew(self.store, self.job_id, self.token, self.worker, self.expire_s)
            except redis.RedisError as e:  # a Redis blip: the next renewal tries again
                log.warning("job %s: lease not renewed: %s", self.job_id, e)
                continue
            if not ok:
                log.warning("job %s: lease lost (the job was re-queued); stopping", self.job_id)
                self.lost = True
                return

    def check(self) -> None:
        """Raise Fenced once the lease is lost."""
        if self.lost:
            raise Fenced(self.job_id, self.token)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- sweeps fanned out over workers ------------------------------------------------------------------

VARIANT_TENANT = "~sweep"
"""Suffix of the tenant that holds a sweep's variant jobs: `<tenant>~sweep` (no real tenant name has
`~`), so they never show in the tenant's listing nor count against its quota."""


def variant_tenant(tenant: str) -> str:
    """The tenant under which `tenant`'s sweeps keep their variant jobs."""
    return f"{tenant}{VARIANT_TENANT}"


def fan_out(store: JobStore, queue: Sender, job_id: str, token: str, labels: list[str]) -> Job:
    """Turn the sweep held under `token` into one queued job per variant (`labels`) and send them.

    One transaction creates the variant jobs (each with its own delivery token, lease, attempts and
    resume: ordinary jobs of `variant_tenant`, `parent` = the sweep) and gives the sweep a new token
    (the attempt that fanned it out is fenced off) and no lease: while its variants run, nobody holds
    it. `fan_check` moves it on once they have finished. Returns the sweep's record; raises Fenced."""
    made: list[Job] = []

    def fn(job: Job) -> tuple[Job, Events, Callable[[Any], None]] | None:
        if job.delivery != token or job.status != JobStatus.running:
            raise Fenced(job_id, token)
        request = job.request.model_copy(update={"webhook": None})  # the sweep's webhook speaks for all
        made[:] = [
            Job(id=new_job_id(), tenant=variant_tenant(job.tenant), status=JobStatus.queued, request=request,
                created_at=now(), sources=job.sources, delivery=new_delivery_token(), parent=job.id,
                variant=label)
            for label in labels
        ]  # fmt: skip
        fan = FanOut(variants={c.variant or "": c.id for c in made})
        message = f"{len(made)} variants queued as jobs of their own"
        prog = job.progress.model_copy(update={"stage": "pruning", "message": message})
        new = job.model_copy(update={"fanout": fan, "delivery": new_delivery_token(), "progress": prog})
        return (
            new,
            [("log", {"message": message, "variants": fan.variants})],
            (lambda pipe: store.add_variant_jobs(pipe, job_id, made)),
        )

    job, _ = store.mutate(job_id, fn)
    for child in made:
        _send(store, queue, child)
    return job


def _variant_error(store: JobStore, label: str, job_id: str) -> JobError:
    try:
        child = store.get(job_id)
    except UnreadableRecord as e:
        return JobError(code="variant_failed", message=f"variant {label}: {e.info.error.message}")
    if child is None:
        return JobError(code="variant_failed", message=f"variant {label}: its job is gone")
    if child.error is None:
        return JobError(code="variant_failed", message=f"variant {label} was {child.status.value}")
    return JobError(code=child.error.code, message=f"variant {label}: {child.error.message}")


def _stop_queued(store: JobStore, variants: dict[str, str]) -> None:
    """Cancel the variant jobs still queued (a stopped sweep never starts them)."""
    for job_id, status in store.statuses(list(variants.values())).items():
        if status == JobStatus.queued:
            try:
                store.transition(job_id, [JobStatus.queued], JobStatus.cancelled)
            except (InvalidTransition, JobNotFound):
                pass  # claimed meanwhile: its worker sees the sweep stopped and cancels it


def fan_check(
    store: JobStore, queue: Sender, job_id: str, on_finished: Callable[[Job], None] | None = None
) -> Job | None:
    """Move a fanned-out sweep on from its variant jobs' statuses (idempotent; called by a variant's
    worker when it finishes and by every API process's fan-out sweep):

    - a variant failed (or its job is gone) while the sweep runs: the sweep fails with its error and
      the other variants stop (their workers see the sweep finished; queued ones are cancelled);
    - the sweep is cancelling: queued variants are cancelled; once all have finished, it is cancelled;
    - every variant succeeded: the sweep is queued again (new token, through the outbox) with
      `fanout.gathering`, and the worker that takes it writes the sweep's report and artifacts.

    `on_finished(job)` cleans up after a sweep that ended here and after each of its variant jobs
    (their artifacts). Returns the sweep's record, or None when it is gone."""
    try:
        job = store.get(job_id)
    except UnreadableRecord:
        end_unreadable(store, job_id)
        job = None
    if job is None or job.fanout is None or job.status in TERMINAL:
        with store.r.pipeline() as pipe:
            store.drop_fanout(pipe, job_id, data=True)
            pipe.execute()
        return job
    variants = job.fanout.variants
    if job.status == JobStatus.cancelling:
        _stop_queued(store, variants)
    statuses = store.statuses(list(variants.values()))
    bad = (JobStatus.failed, JobStatus.cancelled, None)
    broken = [(x, i) for x, i in variants.items() if statuses[i] in bad]
    error = _variant_error(store, *broken[0]) if broken else None

    def fn(old: Job) -> tuple[Job, Events, Callable[[Any], None]] | None:
        if old.fanout is None or old.fanout.gathering or old.status not in HELD:
            return None
        done = all(s in TERMINAL for s in statuses.values())
        if old.status == JobStatus.running and error is not None:
            new = old.model_copy(update={"status": JobStatus.failed, "finished_at": now(), "error": error})
        elif old.status == JobStatus.cancelling and done:
            new = old.model_copy(update={"status": JobStatus.cancelled, "finished_at": now()})
        elif old.status == JobStatus.running and all(s == JobStatus.succeeded for s in statuses.values()):
            new = _requeued(old, "every variant succeeded: gathering the sweep's report")
            new.fanout = old.fanout.model_copy(update={"gathering": True})
        else:
            return None

        def extra(pipe: Any) -> None:
            if new.status == JobStatus.queued:
                store.add_to_outbox(pipe, job_id)
            else:
                store.drop_fanout(pipe, job_id, data=True)

        return new, [("status", status_event(old.status, new, reason="variants"))], extra

    job, changed = store.mutate(job_id, fn)
    if not changed:
        return job
    if job.status == JobStatus.queued:
        _send(store, queue, job)
        return job
    _stop_queued(store, variants)
    if on_finished is not None:
        on_finished(job)
        for child in [store.get(i) for i in variants.values() if statuses[i] is not None]:
            if child is not None:
                on_finished(child)
    if job.request.webhook is not None:
        _send_notice(queue, job)
    return job


def sweep_fanouts(store: JobStore, queue: Sender, on_finished: Callable[[Job], None] | None = None) -> None:
    """`fan_check` every fanned-out sweep (catches variant jobs ended by the lease sweeper, and a
    variant's worker that died between finishing and checking)."""
    for job_id in store.fanouts():
        try:
            fan_check(store, queue, job_id, on_finished)
        except (redis.RedisError, UnreadableRecord) as e:
            log.warning("sweep %s: fan-out check failed: %s", job_id, e)


def variant_progress(store: JobStore, child: Job, prog: JobProgress) -> None:
    """Mirror a variant job's progress onto its sweep (stage, block, message, the variant's label;
    fraction: the mean over the variants); nothing when the sweep is no longer held."""
    parent = store.get(child.parent or "")
    if parent is None or parent.fanout is None or child.variant is None:
        return
    labels = list(parent.fanout.variants)
    frac = store.fan_progress(parent.id, child.variant, prog.fraction, labels)
    mirrored = prog.model_copy(update={"fraction": round(frac, 4), "variant": child.variant})
    store.set_progress(parent.id, mirrored)


def sweep_stopped(store: JobStore, child: Job) -> bool:
    """Whether a variant job's sweep was cancelled, failed or is gone (the variant stops)."""
    status = store.status_of(child.parent or "")
    return status is None or status not in (JobStatus.running, JobStatus.queued)


def fan_done(store: JobStore, job_id: str) -> None:
    """The sweep succeeded: stop watching it and drop its variant hash."""
    with store.r.pipeline() as pipe:
        store.drop_fanout(pipe, job_id, data=True)
        pipe.execute()
