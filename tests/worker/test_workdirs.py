"""The worker's sweep of stale work dirs against a real redis-server, real directories and a real
Celery worker process."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import redis

from jobs import lifecycle
from jobs.spec import JobRequest, JobStatus
from jobs.store import JobStore
from scripts.stack import Stack
from tests.service_fixtures import SIGNING_KEY
from worker import workdirs

S = JobStatus
REQ = JobRequest.model_validate({"model": {"source": "/m"}})
HERE = socket.gethostname()


def job_in(store: JobStore, status: JobStatus, owner: str = "elsewhere:7") -> str:
    """A job record in `status`, reached through the lifecycle (held ones by `owner`)."""
    job, _ = store.create("default", REQ)
    if status == S.queued:
        return job.id
    if status == S.cancelled:
        lifecycle.cancel(store, job.id)
        return job.id
    lifecycle.claim(store, job.id, job.delivery, worker=owner, cap=3, lease_s=300)
    if status in (S.succeeded, S.failed):
        lifecycle.finish(store, job.id, job.delivery, status)
    return job.id


def scratch(work: Path, job_id: str) -> Path:
    """A work dir as an attempt leaves it: block checkpoints and a kept export."""
    for sub in ("resume", "out"):
        (work / job_id / sub).mkdir(parents=True)
        (work / job_id / sub / "x.bin").write_bytes(b"x" * 10)
    return work / job_id


def test_sweep_removes_finished_unknown_and_foreign_dirs_only(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    store, work, me = JobStore(redis_client, key_prefix), tmp_path / "work", f"{HERE}:100"
    gone = {
        "succeeded": job_in(store, S.succeeded),
        "failed": job_in(store, S.failed),
        "cancelled": job_in(store, S.cancelled),
        "unknown": "0" * 20,
        "held elsewhere": job_in(store, S.running, owner="other-host:5"),
    }
    requeued = job_in(store, S.running, owner=me)  # its lease expired; the sweeper re-queued it
    store.r.delete(store.keys.lease_key(requeued))
    store.r.zadd(store.keys.leases_key, {requeued: 0})  # its deadline passed
    lifecycle.sweep_leases(store, _NoSend(), cap=3)
    assert store.require(requeued).status == S.queued
    kept = {
        "queued": job_in(store, S.queued),
        "re-queued from here": requeued,
        "running here": job_in(store, S.running, owner=me),
        "running in a sibling worker of this host": job_in(store, S.running, owner=f"{HERE}:101"),
        "held, lease gone": job_in(store, S.running, owner="other-host:5"),
    }
    store.r.delete(store.keys.lease_key(kept["held, lease gone"]))
    for job_id in [*gone.values(), *kept.values()]:
        scratch(work, job_id)
    (work / "not-a-job").mkdir()
    assert sorted(workdirs.sweep(store, work, me)) == sorted(gone.values())
    left = {p.name for p in work.iterdir()}
    assert left == {*kept.values(), "not-a-job"}
    assert (work / kept["re-queued from here"] / "resume" / "x.bin").exists()  # its resume data stays
    assert lifecycle.stale_work(store, gone["held elsewhere"], me) == "held by other-host:5"
    assert workdirs.sweep(store, tmp_path / "absent", me) == []


def test_sweep_leaves_a_dir_whose_attempt_holds_its_lock(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """The race the lock closes: the sweep sees the job held on another host, and before it removes
    the dir this host claims the job and starts an attempt in it. An attempt holding the dir keeps
    it whatever the record says; once the attempt lets go, a stale dir goes as before."""
    store, work, me = JobStore(redis_client, key_prefix), tmp_path / "work", f"{HERE}:100"
    job_id = job_in(store, S.running, owner="other-host:5")
    path = scratch(work, job_id)
    with workdirs.hold(path):  # what the runner holds around an attempt
        assert lifecycle.stale_work(store, job_id, me) == "held by other-host:5"
        assert workdirs.sweep(store, work, me) == []
        assert (path / "resume" / "x.bin").exists()
    assert workdirs.sweep(store, work, me) == [job_id]
    assert not path.exists()


def test_hold_recreates_a_dir_the_sweep_removed_while_it_waited(
    redis_client: redis.Redis, key_prefix: str, tmp_path: Path
) -> None:
    """An attempt that waits for the lock while the sweep removes the dir gets a fresh dir (and a
    lock on a file that still exists), never a lock on the removed one."""
    store, work = JobStore(redis_client, key_prefix), tmp_path / "work"
    job_id = job_in(store, S.succeeded)
    path = scratch(work, job_id)
    fd = os.open(path / workdirs.LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the sweep, mid-removal
    got: list[int] = []

    def attempt() -> None:
        with workdirs.hold(path) as held:
            got.append(os.stat(held / workdirs.LOCK).st_ino)
            time.sleep(0.2)
            assert (held / workdirs.LOCK).exists()

    t = threading.Thread(target=attempt)
    t.start()
    time.sleep(0.3)
    assert not got  # still waiting for the lock
    shutil.rmtree(path)
    os.close(fd)
    t.join(10)
    assert got and path.is_dir() and not (path / "resume").exists()


class _NoSend:
    def enqueue(self, job_id: str, token: str | None = None, countdown: float | None = None) -> None:
        pass


def test_worker_sweeps_at_start_and_periodically_and_survives_sweep_errors(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    store = JobStore(redis_client)  # the worker's own key prefix
    home = tmp_path / "home"
    work = home / "work"
    before = {s: job_in(store, s) for s in (S.succeeded, S.failed)} | {"unknown": "f" * 20}
    queued, here = job_in(store, S.queued), job_in(store, S.running, owner=f"{HERE}:1")
    broken = "a" * 20
    store.r.hset(store.keys.job_key(broken), "not", "a job record")  # the sweep's check raises (WRONGTYPE)
    for job_id in [*before.values(), queued, here, broken]:
        scratch(work, job_id)
    stack = Stack(
        home,
        redis_url=redis_url,
        env={"PRUNE_SIGNING_KEY": SIGNING_KEY, "PRUNE_WORK_SWEEP_INTERVAL": "0.5"},
    )
    try:
        proc = stack.start_worker()
        wait(lambda: not any((work / j).exists() for j in before.values()), "the start sweep")
        worker = f"{HERE}:{proc.pid}"  # the id the worker's main process gives its leases
        mine = job_in(store, S.running, owner=worker)
        later = job_in(store, S.succeeded)
        for job_id in (mine, later):
            scratch(work, job_id)
        wait(lambda: not (work / later).exists(), "a periodic sweep after the failing one")
        time.sleep(1.5)  # a few more rounds
        assert {p.name for p in work.iterdir()} == {queued, here, broken, mine}
        assert proc.poll() is None  # the sweep's errors did not stop the worker
        log = (stack.logs / "worker.log").read_text()
        assert f"work dir {broken} not swept" in log
        for job_id in [*before.values(), later]:
            assert f"job {job_id}: stale work dir removed" in log
    finally:
        stack.stop()


def wait(pred: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.1)
