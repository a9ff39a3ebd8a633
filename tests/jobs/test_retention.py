"""Retention of finished jobs against a real redis-server and the real local artifact store.

"Finished long ago" is made by moving a job's `prune:finished` score back (or by sweeping with a
cutoff of 0 s); nothing sleeps and nothing is timed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from jobs import metrics, retention
from jobs.events import EventLog
from jobs.retention import MAX_STORAGE_FAILURES, sweep, sweep_all
from jobs.settings import Settings
from jobs.signing import Signer
from jobs.spec import TERMINAL, Job, JobError, JobRequest, JobStatus
from jobs.storage.base import StorageError
from jobs.storage.local import LocalArtifactStore
from jobs.store import JobStore, now

S = JobStatus
DAY = 24 * 3600.0
RETENTION = 30 * DAY


@pytest.fixture
def artifacts(tmp_path: Path) -> LocalArtifactStore:
    return LocalArtifactStore(tmp_path / "artifacts", Signer(b"retention-test"), "http://testserver")


def req() -> JobRequest:
    return JobRequest.model_validate({"model": {"source": "/models/a"}})


def new_job(
    store: JobStore, status: JobStatus = S.queued, tenant: str = "default", key: str | None = None
) -> str:
    """A job brought to `status` through the store's own transitions."""
    job, _ = store.create(tenant, req(), key)
    if status == S.queued:
        return job.id
    if status == S.cancelled:
        store.transition(job.id, [S.queued], S.cancelled)
        return job.id
    store.transition(job.id, [S.queued], S.running, attempts=1, started_at=now())
    if status == S.succeeded:
        store.transition(job.id, [S.running], S.succeeded)
    elif status == S.failed:
        store.transition(job.id, [S.running], S.failed, error=JobError(code="x", message="boom"))
    elif status == S.cancelling:
        store.transition(job.id, [S.running], S.cancelling)
    return job.id


def age(store: JobStore, job_id: str, days: float) -> None:
    """Pretend the finished job finished `days` ago."""
    assert store.r.zadd(store.keys.finished_key, {job_id: time.time() - days * DAY}, xx=True, ch=True) == 1


def with_artifacts(store: JobStore, artifacts: LocalArtifactStore, job_id: str, tmp_path: Path) -> Path:
    job = store.require(job_id)
    src = tmp_path / f"src-{job_id}"
    (src / "model").mkdir(parents=True)
    (src / "model" / "weights.bin").write_bytes(b"\0" * 64)
    (src / "report.json").write_text("{}")
    artifacts.upload_dir(src, f"{job.tenant}/{job_id}")
    return artifacts.root / job.tenant / job_id


def keys_of(store: JobStore, job_id: str) -> list[str]:
    """Every Redis key that names the job."""
    return sorted(k.decode() for k in store.r.scan_iter(match=f"*{job_id}*"))


def members_of(store: JobStore, job_id: str) -> list[str]:
    """Every sorted set or set (index, finished, outbox, active) that still holds the job."""
    out = []
    for k in store.r.scan_iter(match=f"{store.prefix}:*"):
        kind = store.r.type(k)
        if kind == b"zset" and store.r.zscore(k, job_id) is not None:
            out.append(k.decode())
        elif kind == b"set" and store.r.sismember(k, job_id):
            out.append(k.decode())
    return out


def recount(store: JobStore) -> dict[str, int]:
    """Jobs per status, counted from the stored records themselves."""
    counts = dict.fromkeys((s.value for s in S), 0)
    for k in store.r.scan_iter(match=f"{store.prefix}:job:*"):
        counts[Job.model_validate_json(store.r.get(k)).status.value] += 1
    return counts


def test_every_path_into_a_terminal_status_records_the_job_as_finished(store: JobStore) -> None:
    ids = {s: new_job(store, s) for s in S if s != S.cancelling}
    ids[S.cancelling] = new_job(store, S.cancelling)
    for status, job_id in ids.items():
        score = store.r.zscore(store.keys.finished_key, job_id)
        if status in TERMINAL:
            assert score == store.require(job_id).finished_at.timestamp(), status
        else:
            assert score is None, status
    # any other mutation into a terminal status, like the worker's claim of a job whose worker died
    # after a cancel request (cancelling -> cancelled without `transition`)
    cancelling = ids[S.cancelling]

    def claim(job: Job) -> tuple[Job, list[tuple[str, dict[str, Any]]]]:
        new = job.model_copy(update={"status": S.cancelled, "finished_at": now()})
        return new, [("status", {"status": "cancelled", "previous": "cancelling"})]

    job, changed = store.mutate(cancelling, claim)
    assert changed and store.r.zscore(store.keys.finished_key, cancelling) == job.finished_at.timestamp()
    # ... and the API's 503 path (queued -> failed when the broker is unreachable)
    unsent = new_job(store)
    store.transition(unsent, [S.queued], S.failed, error=JobError(code="queue_unavailable", message="x"))
    assert store.r.zscore(store.keys.finished_key, unsent) is not None
    assert {job_id for job_id, _ in store.finished()} == {
        ids[S.succeeded],
        ids[S.failed],
        ids[S.cancelled],
        cancelling,
        unsent,
    }


def test_sweep_deletes_old_finished_jobs_and_everything_about_them(
    store: JobStore, events: EventLog, artifacts: LocalArtifactStore, tmp_path: Path
) -> None:
    old = {
        "succeeded": new_job(store, S.succeeded, key="ci-1"),
        "failed": new_job(store, S.failed, tenant="acme"),
        "cancelled": new_job(store, S.cancelled),
    }
    recent = new_job(store, S.succeeded)
    active = [new_job(store, S.queued), new_job(store, S.running), new_job(store, S.cancelling)]
    dirs = {job_id: with_artifacts(store, artifacts, job_id, tmp_path) for job_id in [*old.values(), recent]}
    for job_id in old.values():
        age(store, job_id, 31)
        events.publish(job_id, "log", {"message": "a webhook event after the end"})
    assert keys_of(store, old["succeeded"]) == sorted(
        [
            store.keys.job_key(old["succeeded"]),
            events.key(old["succeeded"]),
            f"{store.prefix}:idemref:{old['succeeded']}",
        ]
    )
    before = metrics.status_counts(store)

    assert sorted(sweep(store, artifacts, RETENTION)) == sorted(old.values())

    for job_id in old.values():
        assert store.get(job_id) is None
        assert keys_of(store, job_id) == []  # record, event stream, idempotency reference
        assert members_of(store, job_id) == []  # tenant and status indexes, finished set, outbox, active
        assert not dirs[job_id].exists()
        assert events.page(job_id) == []
    assert not list(store.r.scan_iter(match=f"{store.prefix}:idem:*"))  # ci-1's key pointed at it
    for job_id in [recent, *active]:
        assert store.get(job_id) is not None and events.page(job_id)
    assert dirs[recent].is_dir()
    assert [j.id for j in store.list("default", limit=100).items] == [*active[::-1], recent]
    assert store.list("acme").items == [] and store.list("default", status=S.cancelled).items == []
    # counts: the stored jobs per status; the deleted ones are counted apart
    counts = metrics.status_counts(store)
    assert counts == recount(store)
    assert counts == {**before, "succeeded": 1, "failed": 0, "cancelled": 0}
    assert metrics.deleted_count(store) == 3
    assert sweep(store, artifacts, RETENTION) == []  # nothing left to delete
    # the idempotency key is free again: a retry makes a new job
    job, created = store.create("default", req(), "ci-1")
    assert created and job.id != old["succeeded"]


def test_unfinished_or_recent_jobs_are_never_deleted(store: JobStore, artifacts: LocalArtifactStore) -> None:
    running, queued, fresh = new_job(store, S.running), new_job(store), new_job(store, S.failed)
    # a finished-set entry that lies (cannot happen through the store) still never deletes a live job
    store.r.zadd(store.keys.finished_key, {running: 1.0, queued: 1.0})
    assert sweep(store, artifacts, RETENTION) == []
    delete_finished = retention.delete_finished
    assert delete_finished(store, running) is False and delete_finished(store, queued) is False
    assert store.require(running).status == S.running and store.require(queued).status == S.queued
    # a job that finished after the cutoff stays, however the caller asks
    score = store.r.zscore(store.keys.finished_key, fresh)
    assert retention.delete_finished(store, fresh, before=score - 1) is False and store.get(fresh) is not None
    assert retention.delete_finished(store, fresh, before=score) is True and store.get(fresh) is None
    assert metrics.status_counts(store) == recount(store) and metrics.deleted_count(store) == 1


def test_a_storage_error_keeps_the_record_for_a_later_sweep(
    store: JobStore, artifacts: LocalArtifactStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [new_job(store, S.succeeded) for _ in range(MAX_STORAGE_FAILURES + 1)]
    dirs = [with_artifacts(store, artifacts, job_id, tmp_path) for job_id in ids]
    for job_id in ids:
        age(store, job_id, 40)
    # break the real store: its scratch directory (where deletes move a job's files) is a file
    scratch = artifacts.root / ".tmp"
    for p in scratch.iterdir():
        p.rmdir()
    scratch.rmdir()
    scratch.write_text("not a directory")
    with pytest.raises(StorageError):
        artifacts.delete_prefix(f"default/{ids[0]}")

    with caplog.at_level(logging.WARNING, logger="jobs.retention"):
        assert sweep(store, artifacts, RETENTION) == []
    failed = [r for r in caplog.records if "artifacts not deleted" in r.getMessage()]
    assert len(failed) == MAX_STORAGE_FAILURES  # then the sweep stopped: the store is down
    for job_id, d in zip(ids, dirs, strict=True):
        assert store.get(job_id) is not None and d.is_dir()
        assert store.r.zscore(store.keys.finished_key, job_id) is not None
    assert metrics.status_counts(store)["succeeded"] == len(ids) and metrics.deleted_count(store) == 0

    scratch.unlink()  # the store is back
    assert sorted(sweep(store, artifacts, RETENTION)) == sorted(ids)
    assert not any(d.exists() for d in dirs) and all(store.get(i) is None for i in ids)


def test_sweepers_racing_delete_each_job_once(
    store: JobStore, artifacts: LocalArtifactStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ids = [new_job(store, S.succeeded if i % 2 else S.cancelled) for i in range(40)]
    dirs = [with_artifacts(store, artifacts, job_id, tmp_path) for job_id in ids]
    for job_id in ids:
        age(store, job_id, 60)
    kept = new_job(store, S.succeeded)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    gate = threading.Barrier(4)

    def run() -> None:
        gate.wait()
        try:
            results.append(sweep(store, artifacts, RETENTION, limit=100))
        except BaseException as e:  # reported below
            errors.append(e)

    with caplog.at_level(logging.WARNING):
        threads = [threading.Thread(target=run) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    deleted = [job_id for r in results for job_id in r]
    assert sorted(deleted) == sorted(ids)  # every job deleted, each by exactly one sweeper
    assert metrics.deleted_count(store) == 40 and not any(d.exists() for d in dirs)
    assert (
        metrics.status_counts(store)
        == recount(store)
        == {**dict.fromkeys((s.value for s in S), 0), "succeeded": 1}
    )
    assert [j.id for j in store.list("default").items] == [kept]
    assert store.finished() == [(kept, store.r.zscore(store.keys.finished_key, kept))]


def test_limit_is_honoured_oldest_first(store: JobStore, artifacts: LocalArtifactStore) -> None:
    ids = [new_job(store, S.failed) for _ in range(5)]
    for days, job_id in zip((35, 33, 40, 31, 32), ids, strict=True):
        age(store, job_id, days)
    assert sweep(store, artifacts, RETENTION, limit=2) == [ids[2], ids[0]]
    assert sorted(store.r.zrange(store.keys.finished_key, 0, -1)) == sorted(
        i.encode() for i in ids if i not in (ids[2], ids[0])
    )
    assert sweep_all(store, artifacts, RETENTION, batch=2) == 3
    assert store.finished() == [] and metrics.status_counts(store)["failed"] == 0


def test_cutoff_zero_deletes_every_finished_job(store: JobStore, artifacts: LocalArtifactStore) -> None:
    done, live = new_job(store, S.succeeded), new_job(store, S.running)
    assert sweep(store, artifacts, older_than_s=0) == [done]
    assert store.get(done) is None and store.get(live) is not None


def test_an_idempotency_key_left_pointing_at_a_deleted_job_creates_a_new_one(
    store: JobStore, artifacts: LocalArtifactStore
) -> None:
    job_id = new_job(store, S.succeeded, key="ci-7")
    store.r.delete(f"{store.prefix}:idemref:{job_id}")  # as for a job created before retention existed
    age(store, job_id, 31)
    assert sweep(store, artifacts, RETENTION) == [job_id]
    job, created = store.create("default", req(), "ci-7")
    assert created and job.id != job_id
    again, created = store.create("default", req(), "ci-7")
    assert not created and again.id == job.id


def test_retention_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRUNE_RETENTION_DAYS", raising=False)
    monkeypatch.delenv("PRUNE_RETENTION_INTERVAL", raising=False)
    default = Settings.from_env()
    assert default.retention_days == 30 and default.retention_s == 30 * DAY
    assert default.retention_interval == 3600
    for raw, seconds in (("", None), ("0", None), ("0.5", DAY / 2), ("90", 90 * DAY)):
        monkeypatch.setenv("PRUNE_RETENTION_DAYS", raw)
        assert Settings.from_env().retention_s == seconds, raw
    monkeypatch.setenv("PRUNE_RETENTION_INTERVAL", "0")
    assert Settings.from_env().retention_interval == 0
    monkeypatch.setenv("PRUNE_RETENTION_DAYS", "-1")
    with pytest.raises(ValueError, match="PRUNE_RETENTION_DAYS"):
        Settings.from_env()
