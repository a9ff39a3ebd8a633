"""The /v1 routes: jobs, their events and artifacts, and signed artifact downloads."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, Field

from api.deps import Services, authenticated, current_tenant, services, unique_json_keys
from api.problems import STORE_DOWN, ProblemError, problems, unreadable_problem
from core.evaluation import tasks
from jobs import lifecycle
from jobs.auth import Tenant as AuthTenant
from jobs.events import Event, check_id
from jobs.logs import set_job_id
from jobs.sources import SourceRefused
from jobs.spec import TERMINAL, Job, JobPage, JobRequest, JobStatus, UnreadableJob
from jobs.storage.local import LocalArtifactStore, safe_name
from jobs.store import IdempotencyConflict, JobNotFound, TooManyActiveJobs, UnreadableRecord
from jobs.webhooks import WebhookError, validate_url

log = logging.getLogger("api")
router = APIRouter(prefix="/v1", responses=problems(401, 503))  # 503: Redis unreachable (Retry-After)
RETRY_AFTER_S = 30
"""`Retry-After` of a 429 (tenant at its active-job limit)."""

JOB_ID = r"^[0-9a-f]{20}$"
JobId = Annotated[str, Path(pattern=JOB_ID, description="Job id (20 hex characters).")]
Tenant = Annotated[str, Depends(current_tenant)]
Svc = Annotated[Services, Depends(services)]
SSE = "text/event-stream"


class EventPage(BaseModel):
    """A page of job events; pass `next` as `after` to continue."""

    items: list[Event]
    next: str | None = Field(description="Id of the last event returned (or the `after` given).")


class Artifact(BaseModel):
    """One downloadable file of a succeeded job."""

    name: str
    size: int
    sha256: str
    url: str = Field(description="Signed download URL.")
    expires_at: datetime


class ArtifactList(BaseModel):
    """The artifacts of a job."""

    job_id: str
    artifacts: list[Artifact]


def _not_found(job_id: str) -> ProblemError:
    return ProblemError(404, f"no job {job_id}", "job-not-found", "Job not found")


def _lookup(svc: Services, tenant: str, job_id: str) -> Job | UnreadableJob:
    """The tenant's job, or what is known of it when its stored record cannot be read; another
    tenant's job is answered exactly like a missing one (404)."""
    try:
        job = svc.store.get(job_id)
    except UnreadableRecord as e:  # ownership from the tenant's index, not from the broken record
        if not svc.store.owns(tenant, job_id):
            raise _not_found(job_id) from None
        return e.info.model_copy(update={"tenant": tenant})
    if job is None or job.tenant != tenant:
        raise _not_found(job_id)
    return job


def _job(svc: Services, tenant: str, job_id: str) -> Job:
    """The tenant's job: 404 as `_lookup`, 409 `job-unreadable` when its record cannot be read."""
    job = _lookup(svc, tenant, job_id)
    if isinstance(job, UnreadableJob):
        raise unreadable_problem(job)
    return job


@router.post(
    "/jobs",
    status_code=201,
    response_model=Job,
    summary="Submit a pruning job",
    responses={
        200: {
            "model": Job,
            "description": "Replay: a job with this Idempotency-Key and body already exists.",
        },
        **problems(409, 413, 422, 429, 503),
    },
    dependencies=[Depends(unique_json_keys)],
)
def create_job(
    body: JobRequest,
    request: Request,
    response: Response,
    svc: Svc,
    tenant: Tenant,
    principal: Annotated[AuthTenant, Depends(authenticated)],
    idempotency_key: Annotated[
        str | None,
        Header(max_length=255, description="Retries with the same key and body return the same job (200)."),
    ] = None,
) -> Job:
    """Queue a job. 201 + Location for a new job; 200 for an idempotent replay; 409 when the key was
    used with another body; 422 when a source or the webhook URL is refused; 429 (+ Retry-After) when
    the tenant already has `max_active_jobs` queued or running jobs."""
    sources = _check_sources(svc, body)
    if body.webhook is not None:
        _check_webhook(svc, body.webhook.url)
    try:
        job, created = lifecycle.submit(
            svc.store,
            svc.queue,
            tenant,
            body,
            idempotency_key,
            max_active=principal.max_active_jobs,
            sources=sources,
        )
    except IdempotencyConflict as e:
        raise ProblemError(
            409, str(e), "idempotency-conflict", "Idempotency-Key reused", job_id=e.job_id
        ) from None
    except TooManyActiveJobs as e:
        raise ProblemError(
            429,
            f"tenant {tenant!r} already has {e.active} queued or running jobs (limit {e.limit}); "
            "retry when one finishes",
            "too-many-active-jobs",
            "Too many active jobs",
            headers={"Retry-After": str(RETRY_AFTER_S)},
            limit=e.limit,
        ) from None
    except lifecycle.QueueUnavailable as e:
        raise ProblemError(503, str(e), "queue-unavailable") from None
    set_job_id(job.id)
    response.headers["Location"] = str(request.url_for("get_job", job_id=job.id).path)
    if created:
        log.info("job %s: created for tenant %s", job.id, tenant)
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return job


def _refused(loc: list[str | int], message: str, slug: str) -> ProblemError:
    return ProblemError(
        422,
        message,
        slug,
        "Request refused by policy",
        errors=[{"loc": ["body", *loc], "msg": message, "type": slug}],
    )


def _check_sources(svc: Services, body: JobRequest) -> dict[str, str]:
    """Check model and data sources against the deployment's policy; the checked locations."""
    policy = svc.sources
    checks = [("model", policy.check, body.model.source)]
    checks.append(("calibration", policy.check_dataset, body.calibration.source))
    if body.evaluation.enabled:
        checks.append(("evaluation", policy.check_dataset, body.evaluation.source))
    if body.recovery.enabled and body.recovery.source is not None:
        checks.append(("recovery", policy.check_dataset, body.recovery.source))
    out: dict[str, str] = {}
    for name, check, source in checks:
        try:
            out[name] = check(source).location
        except SourceRefused as e:
            message = f"{name} source refused: {e.message}"
            raise _refused([name, "source"], message, "source-refused") from None
    try:
        policy.check_spec(body)  # the remaining rules (gguf_file)
    except SourceRefused as e:
        raise _refused(["model", "gguf_file"], e.message, "source-refused") from None
    for i, task in enumerate(body.evaluation.tasks):
        problem = tasks.submit_problem(task, svc.settings.data_dir, tasks.hub_offline())
        if problem is not None:
            raise _refused(["evaluation", "tasks", i], problem, "task-unavailable")
    return out


def _check_webhook(svc: Services, url: str) -> None:
    if svc.webhook_secret is None:
        raise _refused(
            ["webhook"], "webhooks are not enabled on this service (PRUNE_WEBHOOK_SECRET)", "webhook-refused"
        )
    try:
        validate_url(url, allow_private=svc.webhook_allow_private)
    except WebhookError as e:
        raise _refused(["webhook", "url"], f"webhook URL refused: {e}", "webhook-refused") from None


@router.get("/jobs", response_model=JobPage, summary="List jobs (newest first)", responses=problems(422))
def list_jobs(
    svc: Svc,
    tenant: Tenant,
    after: Annotated[str | None, Query(pattern=JOB_ID, description="`next` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> JobPage:
    """Cursor-paginated listing, optionally filtered by status."""
    return svc.store.list(tenant, after=after, limit=limit, status=status)


@router.get("/jobs/{job_id}", response_model=Job, summary="Get a job", responses=problems(404, 409, 422))
def get_job(job_id: JobId, svc: Svc, tenant: Tenant) -> Job:
    """The job record: status, progress, error, summary. 409 (`job-unreadable`) when the stored record
    cannot be read (edited by hand or written by another version): cancel such a job."""
    return _job(svc, tenant, job_id)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=Job | UnreadableJob,
    summary="Cancel a job",
    responses=problems(404, 409, 422),
)
def cancel_job(job_id: JobId, svc: Svc, tenant: Tenant) -> Job | UnreadableJob:
    """A queued job is cancelled at once and never starts; a running one becomes `cancelling` and stops
    at the next block boundary. Repeating a cancel is harmless; a finished job answers 409. A job
    whose stored record cannot be read is cancelled at once (answered with what is known of it)."""
    found = _lookup(svc, tenant, job_id)
    if isinstance(found, UnreadableJob):
        return _cancel_unreadable(svc, tenant, found)
    try:
        return lifecycle.cancel(svc.store, job_id)
    except lifecycle.JobFinished as e:
        raise ProblemError(
            409,
            f"job {job_id} is already {e.job.status.value}",
            "job-finished",
            "Job finished",
            job_status=e.job.status.value,
        ) from None
    except JobNotFound:  # deleted by retention meanwhile
        raise _not_found(job_id) from None
    except lifecycle.CancelConflict as e:
        raise ProblemError(409, str(e), "conflict") from None


def _cancel_unreadable(svc: Services, tenant: str, info: UnreadableJob) -> Job | UnreadableJob:
    try:
        done = svc.store.end_unreadable(info.id, JobStatus.cancelled, tenant)
    except JobNotFound:  # deleted by retention meanwhile
        raise _not_found(info.id) from None
    if done is None:  # readable again (rewritten meanwhile): the ordinary cancel
        return cancel_job(info.id, svc, tenant)
    info, changed = done
    if not changed:
        status = info.status.value if info.status else "unknown"
        raise ProblemError(409, f"job {info.id} is already {status}", "job-finished", "Job finished",
                           job_status=status)  # fmt: skip
    log.warning("job %s: record unreadable; cancelled by its tenant", info.id)
    return info


def _sse(ev: Event) -> str:
    return f"id: {ev.id}\nevent: {ev.type}\ndata: {json.dumps(ev.data, separators=(',', ':'))}\n\n"


async def _stream(svc: Services, job_id: str, after: str) -> AsyncIterator[str]:
    """The SSE body; Redis going away ends it cleanly (the client resumes with Last-Event-ID)."""
    try:
        async for chunk in _stream_events(svc, job_id, after):
            yield chunk
    except STORE_DOWN as e:
        log.warning("store unavailable: event stream of job %s ended: %s: %s", job_id, type(e).__name__, e)
        yield ": store unavailable; reconnect with Last-Event-ID\n\n"
    except Exception:  # the response has started: end the stream cleanly, not with a reset
        log.exception("event stream of job %s failed", job_id)
        yield ": internal error; reconnect with Last-Event-ID\n\n"


async def _stream_events(svc: Services, job_id: str, after: str) -> AsyncIterator[str]:
    aev = svc.aevents
    last = after
    yield "retry: 2000\n\n"
    while True:  # the status alone, read leniently: cheap, and works for an unreadable record
        status = await run_in_threadpool(svc.store.status_of, job_id)
        if status is None or status in TERMINAL:
            # the terminal status event is written with the record: everything is in the stream now
            while batch := await aev.page(job_id, last, 500):
                for ev in batch:
                    last = ev.id
                    yield _sse(ev)
            return
        events = await aev.tail(job_id, last, block_ms=2000)
        for ev in events:
            last = ev.id
            yield _sse(ev)
            if ev.type == "status" and ev.data.get("status") in {s.value for s in TERMINAL}:
                return
        if not events:
            yield ": keep-alive\n\n"


@router.get(
    "/jobs/{job_id}/events",
    response_model=EventPage,
    summary="Job events (JSON page or server-sent events)",
    responses={
        200: {
            "description": "A JSON page, or with `Accept: text/event-stream` an SSE stream (each event's "
            "`id:` is its stream id; resume with `Last-Event-ID`; the stream ends when the job finishes).",
            "content": {SSE: {"schema": {"type": "string"}}},
        },
        **problems(404, 422),
    },
)
async def job_events(
    job_id: JobId,
    request: Request,
    svc: Svc,
    tenant: Tenant,
    after: Annotated[str | None, Query(description="Return events after this event id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    last_event_id: Annotated[str | None, Header(description="SSE resume point.")] = None,
) -> Any:
    """Every event of the job: status changes, progress, artifacts, errors."""
    await run_in_threadpool(_lookup, svc, tenant, job_id)  # an unreadable record's events are readable
    start = last_event_id or after
    if start is not None:
        try:
            check_id(start)
        except ValueError as e:
            raise ProblemError(422, str(e), "invalid-event-id") from None
    if SSE in request.headers.get("accept", ""):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(_stream(svc, job_id, start or "0"), media_type=SSE, headers=headers)
    items = await svc.aevents.page(job_id, start, limit)
    return EventPage(items=items, next=items[-1].id if items else start)


@router.get(
    "/jobs/{job_id}/artifacts",
    response_model=ArtifactList,
    summary="List a succeeded job's artifacts with signed URLs",
    responses=problems(404, 409, 422),
)
def job_artifacts(job_id: JobId, svc: Svc, tenant: Tenant) -> ArtifactList:
    """Each file (model/…, report.json, report.md, manifest.json) with size, sha256 and a signed URL."""
    job = _job(svc, tenant, job_id)
    if job.status != JobStatus.succeeded:
        raise ProblemError(
            409,
            f"job {job_id} is {job.status.value}; artifacts exist only for succeeded jobs",
            "job-not-succeeded",
            "Artifacts not available",
            job_status=job.status.value,
        )
    ttl = svc.settings.url_ttl
    expires_at = datetime.fromtimestamp(int(time.time()) + ttl, UTC)
    prefix = f"{job.tenant}/{job.id}"
    items = [
        Artifact(
            name=a.name,
            size=a.size,
            sha256=a.sha256,
            url=svc.artifacts.download_url(prefix, a.name, ttl),
            expires_at=expires_at,
        )
        for a in svc.artifacts.list(prefix)
    ]
    return ArtifactList(job_id=job.id, artifacts=items)


@router.get(
    "/artifacts/{tenant}/{job_id}/{name:path}",
    summary="Download an artifact through a signed URL",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **problems(403, 404, 422)},
)
def download_artifact(
    tenant: str,
    job_id: JobId,
    name: str,
    svc: Svc,
    expires: Annotated[int, Query(description="Unix time the URL expires.")],
    sig: Annotated[str, Query(max_length=128, description="HMAC-SHA256 signature.")],
) -> FileResponse:
    """Serve the file when the signature matches and has not expired (403 otherwise)."""
    store = svc.artifacts
    if not isinstance(store, LocalArtifactStore):
        raise ProblemError(404, "artifacts are served by the object store", "not-served-here")
    try:
        safe_name(name)
        safe_name(tenant)
    except ValueError:
        raise ProblemError(403, "invalid artifact path", "signature-invalid", "Forbidden") from None
    if not store.signer.verify(tenant, job_id, name, expires, sig):
        expired = store.signer.verify(tenant, job_id, name, expires, sig, at=0)
        detail = "the URL has expired" if expired else "the URL signature is invalid"
        raise ProblemError(403, detail, "url-expired" if expired else "signature-invalid", "Forbidden")
    path = store.path(f"{tenant}/{job_id}", name)
    if not path.is_file():
        raise ProblemError(404, f"no artifact {name} for job {job_id}", "artifact-not-found")
    return FileResponse(path, media_type="application/octet-stream", filename=path.name)
