"""Run one job: claim it, call the engine, upload artifacts, then record the outcome.

Every status change goes through `jobs.lifecycle`; every write names the attempt's delivery token
and stops the attempt (`Fenced`, nothing more written) once the job was re-queued elsewhere. The
scratch directory `<work>/<job id>` survives a lost attempt on this host: `resume/` holds the
engine's block checkpoints (a re-queued job continues after its last pruned block) and `out/` a
complete export whose upload failed (the next attempt only uploads it). It is removed once the job
finishes."""

from __future__ import annotations

import json
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
from core.progress import Progress
from core.result import RunReport
from core.run.eta import EtaEstimator
from core.spec import RunSpec
from jobs import lifecycle, metrics
from jobs.events import EventLog
from jobs.lifecycle import Fenced, HeldElsewhere, Lease, Superseded, worker_id
from jobs.queue import Queue
from jobs.redisconn import connect
from jobs.settings import Settings, get_settings
from jobs.spec import TERMINAL, Job, JobError, JobProgress, JobStatus, JobSummary
from jobs.storage import ArtifactStore, StorageError, make_store
from jobs.storage.s3_inputs import InputNotFound, InputRefused, S3InputFetcher
from jobs.store import InvalidTransition, JobStore, UnreadableRecord
from jobs.webhooks import WebhookError, checked_secret
from worker import inputs, workdirs
from worker.notify import Notifier

log = logging.getLogger("worker.runner")

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
    queue: Queue | None = None  # re-sends a job given back after a failed upload


def _webhook_secret(settings: Settings) -> str | None:
    try:
        return checked_secret(settings.webhook_secret)
    except WebhookError as e:
        log.error("%s; webhooks disabled", e)
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
        _webhook_secret(settings),
        Queue(settings, client),
    )


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
        recovered_ppl=ev.recovered_ppl if ev else None,
        sparsity=report.sparsity.overall,
        durations={k: float(t) for k, t in report.timings.items()},
        ppl_ratio=v.ratio if v else None,
        verdict=v.label if v else None,
        gate=report.gate.model_dump(mode="json") if report.gate else None,
        variant=sw.headline if sw else None,
        variants=variants,
        tasks=[t.model_dump(include={"task", "metric", "dense", "pruned"}) for t in (ev.tasks if ev else [])],
    )


class RecordBroken(Exception):
    """The running job's record stopped parsing (edited by hand): it was failed; stop the attempt."""


class _Reporter:
    """on_progress / should_cancel callbacks bound to one attempt (its delivery token and lease)."""

    def __init__(self, ctx: Context, job: Job, lease: Lease, notifier: Notifier | None = None) -> None:
        self.ctx, self.job, self.job_id, self.token, self.lease = ctx, job, job.id, lease.token, lease
        self.t0 = time.monotonic()
        self.last: tuple[str, int | None, str | None] | None = None
        self.last_t = 0.0
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
                metrics.observe_block(self.ctx.store, t - self.prev_t)
            except redis.RedisError as e:
                log.warning("job %s: block time not recorded: %s", self.job_id, e)
        self.prev_t = t

    def progress(self, p: Progress, share: float = ENGINE_SHARE) -> None:
        """Record progress; a cancel requested meanwhile stops the job before it enters a new stage."""
        self.lease.check()
        if self.last is not None and p.stage != self.last[0] and self.should_cancel():
            raise Cancelled("cancelled by request")
        frac = min(max(float(p.fraction), 0.0), 1.0) * share
        t = time.monotonic()
        self._observe_block(p, t)
        key = (p.stage, p.block, p.variant)
        if key == self.last and t - self.last_t < THROTTLE_S and p.fraction < 1.0:  # the last step shows
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
            lifecycle.progress(self.ctx.store, self.job_id, self.token, prog)
        except redis.RedisError as e:  # a Redis blip must not kill a long job
            log.warning("job %s: progress not recorded: %s", self.job_id, e)
        except UnreadableRecord:  # its record was broken under this attempt: fail it and stop
            self._unreadable()
        if self.job.parent is not None:  # a sweep's variant: the sweep shows its progress too
            try:
                lifecycle.variant_progress(self.ctx.store, self.job, prog)
            except (redis.RedisError, UnreadableRecord) as e:
                log.warning("job %s: sweep progress not recorded: %s", self.job_id, e)
        if self.notifier is not None and key != self.hook_key:  # once per stage and per block
            self.hook_key = key
            self.notifier.send("progress", "job.progress", {"status": "running", **prog.model_dump()})

    def publish(self, type_: str, data: dict[str, Any]) -> None:
        """Append an event of this attempt (Fenced once the job was re-queued)."""
        lifecycle.publish(self.ctx.store, self.job_id, self.token, type_, data)

    def _unreadable(self) -> None:
        """The job's record was broken under this attempt: fail it once and stop the attempt."""
        lifecycle.end_unreadable(self.ctx.store, self.job_id)
        raise RecordBroken(self.job_id)

    def should_cancel(self) -> bool:
        self.lease.check()
        try:
            job = self.ctx.store.get(self.job_id)
        except redis.RedisError as e:
            log.warning("job %s: cancel check failed: %s", self.job_id, e)
            return False
        except UnreadableRecord:
            self._unreadable()
        if job is not None and job.delivery != self.token:
            raise Fenced(self.job_id, self.token)
        if job is not None and job.parent is not None and lifecycle.sweep_stopped(self.ctx.store, job):
            return True  # its sweep was cancelled or failed: the variant stops too
        return job is None or job.status == JobStatus.cancelling


def _scratch(ctx: Context, job_id: str) -> tuple[Path, Path, Path]:
    """The job's work dir, its export dir and its block checkpoints; whatever a lost attempt left
    there is removed except `resume/` and a complete `out/` (renamed into place with its manifest)."""
    work = ctx.settings.work_dir / job_id
    out, resume = work / "out", work / "resume"
    work.mkdir(parents=True, exist_ok=True)
    keep = {resume.name, workdirs.LOCK} | ({out.name} if _complete(out) else set())
    for p in work.iterdir():
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return work, out, resume


def _complete(out: Path) -> bool:
    """Whether `out` holds a whole export: its manifest, and every file it lists at its size."""
    try:
        files = json.loads((out / "manifest.json").read_text())["files"]
        return all((out / name).stat().st_size == meta["size"] for name, meta in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def run_job(job_id: str, ctx: Context | None = None, token: str | None = None) -> str:
    """Run a job end to end and return its final status (or 'skipped' / 'superseded' / 'missing' /
    'held' / 'fenced' / 'requeued').

    `token` is the message's delivery token: a message superseded by a re-send is acked and ignored
    (no state change, no file touched)."""
    ctx = ctx or context()
    s = ctx.settings
    try:
        if ctx.store.get(job_id) is None:
            log.error("job %s: no such job; dropping the task", job_id)
            return "missing"
        job = lifecycle.claim(
            ctx.store, job_id, token, worker=worker_id(), cap=s.max_attempts, lease_s=s.lease_expire_s
        )
    except UnreadableRecord:  # failed once, with the reason; its message is acked, not retried
        lifecycle.end_unreadable(ctx.store, job_id)
        return "unreadable"
    except Superseded:
        log.info("job %s: message superseded by a re-send (token %s); skipping it", job_id, token)
        return "superseded"
    except HeldElsewhere as e:
        log.warning("%s; dropping this redelivered message", e)
        return "held"
    prefix = f"{job.tenant}/{job.id}"
    if job.status != JobStatus.running:
        if job.status in (JobStatus.cancelled, JobStatus.failed):
            ctx.artifacts.delete_prefix(prefix)
            shutil.rmtree(s.work_dir / job.id, ignore_errors=True)  # a dead attempt's scratch
        log.info("job %s: %s, not running it", job_id, job.status.value)
        if job.status in (JobStatus.cancelled, JobStatus.failed):  # cancelled while queued, failed at
            notify_completed(ctx, job, notifier(ctx, job))  # the attempt cap: its webhook, once
        return "skipped"
    assert job.delivery is not None
    with (  # the dir's lock keeps this host's work-dir sweep out of it while the attempt runs
        workdirs.hold(s.work_dir / job_id),
        Lease(ctx.store, job_id, job.delivery, worker_id(), s.lease_renew_s, s.lease_expire_s) as lease,
    ):
        return _attempt(ctx, job, lease)


def notifier(ctx: Context, job: Job) -> Notifier:
    """The job's webhook sender: signed with the worker's secret, every delivery's address checked
    at send time (PRUNE_WEBHOOK_ALLOW_PRIVATE, the name resolved again). Used by pool processes and
    by the worker's main process (`worker/tasks.py`) alike."""
    return Notifier(ctx.events, job, ctx.webhook_secret, allow_private=ctx.settings.webhook_allow_private)


def _attempt(ctx: Context, job: Job, lease: Lease) -> str:
    """One claimed attempt, under its lease: prune (or reuse a complete export), upload, finish."""
    job_id, token, prefix = job.id, lease.token, f"{job.tenant}/{job.id}"
    work, out, resume = _scratch(ctx, job_id)
    ctx.artifacts.delete_prefix(prefix)
    hooks = notifier(ctx, job)
    rep = _Reporter(ctx, job, lease, hooks)
    log.info("job %s: running (attempt %d)", job_id, job.attempts)
    if job.fanout is None:  # a sweep's gather step is not a new start
        hooks.send("started", "job.started", {"status": "running", "attempt": job.attempts})
    finished = True
    try:
        if _fans_out(ctx, job):
            finished = False  # the sweep goes on as one job per variant; this attempt is over
            return _fan_out(ctx, job, token, work)
        if job.parent is not None and rep.should_cancel():
            raise Cancelled("its sweep was stopped")
        if _complete(out):  # an earlier attempt exported it; only its upload failed
            rep.publish("log", {"message": "re-using the output exported by an earlier attempt"})
            report = RunReport.model_validate_json((out / "report.json").read_text())
        else:
            report = _execute(ctx, job, out, rep, resume)
        rep.progress(
            Progress(stage="uploading", fraction=1.0, message="storing artifacts"), share=ENGINE_SHARE
        )
        if rep.should_cancel():
            raise Cancelled("cancelled by request")
        try:
            infos = _upload(ctx, out, prefix, rep)
        except StorageError as e:
            delay = ctx.settings.storage_backoff * 2 ** (ctx.settings.storage_retries + 1)
            assert ctx.queue is not None
            try:
                again = lifecycle.give_back(
                    ctx.store, ctx.queue, job_id, token, cap=ctx.settings.max_attempts,
                    reason="upload_failed", delay_s=delay,
                )  # fmt: skip
            except InvalidTransition:  # cancelling
                raise Cancelled("cancelled by request") from None
            if again is None:
                raise
            finished = False
            log.warning("job %s: %s; re-queued, keeping the export for the next attempt", job_id, e)
            return "requeued"
        rep.publish(
            "artifacts", {"files": [{"name": i.name, "size": i.size, "sha256": i.sha256} for i in infos]}
        )
        shutil.rmtree(work, ignore_errors=True)  # scratch is gone before the job reads as finished
        _succeed(ctx, job_id, token, report)
        _gathered(ctx, job)
        log.info("job %s: succeeded", job_id)
        return JobStatus.succeeded.value
    except Fenced:
        finished = False  # another attempt owns the job (and maybe this work dir): touch nothing
        log.warning("job %s: re-queued elsewhere (token %s is stale); stopping this attempt", job_id, token)
        return "fenced"
    except RecordBroken:  # already failed with the reason: its artifacts go, the finally drops scratch
        ctx.artifacts.delete_prefix(prefix)
        log.warning("job %s: its record became unreadable; attempt stopped", job_id)
        return JobStatus.failed.value
    except Cancelled:
        _end(ctx, job, token, JobStatus.cancelled)
        log.info("job %s: cancelled", job_id)
        return JobStatus.cancelled.value
    except Exception as e:  # CoreError, StorageError, time limit or a bug: the job fails, the worker lives
        err = _error_of(e, ctx)
        if err.code == "internal_error":
            log.exception("job %s: unexpected error", job_id)
        else:
            log.warning("job %s: failed: %s", job_id, err.message)
        _end(ctx, job, token, JobStatus.failed, err)
        return JobStatus.failed.value
    finally:
        if finished:
            shutil.rmtree(work, ignore_errors=True)
            notify_completed(ctx, job, hooks)
            _after_variant(ctx, job)


def _queue(ctx: Context) -> Queue:
    assert ctx.queue is not None
    return ctx.queue


def _fans_out(ctx: Context, job: Job) -> bool:
    """Whether this attempt turns the job into one job per sweep variant (PRUNE_SWEEP_FANOUT)."""
    sweep = job.request.sweep is not None and job.fanout is None and job.parent is None
    return ctx.settings.sweep_fanout and sweep


def _fan_out(ctx: Context, job: Job, token: str, work: Path) -> str:
    """Queue one job per variant of the sweep (`lifecycle.fan_out`); this attempt ends here."""
    labels = [label for label, _ in run_spec(job).variants()]
    lifecycle.fan_out(ctx.store, _queue(ctx), job.id, token, labels)
    shutil.rmtree(work, ignore_errors=True)
    log.info("job %s: sweep fanned out as %d variant jobs", job.id, len(labels))
    return "fanned_out"


def _gathered(ctx: Context, job: Job) -> None:
    """After a fanned-out sweep succeeded: its variants' copies (now in its own artifacts) go."""
    if job.fanout is None:
        return
    lifecycle.fan_done(ctx.store, job.id)
    for child_id in job.fanout.variants.values():
        try:
            ctx.artifacts.delete_prefix(f"{lifecycle.variant_tenant(job.tenant)}/{child_id}")
        except StorageError as e:  # retention deletes them with the variant's record
            log.warning("job %s: variant artifacts %s not deleted: %s", job.id, child_id, e)


def _after_variant(ctx: Context, job: Job) -> None:
    """A sweep's variant job ended: move its sweep on (`lifecycle.fan_check`); a failure here is left
    to the API's fan-out sweep."""
    if job.parent is None:
        return
    try:
        lifecycle.fan_check(ctx.store, _queue(ctx), job.parent, on_finished=lambda j: _drop_artifacts(ctx, j))
    except Exception as e:
        log.warning("job %s: sweep %s not checked (%s); the API's fan-out sweep will", job.id, job.parent, e)


def _drop_artifacts(ctx: Context, job: Job) -> None:
    try:
        ctx.artifacts.delete_prefix(f"{job.tenant}/{job.id}")
    except StorageError as e:
        log.warning("job %s: artifacts not deleted: %s", job.id, e)


def _succeed(ctx: Context, job_id: str, token: str, report: RunReport) -> None:
    """Mark the attempt's job succeeded with its summary; raise Cancelled when a cancel came first."""
    job = ctx.store.get(job_id)
    if job is not None and job.parent is not None and job.variant is not None:  # kept for the gather
        lifecycle.check_held(ctx.store, job_id, token)
        ctx.store.put_variant_report(job.parent, job.variant, report.model_dump_json())
    try:
        lifecycle.finish(
            ctx.store,
            job_id,
            token,
            JobStatus.succeeded,
            summary=summarize(report),
            progress=JobProgress(stage="done", fraction=1.0, eta_s=0.0),
        )
    except InvalidTransition as e:
        if e.job.status == JobStatus.cancelling:
            raise Cancelled("cancelled by request") from None
        if e.job.status != JobStatus.succeeded:  # succeeded: our EXEC landed, its reply was lost
            raise


def _end(ctx: Context, job: Job, token: str, to: JobStatus, err: JobError | None = None) -> None:
    """Finish a failed or cancelled attempt: its artifacts and scratch go, then the status changes."""
    ctx.artifacts.delete_prefix(f"{job.tenant}/{job.id}")
    shutil.rmtree(ctx.settings.work_dir / job.id, ignore_errors=True)
    try:
        if err is not None:
            lifecycle.publish(ctx.store, job.id, token, "error", err.model_dump())
            lifecycle.finish(ctx.store, job.id, token, to, error=err)
        else:
            lifecycle.finish(ctx.store, job.id, token, to)
    except (InvalidTransition, Fenced) as e:
        log.warning("job %s: %s", job.id, e)


def notify_completed(ctx: Context, job: Job, hooks: Notifier) -> None:
    """Send `job.succeeded|failed|cancelled` with the final record (once per job: `take_notice`) and
    wait for pending deliveries."""
    if not hooks.enabled:
        return
    try:
        final = ctx.store.get(job.id) or job
        if final.status in TERMINAL and hooks.wants("completed") and lifecycle.take_notice(ctx.store, job.id):
            data: dict[str, Any] = {"status": final.status.value, "attempts": final.attempts}
            if final.error:
                data["error"] = final.error.model_dump()
            if final.summary:
                data["summary"] = final.summary.model_dump()
            hooks.send("completed", f"job.{final.status.value}", data)
    except Exception as e:  # a webhook must never fail the job
        log.warning("job %s: completion webhook not sent: %s", job.id, e)
    hooks.close()


def _upload(ctx: Context, out: Path, prefix: str, rep: _Reporter) -> list[Any]:
    """Upload the artifacts, retrying StorageError with exponential backoff (all-or-nothing per try).
    Each try first checks that this attempt still holds the job (Fenced otherwise)."""
    delay = ctx.settings.storage_backoff
    for attempt in range(ctx.settings.storage_retries + 1):
        lifecycle.check_held(ctx.store, rep.job_id, rep.token)
        try:
            return ctx.artifacts.upload_dir(out, prefix)
        except StorageError as e:
            if attempt == ctx.settings.storage_retries:
                raise StorageError(f"{e} (gave up after {attempt + 1} tries)") from None
            log.warning("job %s: upload failed (%s); retrying in %.1f s", rep.job_id, e, delay)
            rep.publish("log", {"message": f"upload failed, retrying in {delay:g} s: {e}"})
            time.sleep(delay)
            delay *= 2
            if rep.should_cancel():
                raise Cancelled("cancelled by request") from None
    raise AssertionError("unreachable")


def _execute(ctx: Context, job: Job, out: Path, rep: _Reporter, resume: Path) -> RunReport:
    from core.run import pipeline  # torch lives behind this import

    if job.fanout is not None and job.fanout.gathering:
        return _gather(ctx, job, out, rep)
    checked = run_spec(job)
    spec = checked
    if inputs.has_s3(checked):
        fetcher = S3InputFetcher.from_settings(ctx.settings)
        spec = inputs.localize(checked, out.parent, fetcher, rep.progress, rep.should_cancel)
    report = pipeline.run(
        spec,
        out,
        reported_spec=checked,  # the report names the s3:// URIs, not the scratch copies
        on_progress=rep.progress,
        should_cancel=rep.should_cancel,
        data_dir=ctx.settings.data_dir,
        resume_dir=resume,  # block checkpoints: a re-queued attempt on this host continues from them
        variant=job.variant,  # a sweep's variant job runs that variant alone
    )
    return report


def _gather(ctx: Context, job: Job, out: Path, rep: _Reporter) -> RunReport:
    """Every variant of the fanned-out sweep succeeded: fetch their artifacts into `out/variants/`,
    then write the sweep's report (`core.run.sweep.gather`) beside them."""
    from core.run import sweep  # torch lives behind this import

    assert job.fanout is not None
    variants = job.fanout.variants
    rep.progress(Progress(stage="exporting", fraction=0.0, message=f"gathering {len(variants)} variants"))
    stored = ctx.store.variant_reports(job.id, list(variants))
    reports = []
    out.mkdir(parents=True, exist_ok=True)
    for label, child_id in variants.items():
        if label not in stored:
            raise StorageError(f"variant {label}: its report is missing (job {child_id})")
        reports.append(RunReport.model_validate_json(stored[label]))
        child_prefix = f"{lifecycle.variant_tenant(job.tenant)}/{child_id}"
        ctx.artifacts.download_dir(child_prefix, out / sweep.VARIANTS_DIR / label)
        rep.publish("log", {"message": f"gathered variant {label}", "variant": label})
    spec = run_spec(job)
    report = sweep.gather(spec, spec, reports, out)
    rep.progress(Progress(stage="exporting", fraction=1.0, message="sweep report written"))
    return report


def run_spec(job: Job) -> RunSpec:
    """The engine's spec, loading the locations the API checked (resolved paths) instead of the
    submitted strings, so a symlink swapped in after the check cannot redirect the job."""
    spec = job.request.to_run_spec()
    src = job.sources
    update: dict[str, Any] = {}
    if src.get("model"):
        update["model"] = spec.model.model_copy(update={"source": src["model"]})
    for name in ("calibration", "evaluation", "recovery"):
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
