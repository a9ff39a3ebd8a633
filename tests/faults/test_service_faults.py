"""Redis restarts, unreachable artifact storage, API restarts mid-stream and cancels in every stage."""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

import httpx
import pytest

from jobs.webhooks import verify
from tests.e2e.test_service import sse
from tests.e2e.test_wiring import Receiver
from tests.faults.conftest import OUTBOX, STAGES, FaultStack
from tests.faults.test_worker_faults import assert_one_clean_artifact_set
from tests.service_fixtures import WEBHOOK_SECRET

pytestmark = pytest.mark.faults


def statuses(fs: FaultStack, job_id: str) -> list[str]:
    items = fs.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
    return [e["data"]["status"] for e in items if e["type"] == "status"]


def test_redis_restart_loses_no_job_record_and_no_queued_job(faults: FaultStack) -> None:
    running = faults.submit("pause-redis")  # holds 4 s at pruning block 1, then finishes
    queued = [faults.submit() for _ in range(2)]  # concurrency 1: these wait in the broker list
    faults.wait_stage(running, "pruning", block=1)
    jobs_before = sorted(faults.r.keys("prune:job:*"))
    assert set(queued) <= set(faults.broker_job_ids())
    faults.restart_redis()  # SIGKILL: only the AOF (appendfsync always) survives
    assert sorted(faults.r.keys("prune:job:*")) == jobs_before
    assert set(queued) <= set(faults.broker_job_ids())
    for job_id in [running, *queued]:
        job = faults.wait_done(job_id)
        assert job["status"] == "succeeded", (job, faults.logs("worker"))
        assert job["attempts"] == 1
        assert statuses(faults, job_id) == ["queued", "running", "succeeded"]
    r = faults.http.post(
        "/v1/jobs", json={"model": {"source": faults.source()}, "evaluation": {"enabled": False}}
    )
    assert r.status_code == 201  # the API reconnected too
    faults.http.post(f"/v1/jobs/{r.json()['id']}/cancel")


def test_unwritable_artifact_storage_fails_cleanly_then_a_retry_succeeds(faults: FaultStack) -> None:
    shutil.rmtree(faults.artifacts, ignore_errors=True)
    faults.artifacts.write_text("not a directory")  # every upload attempt now fails with an OSError
    try:
        assert faults.http.get("/readyz").status_code == 503
        body: dict[str, Any] = {
            "model": {"source": faults.source()},
            "calibration": {"source": str(faults.text), "nsamples": 4, "seqlen": 32},
            "evaluation": {"enabled": False},
        }
        job_id = faults.http.post("/v1/jobs", json=body).json()["id"]
        job = faults.wait_done(job_id)
        assert job["status"] == "failed" and job["error"]["code"] == "storage_error", job
        assert "could not store artifacts" in job["error"]["message"]
        assert "gave up after 3 tries" in job["error"]["message"]
        assert job["attempts"] == 3  # each attempt's export was kept for the next one
        assert statuses(faults, job_id) == ["queued", *["running", "queued"] * 2, "running", "failed"]
        items = faults.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
        retries = [e for e in items if e["type"] == "log" and "retrying" in e["data"]["message"]]
        assert len(retries) == 2 * 3  # per attempt: backoff 0.2 s then 0.4 s between its three tries
        assert faults.job_files(job_id) == []
    finally:
        faults.artifacts.unlink()
        faults.artifacts.mkdir()
    again = faults.http.post("/v1/jobs", json=body).json()["id"]  # the client retries the same spec
    assert faults.wait_done(again)["status"] == "succeeded"
    assert faults.http.get("/readyz").status_code == 200


def test_cancelled_queued_jobs_cost_no_pool_process_and_no_queue_depth(faults: FaultStack) -> None:
    busy = faults.submit("hold-loading")  # the worker pauses in `loading` until cancelled
    faults.wait_stage(busy, "loading")
    queued = [faults.submit() for _ in range(3)]
    for job_id in queued:
        assert faults.http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    text = faults.http.get("/metrics").text
    assert "prune_queue_depth 0.0" in text  # nothing runnable waits
    assert set(queued) <= set(faults.broker_job_ids())  # their messages are still in the broker
    worker_log = faults.stack.logs / "worker.log"
    offset = worker_log.stat().st_size
    assert faults.http.post(f"/v1/jobs/{busy}/cancel").json()["status"] == "cancelling"
    after = faults.submit()
    assert faults.wait_done(after)["status"] == "succeeded"
    log = worker_log.read_bytes()[offset:].decode(errors="replace")
    for job_id in queued:  # dropped by the worker's main process: no pool process, no engine
        assert f"job {job_id}: message dropped before the pool (cancelled)" in log, log
        assert f"job {job_id}: cancelled, not running it" not in log
        assert statuses(faults, job_id) == ["queued", "cancelled"]
    assert not set(queued) & set(faults.broker_job_ids())


def test_cancelled_queued_job_with_a_webhook_is_notified_once_without_a_pool_process(
    faults: FaultStack,
) -> None:
    rx = Receiver()
    try:
        busy = faults.submit("hold-loading")  # the worker pauses in `loading` until cancelled
        faults.wait_stage(busy, "loading")
        hook = {"url": rx.url, "events": ["started", "progress", "completed"]}
        hooked = faults.submit(webhook=hook)
        assert faults.http.post(f"/v1/jobs/{hooked}/cancel").json()["status"] == "cancelled"
        assert hooked in faults.broker_job_ids()  # its message waits behind the busy job
        worker_log = faults.stack.logs / "worker.log"
        offset = worker_log.stat().st_size
        assert faults.http.post(f"/v1/jobs/{busy}/cancel").json()["status"] == "cancelling"
        after = faults.submit()  # runs after the dropped message: the worker has moved past it
        assert faults.wait_done(after)["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while not rx.received:
            assert time.monotonic() < deadline, faults.logs("worker")
            time.sleep(0.1)
        # the sender's attempt is recorded in the job's events: wait for it, then for any second send
        deadline = time.monotonic() + 30
        while not webhook_events(faults, hooked) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2)
    finally:
        rx.close()
    [(headers, raw)] = rx.received  # exactly one delivery
    verify(WEBHOOK_SECRET, headers, raw)  # signed with the worker's secret
    msg = json.loads(raw)
    assert msg["type"] == "job.cancelled"
    assert msg["data"] == {"job_id": hooked, "tenant": "default", "status": "cancelled", "attempts": 0}
    [record] = webhook_events(faults, hooked)
    assert record["event"] == "job.cancelled" and record["ok"] and record["status"] == 204
    log = worker_log.read_bytes()[offset:].decode(errors="replace")
    assert f"job {hooked}: message dropped before the pool (cancelled)" in log, log
    assert f"job {hooked}: cancelled, not running it" not in log  # no pool process looked at it
    job = faults.job(hooked)
    assert job["attempts"] == 0 and job["started_at"] is None
    assert statuses(faults, hooked) == ["queued", "cancelled"]
    assert hooked not in faults.broker_job_ids()


def webhook_events(fs: FaultStack, job_id: str) -> list[dict[str, Any]]:
    items = fs.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
    return [e["data"] for e in items if e["type"] == "webhook"]


def test_api_restart_mid_stream_resumes_with_last_event_id(faults: FaultStack) -> None:
    job_id = faults.submit("pause-sse")  # holds 3 s at pruning block 1: the API dies mid-job
    got: list[dict[str, Any]] = []
    with pytest.raises(httpx.TransportError):
        for ev in sse(faults.http, job_id):
            got.append(ev)
            if ev["event"] == "progress" and ev["data"]["stage"] == "pruning" and ev["data"]["block"] == 1:
                faults.restart_api()  # SIGKILL the server under the open stream
    assert faults.job(job_id)["status"] == "running"
    connections = 1
    while not got or got[-1]["event"] != "status" or got[-1]["data"]["status"] != "succeeded":
        try:
            connections += 1
            got.extend(sse(faults.http, job_id, got[-1]["id"]))
        except httpx.TransportError:
            continue
    full = faults.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
    assert [e["id"] for e in got] == [e["id"] for e in full]  # every event exactly once, no gap
    assert [e["data"] for e in got] == [e["data"] for e in full]
    assert connections >= 2


def create_then_die(fs: FaultStack, key: str) -> str:
    """POST an `api-dies` job: the API is SIGKILLed after creating the record, before sending the task.
    Returns the id of the job it left behind (found in the outbox: the client never got an answer)."""
    before = set(fs.r.zrange(OUTBOX, 0, -1))
    body = {
        "model": {"source": fs.source("api-dies")},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": str(fs.text), "nsamples": 4, "seqlen": 32},
        "evaluation": {"source": str(fs.text), "max_windows": 2},
    }
    with pytest.raises(httpx.TransportError):
        fs.http.post("/v1/jobs", json=body, headers={"Idempotency-Key": key})
    [job_id] = [m.decode() for m in set(fs.r.zrange(OUTBOX, 0, -1)) - before]
    assert b'"status":"queued"' in fs.r.get(f"prune:job:{job_id}")
    assert job_id not in fs.broker_job_ids()  # nothing was sent: without the outbox, stuck forever
    return job_id


def test_api_killed_between_create_and_send_the_job_is_swept_and_runs_once(faults: FaultStack) -> None:
    # No API runs between the kill and the restart, so nothing can sweep; the test holds each entry
    # back (score in the future) across the restart so GET sees the job still queued, then gives it
    # back its real age: no assertion depends on how long anything takes.
    swept = create_then_die(faults, "outbox-run")
    created = faults.r.zscore(OUTBOX, swept)
    faults.r.zadd(OUTBOX, {swept: time.time() + 3600}, xx=True)
    faults.restart_api()
    job = faults.job(swept)
    assert job["status"] == "queued" and job["attempts"] == 0
    token = job["delivery"]
    retry = faults.http.post("/v1/jobs", json=job["request"], headers={"Idempotency-Key": "outbox-run"})
    assert retry.status_code == 200 and retry.json()["id"] == swept  # the client's retry: the same job

    cancelled = create_then_die(faults, "outbox-cancel")  # a second one, cancelled while still unsent
    faults.r.zadd(OUTBOX, {cancelled: time.time() + 3600}, xx=True)
    faults.restart_api()
    r = faults.http.post(f"/v1/jobs/{cancelled}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert faults.r.zscore(OUTBOX, cancelled) is None  # a cancelled job is never sent

    faults.r.zadd(OUTBOX, {swept: created}, xx=True)  # as old as it really is: the sweeper sends it
    job = faults.wait_done(swept)
    assert job["status"] == "succeeded", (job, faults.logs("worker"), faults.logs("api"))
    assert job["attempts"] == 1 and job["delivery"] != token  # run once, from the sweeper's message
    assert statuses(faults, swept) == ["queued", "running", "succeeded"]
    items = faults.http.get(f"/v1/jobs/{swept}/events?limit=1000").json()["items"]
    assert [e["data"]["message"] for e in items if e["type"] == "log"] == [
        "re-enqueued: the first task message was never confirmed sent"
    ]
    assert_one_clean_artifact_set(faults, swept)
    assert faults.r.zscore(OUTBOX, swept) is None
    assert faults.job(cancelled)["status"] == "cancelled" and statuses(faults, cancelled) == [
        "queued",
        "cancelled",
    ]
    # no message left behind: the worker acks the swept job's message just after the job reads as
    # succeeded, so wait for that ack (bounded) rather than racing it
    deadline = time.monotonic() + 60
    while {swept, cancelled} & set(faults.broker_job_ids()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {swept, cancelled} & set(faults.broker_job_ids())
    assert faults.job_files(cancelled) == []


@pytest.mark.parametrize("stage", STAGES)
def test_cancel_in_each_stage_frees_the_worker_and_leaves_nothing(faults: FaultStack, stage: str) -> None:
    job_id = faults.submit(f"hold-{stage}")  # the worker pauses on entering `stage` until cancelled
    faults.wait_stage(job_id, stage)
    r = faults.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling"
    job = faults.wait_done(job_id)
    assert job["status"] == "cancelled" and job["progress"]["stage"] == stage, job
    assert statuses(faults, job_id) == ["queued", "running", "cancelling", "cancelled"]
    assert faults.job_files(job_id) == []
    assert faults.http.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409
    if stage == STAGES[-1]:  # the worker is free: a following job runs to completion
        assert faults.wait_done(faults.submit())["status"] == "succeeded"
