"""The worker's job runner in-process against a real Redis and the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from jobs.events import EventLog
from jobs.settings import Settings
from jobs.signing import Signer
from jobs.spec import JobRequest, JobStatus
from jobs.storage.local import LocalArtifactStore
from jobs.store import JobStore
from worker.runner import Context, run_job

S = JobStatus


@pytest.fixture
def ctx(redis_client: redis.Redis, key_prefix: str, tmp_path: Path) -> Context:
    settings = Settings(home=tmp_path, signing_key="k", key_prefix=key_prefix, max_attempts=3)
    artifacts = LocalArtifactStore(settings.artifacts_dir, Signer(b"k"), "http://x")
    return Context(
        settings, JobStore(redis_client, key_prefix), EventLog(redis_client, key_prefix), artifacts
    )


def new_job(ctx: Context, source: str = "/nonexistent/model") -> str:
    req = JobRequest.model_validate(
        {"model": {"source": source}, "calibration": {"nsamples": 2, "seqlen": 16}}
    )
    return ctx.store.create("default", req)[0].id


def statuses(ctx: Context, job_id: str) -> list[str]:
    return [e.data["status"] for e in ctx.events.page(job_id, limit=1000) if e.type == "status"]


def test_cancelled_while_queued_is_skipped(ctx: Context) -> None:
    job_id = new_job(ctx)
    ctx.store.transition(job_id, [S.queued], S.cancelled)
    assert run_job(job_id, ctx) == "skipped"
    job = ctx.store.require(job_id)
    assert job.status == S.cancelled and job.attempts == 0 and job.started_at is None
    assert statuses(ctx, job_id) == ["queued", "cancelled"]
    assert run_job("f" * 20, ctx) == "missing"


def test_redelivery_cap_marks_failed(ctx: Context) -> None:
    job_id = new_job(ctx)
    ctx.store.transition(job_id, [S.queued], S.running, attempts=3)  # its worker died three times
    (ctx.settings.artifacts_dir / "default" / job_id).mkdir(parents=True)
    assert run_job(job_id, ctx) == "skipped"
    job = ctx.store.require(job_id)
    assert job.status == S.failed and job.error is not None and job.error.code == "worker_lost"
    assert job.error.message == "worker died 3 times while running this job"
    assert not (ctx.settings.artifacts_dir / "default" / job_id).exists()


def test_redelivered_cancelling_job_ends_cancelled(ctx: Context) -> None:
    job_id = new_job(ctx)
    ctx.store.transition(job_id, [S.queued], S.running, attempts=1)
    ctx.store.transition(job_id, [S.running], S.cancelling)
    assert run_job(job_id, ctx) == "skipped"
    assert ctx.store.require(job_id).status == S.cancelled


def test_engine_error_fails_cleanly_and_restart_clears_stale_outputs(ctx: Context) -> None:
    job_id = new_job(ctx)
    ctx.store.transition(job_id, [S.queued], S.running, attempts=1)  # redelivered after a crash
    stale = ctx.settings.artifacts_dir / "default" / job_id
    stale.mkdir(parents=True)
    (stale / "report.json").write_text("{}")
    (ctx.settings.work_dir / job_id / "out.tmp").mkdir(parents=True)
    assert run_job(job_id, ctx) == "failed"
    job = ctx.store.require(job_id)
    assert job.status == S.failed and job.attempts == 2 and job.finished_at
    assert job.error is not None and job.error.code == "model_load_error"
    assert "/nonexistent/model" in job.error.message and "Traceback" not in job.error.message
    assert not stale.exists() and not (ctx.settings.work_dir / job_id).exists()
    assert statuses(ctx, job_id) == ["queued", "running", "running", "failed"]
    assert any(e.type == "error" for e in ctx.events.page(job_id, limit=1000))
