"""The worker's job runner in-process against a real Redis and the real engine."""

from __future__ import annotations

import time
from dataclasses import replace
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


def test_a_superseded_delivery_is_skipped_and_the_job_runs_once(
    ctx: Context, tiny_model_dir, small_text: Path
) -> None:
    req = JobRequest.model_validate(
        {
            "model": {"source": str(tiny_model_dir("llama"))},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": str(small_text), "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": str(small_text), "max_windows": 2},
        }
    )
    job, _ = ctx.store.create("default", req)
    first = job.delivery  # the message the (dead) API may still have sent
    second = ctx.store.reissue(job.id, time.time() + 1)  # the sweeper's re-send
    assert first and second and first != second
    mark = ctx.settings.artifacts_dir / "default" / job.id / "left-alone"
    mark.parent.mkdir(parents=True)
    mark.write_text("a superseded message must not touch the job's files")
    record, events = ctx.store.require(job.id), ctx.events.page(job.id, limit=1000)

    assert run_job(job.id, ctx, token=first) == "superseded"
    assert ctx.store.require(job.id) == record and record.status == S.queued  # no state change
    assert ctx.events.page(job.id, limit=1000) == events and mark.exists()  # nothing written or removed

    assert run_job(job.id, ctx, token=second) == "succeeded"
    assert run_job(job.id, ctx, token=first) == "superseded"  # arriving late changes nothing either
    assert run_job(job.id, ctx, token=second) == "skipped"  # a redelivery of a finished job
    done = ctx.store.require(job.id)
    assert done.status == S.succeeded and done.attempts == 1
    assert statuses(ctx, job.id) == ["queued", "running", "succeeded"]
    names = sorted(a.name for a in ctx.artifacts.list(f"default/{job.id}"))
    assert "manifest.json" in names and "report.json" in names and "left-alone" not in names
    assert ctx.store.outbox() == []


def test_a_redelivered_message_keeps_its_token_and_is_claimed_again(ctx: Context) -> None:
    job_id = new_job(ctx)
    token = ctx.store.require(job_id).delivery
    ctx.store.transition(job_id, [S.queued], S.running, attempts=1)  # its worker died mid-job
    assert run_job(job_id, ctx, token=token) == "failed"  # claimed again: attempt 2 (the model is missing)
    job = ctx.store.require(job_id)
    assert job.attempts == 2 and job.error is not None and job.error.code == "model_load_error"
    capped = new_job(ctx)
    ctx.store.transition(capped, [S.queued], S.running, attempts=3)
    assert run_job(capped, ctx, token=ctx.store.require(capped).delivery) == "skipped"
    assert ctx.store.require(capped).error.code == "worker_lost"  # the redelivery cap still holds


class Sender:
    """Records the messages the runner asks to send (give-back after a failed upload)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, float | None]] = []

    def enqueue(self, job_id: str, token: str | None = None, countdown: float | None = None) -> None:
        self.sent.append((job_id, token, countdown))


def test_failed_upload_is_given_back_and_the_next_attempt_only_uploads(
    ctx: Context, tiny_model_dir, small_text: Path, tmp_path: Path
) -> None:
    req = JobRequest.model_validate(
        {
            "model": {"source": str(tiny_model_dir("llama"))},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": str(small_text), "nsamples": 4, "seqlen": 32},
            "evaluation": {"enabled": False},
        }
    )
    job, _ = ctx.store.create("default", req)
    (tmp_path / "not-a-dir").write_text("x")  # every upload fails with an OSError
    broken = LocalArtifactStore(tmp_path / "not-a-dir", Signer(b"k"), "http://x")
    settings = ctx.settings.model_copy(update={"storage_retries": 0})
    sender = Sender()
    assert run_job(job.id, replace(ctx, settings=settings, artifacts=broken, queue=sender), job.delivery) == (
        "requeued"
    )
    back = ctx.store.require(job.id)
    assert back.status == S.queued and back.attempts == 1 and back.delivery != job.delivery
    assert sender.sent == [(job.id, back.delivery, settings.storage_backoff * 2)]
    work = settings.work_dir / job.id
    assert (work / "out" / "manifest.json").exists()  # the export is kept for the next attempt

    assert run_job(job.id, replace(ctx, settings=settings, queue=sender), back.delivery) == "succeeded"
    events = ctx.events.page(job.id, limit=1000)
    second = max(i for i, e in enumerate(events) if e.type == "status" and e.data["status"] == "running")
    assert {e.data["stage"] for e in events[second:] if e.type == "progress"} == {"uploading"}
    done = ctx.store.require(job.id)
    assert done.status == S.succeeded and done.attempts == 2
    assert "manifest.json" in {a.name for a in ctx.artifacts.list(f"default/{job.id}")}
    assert not work.exists()
