"""The job lifecycle against a real redis-server: claims, leases, the lease sweeper and fencing."""

from __future__ import annotations

import time

import pytest

from jobs import lifecycle, metrics
from jobs.events import EventLog
from jobs.spec import JobProgress, JobRequest, JobStatus
from jobs.store import Fenced, InvalidTransition, JobStore

S = JobStatus
REQ = JobRequest.model_validate({"model": {"source": "/m"}})


class Recorder:
    """A real-enough sender: records what it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str | None, float | None]] = []

    def enqueue(self, job_id: str, token: str | None = None, countdown: float | None = None) -> None:
        self.sent.append((job_id, token, countdown))


def new_job(store: JobStore) -> str:
    job, _ = store.create("default", REQ)
    store.confirm_sent(job.id, job.delivery)
    return job.id


def claim(store: JobStore, job_id: str, worker: str = "w1", lease_s: float = 30, cap: int = 3):
    job = store.require(job_id)
    return lifecycle.claim(store, job_id, job.delivery, worker=worker, cap=cap, lease_s=lease_s)


def expire(store: JobStore, job_id: str) -> None:
    """What a lost worker leaves once its lease ran out: the lease key gone, its deadline past."""
    store.r.delete(store.keys.lease_key(job_id))
    store.r.zadd(store.keys.leases_key, {job_id: time.time() - 1})


def statuses(events: EventLog, job_id: str) -> list[tuple[str, str | None]]:
    return [
        (e.data["status"], e.data.get("reason")) for e in events.page(job_id, limit=100) if e.type == "status"
    ]


def test_claim_takes_a_lease_and_renewal_extends_it(store: JobStore) -> None:
    job_id = new_job(store)
    job = claim(store, job_id)
    assert job.status == S.running and job.attempts == 1
    assert store.r.get(store.keys.lease_key(job_id)) == b"w1"
    assert 0 < store.r.pttl(store.keys.lease_key(job_id)) <= 30_000
    assert lifecycle.renew(store, job_id, job.delivery, "w1", 120)
    assert store.r.pttl(store.keys.lease_key(job_id)) > 30_000
    assert metrics.lifecycle_counts(store)["leases"] == 1
    lifecycle.finish(store, job_id, job.delivery, S.succeeded)
    assert store.r.get(store.keys.lease_key(job_id)) is None  # a finished job holds no lease
    assert metrics.lifecycle_counts(store)["leases"] == 0
    assert not lifecycle.renew(store, job_id, job.delivery, "w1", 120)


def test_expired_lease_is_requeued_with_a_new_token_and_the_zombie_is_fenced(
    store: JobStore, events: EventLog
) -> None:
    job_id = new_job(store)
    old = claim(store, job_id)
    assert lifecycle.sweep_leases(store, Recorder(), cap=3) == []  # live lease: left alone
    expire(store, job_id)
    queue = Recorder()
    assert lifecycle.sweep_leases(store, queue, cap=3) == [job_id]
    job = store.require(job_id)
    assert job.status == S.queued and job.attempts == 1 and job.delivery != old.delivery
    assert queue.sent == [(job_id, job.delivery, None)]
    assert store.r.zscore(store.keys.outbox_key, job_id) is None  # sent and confirmed
    assert statuses(events, job_id) == [("queued", None), ("running", None), ("queued", "lease_expired")]
    assert metrics.lifecycle_counts(store) | {"workers": 0} == {
        "workers": 0,
        "leases": 0,
        "leases_expired": 1,
        "requeued": 1,
    }

    # the zombie (old token) can write nothing: progress, events, status, artifacts, lease
    before = events.page(job_id, limit=100)
    token = old.delivery
    assert token is not None
    with pytest.raises(Fenced):
        lifecycle.progress(store, job_id, token, JobProgress(stage="pruning"))
    with pytest.raises(Fenced):
        lifecycle.publish(store, job_id, token, "artifacts", {"files": []})
    with pytest.raises(Fenced):
        lifecycle.finish(store, job_id, token, S.succeeded)
    with pytest.raises(Fenced):
        lifecycle.check_held(store, job_id, token)
    assert not lifecycle.renew(store, job_id, token, "w1", 30)
    with pytest.raises(lifecycle.Superseded):  # its message, redelivered
        lifecycle.claim(store, job_id, token, worker="w1", cap=3, lease_s=30)
    assert events.page(job_id, limit=100) == before
    assert store.require(job_id).status == S.queued

    again = claim(store, job_id, worker="w2")  # the new message runs attempt 2
    assert again.status == S.running and again.attempts == 2
    assert again.delivery is not None
    lifecycle.publish(store, job_id, again.delivery, "log", {"message": "mine"})


def test_sweeper_fails_a_job_at_the_attempt_cap_and_cancels_a_cancelling_one(store: JobStore) -> None:
    capped = new_job(store)
    claim(store, capped, cap=1)
    cancelling = new_job(store)
    claim(store, cancelling)
    lifecycle.cancel(store, cancelling)
    expire(store, capped)
    expire(store, cancelling)
    finished: list[str] = []
    queue = Recorder()
    assert lifecycle.sweep_leases(store, queue, cap=1, on_finished=lambda j: finished.append(j.id)) == []
    job = store.require(capped)
    assert job.status == S.failed and job.error is not None and job.error.code == "worker_lost"
    assert job.error.message == "worker died 1 times while running this job"
    assert store.require(cancelling).status == S.cancelled
    assert sorted(finished) == sorted([capped, cancelling]) and queue.sent == []
    assert store.r.zcard(store.keys.outbox_key) == 0 and store.r.zcard(store.keys.leases_key) == 0


def test_sweeper_sends_a_notice_message_for_a_finished_job_with_a_webhook(store: JobStore) -> None:
    """A job the sweeper fails or cancels gets its completion webhook from a worker: the sweeper
    sends one more message with the job's token (a worker's main process finds it finished and
    sends the webhook); jobs without a webhook get none."""
    hooked_req = JobRequest.model_validate(
        {"model": {"source": "/m"}, "webhook": {"url": "https://ci.example/hook"}}
    )
    ids = []
    for req in (hooked_req, hooked_req, REQ):
        job, _ = store.create("default", req)
        store.confirm_sent(job.id, job.delivery)
        claim(store, job.id, cap=1)
        ids.append(job.id)
    failed, cancelled, _plain = ids
    lifecycle.cancel(store, cancelled)
    for job_id in ids:
        expire(store, job_id)
    queue = Recorder()
    assert lifecycle.sweep_leases(store, queue, cap=1) == []
    assert [store.require(j).status for j in ids] == [S.failed, S.cancelled, S.failed]
    assert sorted(queue.sent) == sorted((j, store.require(j).delivery, None) for j in (failed, cancelled))
    assert lifecycle.unrunnable(store, failed, store.require(failed).delivery) == "failed"


def test_redelivery_is_claimed_again_by_the_same_worker_only(store: JobStore) -> None:
    job_id = new_job(store)
    first = claim(store, job_id, worker="w1")
    token = first.delivery
    with pytest.raises(lifecycle.HeldElsewhere):  # the broker redelivered it while w1 still runs it
        lifecycle.claim(store, job_id, token, worker="w2", cap=3, lease_s=30)
    assert store.require(job_id).attempts == 1
    again = lifecycle.claim(store, job_id, token, worker="w1", cap=3, lease_s=30)  # its pool child died
    assert again.status == S.running and again.attempts == 2
    store.r.delete(store.keys.lease_key(job_id))  # lease expired: anyone may take it
    assert lifecycle.claim(store, job_id, token, worker="w2", cap=3, lease_s=30).attempts == 3


def test_give_back_requeues_with_a_delay_until_the_cap(store: JobStore, events: EventLog) -> None:
    job_id = new_job(store)
    job = claim(store, job_id, cap=2)
    queue = Recorder()
    back = lifecycle.give_back(
        store, queue, job_id, job.delivery or "", cap=2, reason="upload_failed", delay_s=1.5
    )
    assert back is not None and back.status == S.queued and back.delivery != job.delivery
    assert queue.sent == [(job_id, back.delivery, 1.5)]
    assert statuses(events, job_id)[-1] == ("queued", "upload_failed")
    job = claim(store, job_id, cap=2)
    assert job.attempts == 2
    assert lifecycle.give_back(store, queue, job_id, job.delivery or "", cap=2, reason="x", delay_s=0) is None
    assert store.require(job_id).status == S.running  # unchanged: the caller fails it
    lifecycle.cancel(store, job_id)
    with pytest.raises(InvalidTransition):
        lifecycle.give_back(store, queue, job_id, job.delivery or "", cap=5, reason="x", delay_s=0)


def test_unrunnable_messages(store: JobStore) -> None:
    job_id = new_job(store)
    token = store.require(job_id).delivery
    assert lifecycle.unrunnable(store, job_id, token) is None
    assert lifecycle.unrunnable(store, job_id, "stale") == "superseded"
    assert lifecycle.unrunnable(store, "f" * 20, None) == "missing"
    lifecycle.cancel(store, job_id)
    assert lifecycle.unrunnable(store, job_id, token) == "cancelled"
    with pytest.raises(lifecycle.JobFinished):
        lifecycle.cancel(store, job_id)


def test_heartbeats_count_live_workers(store: JobStore) -> None:
    metrics.heartbeat(store, "a", 30)
    metrics.heartbeat(store, "b", 30)
    metrics.heartbeat(store, "gone", -1)
    assert metrics.lifecycle_counts(store)["workers"] == 2


def test_completion_notice_is_taken_once_per_job(store: JobStore) -> None:
    job_id, other = new_job(store), new_job(store)
    lifecycle.cancel(store, job_id)
    assert lifecycle.take_notice(store, job_id)  # the first sender (main process or pool) wins
    assert not lifecycle.take_notice(store, job_id)  # a redelivered or duplicate message sends nothing
    assert lifecycle.take_notice(store, other)
    assert 0 < store.r.pttl(store.keys.notice_key(job_id)) <= lifecycle.NOTICE_TTL_S * 1000
