"""JobStore and EventLog against a real redis-server."""

from __future__ import annotations

import threading
import time

import pytest

from jobs import metrics
from jobs.events import EventLog, check_id
from jobs.spec import Job, JobError, JobProgress, JobRequest, JobStatus
from jobs.store import IdempotencyConflict, InvalidTransition, JobNotFound, JobStore

S = JobStatus


def req(source: str = "/models/a", **kw: object) -> JobRequest:
    return JobRequest.model_validate({"model": {"source": source}, **kw})


def test_create_get_and_status_event(store: JobStore, events: EventLog) -> None:
    job, created = store.create("default", req())
    assert created and job.status == S.queued and job.attempts == 0
    assert store.get(job.id) == job
    assert store.get("0" * 20) is None
    [ev] = events.page(job.id)
    assert ev.type == "status" and ev.data["status"] == "queued"
    assert metrics.status_counts(store)["queued"] == 1


def test_idempotency_same_body_replays_other_body_conflicts(store: JobStore) -> None:
    a, created = store.create("default", req(), "key-1")
    b, created_again = store.create("default", JobRequest.model_validate(req().model_dump()), "key-1")
    assert created and not created_again and a.id == b.id
    with pytest.raises(IdempotencyConflict) as e:
        store.create("default", req("/models/other"), "key-1")
    assert e.value.job_id == a.id
    other_tenant, created = store.create("acme", req(), "key-1")  # keys are scoped by tenant
    assert created and other_tenant.id != a.id


def test_idempotency_key_expires(store: JobStore) -> None:
    a, _ = store.create("default", req(), "k", ttl=1)
    time.sleep(1.2)
    b, created = store.create("default", req(), "k")
    assert created and b.id != a.id


def test_list_pagination_and_status_filter(store: JobStore) -> None:
    ids = [store.create("default", req())[0].id for _ in range(7)]
    store.create("other", req())
    store.transition(ids[2], [S.queued], S.cancelled)
    seen, after = [], None
    while True:
        page = store.list("default", after=after, limit=3)
        seen += [j.id for j in page.items]
        if page.next is None:
            break
        after = page.next
    assert seen == ids[::-1]  # newest first, every job once, other tenants excluded
    assert [j.id for j in store.list("default", status=S.cancelled).items] == [ids[2]]
    assert len(store.list("default", status=S.queued, limit=100).items) == 6
    expected = {**dict.fromkeys((s.value for s in S), 0), "queued": 7, "cancelled": 1}
    assert metrics.status_counts(store) == expected


def test_transitions_and_terminal_fields(store: JobStore, events: EventLog) -> None:
    job, _ = store.create("default", req())
    with pytest.raises(InvalidTransition):
        store.transition(job.id, [S.running], S.succeeded)
    store.transition(job.id, [S.queued], S.running, attempts=1, started_at=job.created_at)
    err = JobError(code="model_load_error", message="no such file: /models/a")
    failed = store.transition(job.id, [S.running], S.failed, error=err)
    assert failed.finished_at is not None and failed.error == err
    assert [e.data["status"] for e in events.page(job.id)] == ["queued", "running", "failed"]
    assert events.page(job.id)[-1].data["error"]["code"] == "model_load_error"
    buckets, total = metrics.duration_histogram(store)
    assert buckets[-1] == ("+Inf", 1) and total >= 0
    with pytest.raises(JobNotFound):
        store.transition("f" * 20, [S.queued], S.running)


def test_cancel_and_start_race_has_one_winner(store: JobStore) -> None:
    for _ in range(20):
        job, _ = store.create("default", req())
        results: dict[str, bool] = {}
        barrier = threading.Barrier(2)

        def attempt(
            name: str,
            to: JobStatus,
            job_id: str = job.id,
            out: dict[str, bool] = results,
            gate: threading.Barrier = barrier,
        ) -> None:
            gate.wait()
            try:
                store.transition(job_id, [S.queued], to)
                out[name] = True
            except InvalidTransition:
                out[name] = False

        pairs = (("start", S.running), ("cancel", S.cancelled))
        threads = [threading.Thread(target=attempt, args=a) for a in pairs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True]
        final = store.require(job.id).status
        assert final == (S.running if results["start"] else S.cancelled)
    counts = metrics.status_counts(store)
    assert counts["running"] + counts["cancelled"] == 20 and counts["queued"] == 0


def test_progress_updates_record_only_while_running(store: JobStore, events: EventLog) -> None:
    job, _ = store.create("default", req())
    p = JobProgress(stage="pruning", block=2, nblocks=4, fraction=0.5, eta_s=10.0)
    assert not store.set_progress(job.id, p)
    store.transition(job.id, [S.queued], S.running)
    assert store.set_progress(job.id, p)
    assert store.require(job.id).progress == p
    last = events.page(job.id)[-1]
    assert last.type == "progress" and last.data["block"] == 2


def test_events_page_and_blocking_tail(events: EventLog) -> None:
    first = events.publish("j1", "log", {"n": 1})
    second = events.publish("j1", "log", {"n": 2})
    assert [e.data["n"] for e in events.page("j1")] == [1, 2]
    assert [e.id for e in events.page("j1", after=first)] == [second]
    assert events.page("j1", after=second) == []
    assert events.tail("j1", after=second, block_ms=50) == []
    timer = threading.Timer(0.2, events.publish, args=("j1", "progress", {"n": 3}))
    timer.start()
    [ev] = events.tail("j1", after=second, block_ms=5000)  # blocks until the timer publishes
    timer.join()  # the publisher's reply is read before the fixture closes the client
    assert ev.type == "progress" and ev.data == {"n": 3}
    for bad in ("abc", "1-2-3", "$", ""):
        with pytest.raises(ValueError):
            check_id(bad)


def test_job_model_refuses_unknown_fields() -> None:
    with pytest.raises(ValueError):
        JobRequest.model_validate({"model": {"source": "x"}, "webhook": "http://x"})
    with pytest.raises(ValueError):
        Job.model_validate(
            {
                "id": "x",
                "tenant": "t",
                "status": "queued",
                "request": {"model": {"source": "x"}},
                "created_at": "2024-01-01T00:00:00Z",
                "extra": 1,
            }
        )
