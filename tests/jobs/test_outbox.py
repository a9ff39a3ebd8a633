"""The outbox (pending enqueues with delivery tokens) and its sweeper against a real redis-server.

The queue is the only fake here: it records what would have been sent to the broker.
"""

from __future__ import annotations

import threading
import time

import redis

from jobs.events import EventLog
from jobs.lifecycle import resend_unsent as sweep
from jobs.spec import JobRequest, JobStatus
from jobs.store import JobStore

S = JobStatus


class Recorder:
    """Stands in for jobs.queue.Queue: records (job id, token) sends; can be told to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, str | None]] = []
        self.fail = fail
        self.lock = threading.Lock()

    def enqueue(self, job_id: str, token: str | None = None) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        with self.lock:
            self.sent.append((job_id, token))


def new_job(store: JobStore, age_s: float = 0.0) -> str:
    """A created job whose outbox entry is `age_s` seconds old (its task never confirmed sent)."""
    job, _ = store.create("default", JobRequest.model_validate({"model": {"source": "/models/a"}}))
    if age_s:
        store.r.zadd(store.keys.outbox_key, {job.id: time.time() - age_s}, xx=True)
    return job.id


def pending(store: JobStore) -> set[str]:
    return {job_id for job_id, _ in store.outbox()}


def test_create_records_the_job_in_the_outbox_with_a_token(store: JobStore) -> None:
    t0 = time.time()
    job, _ = store.create("default", JobRequest.model_validate({"model": {"source": "/models/a"}}))
    other, _ = store.create("default", JobRequest.model_validate({"model": {"source": "/models/a"}}))
    assert job.delivery and len(job.delivery) == 16 and other.delivery != job.delivery
    assert store.require(job.id).delivery == job.delivery
    [(job_id, score), _] = store.outbox()
    assert job_id == job.id and t0 - 1 <= score <= time.time()
    assert not store.confirm_sent(job.id, "0" * 16)  # another token: the entry stays
    assert store.confirm_sent(job.id, job.delivery)
    assert pending(store) == {other.id}


def test_leaving_queued_leaves_the_outbox(store: JobStore) -> None:
    claimed, cancelled, failed = new_job(store), new_job(store), new_job(store)
    store.transition(claimed, [S.queued], S.running, attempts=1)
    store.transition(cancelled, [S.queued], S.cancelled)
    store.transition(failed, [S.queued], S.failed)
    assert pending(store) == set()


def test_sweep_leaves_young_entries_alone(store: JobStore) -> None:
    job_id = new_job(store, age_s=5)
    queue = Recorder()
    assert sweep(store, queue, older_than_s=60) == []
    assert queue.sent == [] and pending(store) == {job_id}


def test_sweep_resends_an_old_queued_job_with_a_new_token(store: JobStore, key_prefix: str) -> None:
    old, young = new_job(store, age_s=120), new_job(store)
    before = store.require(old).delivery
    queue = Recorder()
    assert sweep(store, queue, older_than_s=60) == [old]
    job = store.require(old)
    assert job.status == S.queued and job.delivery not in (None, before)
    assert queue.sent == [(old, job.delivery)]
    assert pending(store) == {young}  # the re-send was confirmed
    log = [e.data["message"] for e in EventLog(store.r, key_prefix).page(old) if e.type == "log"]
    assert log == ["re-enqueued: the first task message was never confirmed sent"]
    assert sweep(store, queue, older_than_s=60) == []  # nothing due any more
    # the dead API's message, if it was sent after all, can no longer confirm anything
    assert not store.confirm_sent(old, before)


def test_sweep_drops_entries_of_jobs_no_longer_queued(store: JobStore) -> None:
    running, cancelled, deleted, queued = (new_job(store) for _ in range(4))
    store.transition(running, [S.queued], S.running, attempts=1)
    store.transition(cancelled, [S.queued], S.cancelled)
    store.r.delete(store.keys.job_key(deleted))
    # stale entries (e.g. left by a process that died mid-way): the sweeper must not re-send them
    stale = dict.fromkeys((running, cancelled, deleted, queued), time.time() - 120)
    store.r.zadd(store.keys.outbox_key, stale)
    queue = Recorder()
    assert sweep(store, queue, older_than_s=60) == [queued]
    assert [job_id for job_id, _ in queue.sent] == [queued]
    assert pending(store) == set()
    assert store.require(running).status == S.running and store.require(cancelled).status == S.cancelled


def test_a_failed_resend_stays_pending_and_is_retried(store: JobStore) -> None:
    job_id = new_job(store, age_s=120)
    assert sweep(store, Recorder(fail=True), older_than_s=60) == []
    [(_, score)] = store.outbox()
    assert score > time.time() - 60  # its age restarted: not retried at once
    store.r.zadd(store.keys.outbox_key, {job_id: time.time() - 120}, xx=True)  # ... but once old again
    queue = Recorder()
    assert sweep(store, queue, older_than_s=60) == [job_id]
    assert queue.sent == [(job_id, store.require(job_id).delivery)] and pending(store) == set()


def test_racing_sweepers_send_each_job_once_with_its_final_token(redis_url: str, store: JobStore) -> None:
    jobs = [new_job(store, age_s=120) for _ in range(40)]
    queues = [Recorder() for _ in range(4)]
    barrier = threading.Barrier(len(queues))
    results: list[list[str]] = [[] for _ in queues]

    def run(i: int) -> None:
        own = JobStore(redis.Redis.from_url(redis_url), store.prefix)  # one connection per "replica"
        barrier.wait()
        results[i] = sweep(own, queues[i], older_than_s=60)
        own.r.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(queues))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent = [s for q in queues for s in q.sent]
    assert sorted(job_id for job_id, _ in sent) == sorted(jobs)  # every job exactly once
    assert sorted(j for r in results for j in r) == sorted(jobs)
    for job_id, token in sent:
        assert store.require(job_id).delivery == token  # the one message sent carries the live token
    assert pending(store) == set()
