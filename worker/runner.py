"""Run one job: claim it, call the engine, upload artifacts, then record the outcome."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import redis
from celery.exceptions import SoftTimeLimitExceeded

from core.errors import Cancelled, CoreError
from core.eta import EtaEstimator
from core.progress import Progress
from core.result import RunReport
from core.spec import RunSpec
from jobs.events import EventLog
from jobs.redisconn import connect
from jobs.settings import Settings, get_settings
from jobs.spec import TERMINAL, Job, JobError, JobProgress, JobStatus, JobSummary
from jobs.storage import ArtifactStore, StorageError, make_store
from jobs.storage.s3_inputs import InputNotFound, InputRefused, S3InputFetcher
from jobs.store import InvalidTransition, JobStore, now
from jobs.webhooks import WebhookError, secret_from_env
from worker import faults, inputs
from worker.notify import Notifier

log = logging.getLogger("worker.runner")

ACTIVE = (JobStatus.running, JobStatus.cancelling)
ENGINE_SHARE = 0.97  # fraction of the job the engine accounts for; the rest is uploading
THROTTLE_S = 0.5


@dataclass
class Context:
    """What a worker process needs, built once per process."""

    settings: Settings
    store: JobStore
    events: EventLog
    artifacts: ArtifactStore
    webhook_secret: str | None = None


def _webhook_secret() -> str | None:
    try:
        return secret_from_env()
    except WebhookError as e:
        log.error("PRUNE_WEBHOOK_SECRET is invalid (%s); webhooks disabled", e)
        return None


@lru_cache(maxsize=1)
def context() -> Context:
    """The process-wide context from the environment."""
    settings = get_settings()
    client = connect(settings.redis_url)  # retries with backoff: a Redis restart does not fail the job
    return Context(
        settings,
        JobStore(client, settings.key_prefix),
        EventLog(client, settings.key_prefix),
        make_store(settings),
        _webhook_secret(),
    )


class Superseded(Exception):
    """The message carries a delivery token the job no longer has: the job was sent again."""


def _claim(ctx: Context, job_id: str, token: str | None = None) -> Job:
    """Atomically move the job to running (counting the attempt) or to its final state.

    Raises Superseded, changing nothing, when `token` is given and is not the record's (a message
    without a token, sent before tokens existed, is accepted). A redelivered message carries the
    token of the claim it repeats, so a job whose worker died is claimed again as before.
    """
    cap = ctx.settings.max_attempts

    def fn(job: Job) -> tuple[Job, list[tuple[str, dict[str, Any]]]] | None:
        if token is not None and token != job.delivery:
            raise Superseded(job_id)
        if job.status in TERMINAL:
            return None  # e.g. cancelled while queued: skip, the task is acked
        if job.status == JobStatus.cancelling:  # its worker died after a cancel request
            new = job.model_copy(update={"status": JobStatus.cancelled, "finished_at": now()})
        elif job.attempts >= cap:
            err = JobError(
                code="worker_lost", message=f"worker died {job.attempts} times while running this job"
            )
            new = job.model_copy(update={"status": JobStatus.failed, "finished_at": now(), "error": err})
        else:
            new = job.model_copy(
                update={
                    "status": JobStatus.running,
                    "attempts": job.attempts + 1,
                    "started_at": now(),
                    "progress": JobProgress(stage="loading", message="starting"),
                }
            )
        data: dict[str, Any] = {
            "status": new.status.value,
            "previous": job.status.value,
            "attempts": new.attempts,
        }
        if new.error:
            data["error"] = new.error.model_dump()
        return new, [("status", data)]

    return ctx.store.mutate(job_id, fn)[0]


def summarize(report: RunReport) -> JobSummary:
    """Headline metrics from the engine's report."""
    ev, v, sw = report.evaluation, report.verdict, report.sweep
    variants = [
        {"label": x.label, "method": x.method, "pattern": x.pattern, "sparsity": x.sparsity,
         "pruned_ppl": x.pruned_ppl, "ppl_ratio": x.ppl_ratio, "passed": x.gate.passed if x.gate else None}
        for x in (sw.variants if sw else [])
    ]  # fmt: skip
    return JobSummary(
        dense_ppl=ev.dense_ppl if ev else None,
        pruned_ppl=ev.pruned_ppl if ev else None,
        sparsity=report.sparsity.overall,
        durations={k: float(t) for k, t in report.timings.items()},
        ppl_ratio=v.ratio if v else None,
        verdict=v.label if v else None,
        gate=report.gate.model_dump(mode="json") if report.gate else None,
        variant=sw.headline if sw else None,
        variants=variants,
        tasks=[t.model_dump(include={"task", "metric", "dense", "pruned"}) for t in (ev.tasks if ev else [])],
    )


class _Reporter:
    """on_progress / should_cancel callbacks bound to one job."""

    def __init__(
        self,
        ctx: Context,
        job_id: str,
        fault: dict[str, Any] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.ctx, self.job_id = ctx, job_id
        self.t0 = time.monotonic()
        self.last: tuple[str, int | None, str | None] | None = None
        self.last_t = 0.0
        self.fault = fault
        self.notifier = notifier
        self.prev_t = self.t0  # time of the previous engine callback (block timing)
        self.eta = EtaEstimator()  # smoothed: no swings early in the job
        self.last_block: int | None = None
        self.hook_key: tuple[str, int | None, str | None] | None = None

    def _observe_block(self, p: Progress, t: float) -> None:
        """Per-block pruning time (since the previous callback) into the shared histogram."""
        if p.stage == "pruning" and p.block and p.block != self.last_block:
            self.last_block = p.block
            try:
                self.ctx.store.observe_block(t - self.prev_t)
            except redis.RedisError as e:
                log.warning("job %s: block time not recorded: %s", self.job_id, e)
        self.prev_t = t

    def progress(self, p: Progress, share: float = ENGINE_SHARE) -> None:
        self._record(p, share)
        faults.maybe_fire(self.fault, p.stage, p.block, self.should_cancel)  # no-op unless PRUNE_FAULTS=1

    def _record(self, p: Progress, share: float) -> None:
        frac = min(max(float(p.fraction), 0.0), 1.0) * share
        t = time.monotonic()
        self._observe_block(p, t)
        key = (p.stage, p.block, p.variant)
        if key == self.last and t - self.last_t < THROTTLE_S:
            return
        self.last, self.last_t = key, t
        eta = self.eta.update(t, frac, p.stage, p.block)
        prog = JobProgress(
            stage=p.stage,
            block=p.block,
            nblocks=p.nblocks,
            fraction=round(frac, 4),
            eta_s=eta,
            message=p.message,
            variant=p.variant,
        )
        try:
            self.ctx.store.set_progress(self.job_id, prog)
        except redis.RedisError as e:  # a Redis blip must not kill a long job
            log.warning("job %s: progress not recorded: %s", self.job_id, e)
        if self.notifier is not None and key != self.hook_key:  # once per stage and per block
            self.hook_key = key
            self.notifier.send("progress", "job.progress", {"status": "running", **prog.model_dump()})

    def should_cancel(self) -> bool:
        try:
            job = self.ctx.store.get(self.job_id)
        except redis.RedisError as e:
            log.warning("job %s: cancel check failed: %s", self.job_id, e)
            return False
        return job is None or job.status == JobStatus.cancelling


def _finish(ctx: Context, job_id: str, to: JobStatus, **changes: Any) -> None:
    try:
        ctx.store.transition(job_id, ACTIVE, to, **changes)
    except InvalidTransition as e:
        log.warning("job %s: %s", job_id, e)


def run_job(job_id: str, ctx: Context | None = None, token: str | None = None) -> str:
    """Run a job end to end and return its final status (or 'skipped' / 'superseded' / 'missing').

    `token` is the message's delivery token: a message superseded by a re-send is acked and ignored
    (no state change, no file touched)."""
    ctx = ctx or context()
    if ctx.store.get(job_id) is None:
        log.error("job %s: no such job; dropping the task", job_id)
        return "missing"
    try:
        job = _claim(ctx, job_id, token)
    except Superseded:
        log.info("job %s: message superseded by a re-send (token %s); skipping it", job_id, token)
        return "superseded"
    prefix = f"{job.tenant}/{job.id}"
    if job.status != JobStatus.running:
        if job.status in (JobStatus.cancelled, JobStatus.failed):
            ctx.artifacts.delete_prefix(prefix)
            shutil.rmtree(ctx.settings.work_dir / job.id, ignore_errors=True)  # a dead attempt's scratch
        log.info("job %s: %s, not running it", job_id, job.status.value)
        if job.status == JobStatus.cancelled and job.started_at is None:  # cancelled while queued
            _notify_completed(ctx, job, Notifier(ctx.events, job, ctx.webhook_secret))
        return "skipped"

    work = ctx.settings.work_dir / job.id
    shutil.rmtree(work, ignore_errors=True)  # a redelivered job restarts cleanly
    ctx.artifacts.delete_prefix(prefix)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "out"
    notifier = Notifier(ctx.events, job, ctx.webhook_secret)
    rep = _Reporter(ctx, job_id, faults.fault_for(job.request.model.source, job.attempts), notifier)
    log.info("job %s: running (attempt %d)", job_id, job.attempts)
    notifier.send("started", "job.started", {"status": "running", "attempt": job.attempts})
    try:
        report = _execute(ctx, job, out, rep)
        rep.progress(
            Progress(stage="uploading", fraction=1.0, message="storing artifacts"), share=ENGINE_SHARE
        )
        if rep.should_cancel():
            raise Cancelled("cancelled by request")
        infos = _upload(ctx, out, prefix, rep)
        files = [{"name": i.name, "size": i.size, "sha256": i.sha256} for i in infos]
        ctx.events.publish(job_id, "artifacts", {"files": files})
        shutil.rmtree(work, ignore_errors=True)  # scratch is gone before the job reads as finished
        try:
            ctx.store.transition(
                job_id,
                [JobStatus.running],
                JobStatus.succeeded,
                summary=summarize(report),
                progress=JobProgress(stage="done", fraction=1.0, eta_s=0.0),
            )
        except InvalidTransition as e:
            if e.job.status == JobStatus.cancelling:
                raise Cancelled("cancelled by request") from None
            if e.job.status != JobStatus.succeeded:  # succeeded: our EXEC landed, its reply was lost
                raise
        log.info("job %s: succeeded", job_id)
        return JobStatus.succeeded.value
    except Cancelled:
        ctx.artifacts.delete_prefix(prefix)
        shutil.rmtree(work, ignore_errors=True)
        _finish(ctx, job_id, JobStatus.cancelled)
        log.info("job %s: cancelled", job_id)
        return JobStatus.cancelled.value
    except Exception as e:  # CoreError, StorageError, time limit or a bug: the job fails, the worker lives
        err = _error_of(e, ctx)
        if err.code == "internal_error":
            log.exception("job %s: unexpected error", job_id)
        else:
            log.warning("job %s: failed: %s", job_id, err.message)
        ctx.artifacts.delete_prefix(prefix)
        shutil.rmtree(work, ignore_errors=True)
        ctx.events.publish(job_id, "error", err.model_dump())
        _finish(ctx, job_id, JobStatus.failed, error=err)
        return JobStatus.failed.value
    finally:
        shutil.rmtree(work, ignore_errors=True)
        _notify_completed(ctx, job, notifier)


def _notify_completed(ctx: Context, job: Job, notifier: Notifier) -> None:
    """Send `job.succeeded|failed|cancelled` with the final record and wait for pending deliveries."""
    if not notifier.enabled:
        return
    try:
        final = ctx.store.get(job.id) or job
        if final.status in TERMINAL:
            data: dict[str, Any] = {"status": final.status.value, "attempts": final.attempts}
            if final.error:
                data["error"] = final.error.model_dump()
            if final.summary:
                data["summary"] = final.summary.model_dump()
            notifier.send("completed", f"job.{final.status.value}", data)
    except Exception as e:  # a webhook must never fail the job
        log.warning("job %s: completion webhook not sent: %s", job.id, e)
    notifier.close()


def _upload(ctx: Context, out: Path, prefix: str, rep: _Reporter) -> list[Any]:
    """Upload the artifacts, retrying StorageError with exponential backoff (all-or-nothing per try)."""
    delay = ctx.settings.storage_backoff
    for attempt in range(ctx.settings.storage_retries + 1):
        try:
            return ctx.artifacts.upload_dir(out, prefix)
        except StorageError as e:
            if attempt == ctx.settings.storage_retries:
                raise StorageError(f"{e} (gave up after {attempt + 1} tries)") from None
            log.warning("job %s: upload failed (%s); retrying in %.1f s", rep.job_id, e, delay)
            ctx.events.publish(rep.job_id, "log", {"message": f"upload failed, retrying in {delay:g} s: {e}"})
            time.sleep(delay)
            delay *= 2
            if rep.should_cancel():
                raise Cancelled("cancelled by request") from None
    raise AssertionError("unreachable")


def _execute(ctx: Context, job: Job, out: Path, rep: _Reporter) -> RunReport:
    from core import pipeline  # torch lives behind this import

    checked = run_spec(job)
    spec = checked
    if inputs.has_s3(checked):
        fetcher = S3InputFetcher.from_env()
        spec = inputs.localize(checked, out.parent, fetcher, rep.progress, rep.should_cancel)
    report = pipeline.run(
        spec,
        out,
        reported_spec=checked,  # the report names the s3:// URIs, not the scratch copies
        on_progress=rep.progress,
        should_cancel=rep.should_cancel,
        data_dir=ctx.settings.data_dir,
    )
    return report


def run_spec(job: Job) -> RunSpec:
    """The engine's spec, loading the locations the API checked (resolved paths) instead of the
    submitted strings, so a symlink swapped in after the check cannot redirect the job."""
    spec = job.request.to_run_spec()
    src = job.sources
    update: dict[str, Any] = {}
    if src.get("model"):
        update["model"] = spec.model.model_copy(update={"source": src["model"]})
    for name in ("calibration", "evaluation"):
        loc = src.get(name)
        if loc and loc != getattr(spec, name).source:
            update[name] = getattr(spec, name).model_copy(update={"source": loc})
    return spec.model_copy(update=update) if update else spec


def _error_of(e: BaseException, ctx: Context) -> JobError:
    if isinstance(e, CoreError):
        return JobError(code=e.code, message=str(e) or type(e).__name__)
    if isinstance(e, InputNotFound):
        return JobError(code="source_not_found", message=str(e))
    if isinstance(e, InputRefused):
        return JobError(code="source_refused", message=str(e))
    if isinstance(e, StorageError):
        return JobError(code="storage_error", message=str(e))
    if isinstance(e, SoftTimeLimitExceeded):
        return JobError(
            code="time_limit", message=f"job exceeded the {ctx.settings.job_time_limit} s time limit"
        )
    return JobError(code="internal_error", message=f"internal error ({type(e).__name__}); see the worker log")
