"""Worker deaths: the pool child or the whole worker SIGKILLed mid-job, and a job that always kills it."""

from __future__ import annotations

import json
import re
import signal
import time
from typing import Any

import pytest

from jobs import lifecycle
from jobs.spec import JobProgress, JobStatus
from jobs.storage.base import INDEX_NAME
from jobs.store import Fenced, JobStore
from jobs.webhooks import verify
from tests.e2e.test_wiring import Receiver
from tests.faults.conftest import LEASE_EXPIRE, LEASE_RENEW, FaultStack
from tests.service_fixtures import WEBHOOK_SECRET

pytestmark = pytest.mark.faults


def events(fs: FaultStack, job_id: str) -> list[dict[str, Any]]:
    return fs.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]


def event_ms(event: dict[str, Any]) -> int:
    """The Unix time in ms at which Redis appended the event (its stream id)."""
    return int(event["id"].split("-")[0])


def pruned_blocks_by_attempt(items: list[dict[str, Any]]) -> list[list[int]]:
    """The blocks each attempt reported pruned, in order (an attempt starts at its `running` event)."""
    out: list[list[int]] = []
    for e in items:
        if e["type"] == "status" and e["data"]["status"] == "running":
            out.append([])
        elif e["type"] == "progress" and e["data"]["stage"] == "pruning" and e["data"]["block"]:
            if not out[-1] or out[-1][-1] != e["data"]["block"]:
                out[-1].append(e["data"]["block"])
    return out


def metric(fs: FaultStack, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", fs.http.get("/metrics").text, re.M)
    assert m, name
    return float(m.group(1))


def assert_one_clean_artifact_set(fs: FaultStack, job_id: str) -> None:
    """Exactly the files of one complete run: the manifest lists every other file; nothing partial."""
    listing = fs.http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    names = sorted(a["name"] for a in listing)
    stored = sorted(f.split("/", 2)[2] for f in fs.artifact_files() if f.startswith(f"default/{job_id}/"))
    assert sorted([*names, INDEX_NAME]) == stored  # plus the store's index of the upload
    manifest = json.loads((fs.artifacts / "default" / job_id / "manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(set(names) - {"manifest.json"})
    assert not [f for f in fs.artifact_files() if f.startswith(".tmp/") and job_id in f]
    assert not (fs.home / "work" / job_id).exists()


def plant_partial_outputs(fs: FaultStack, job_id: str) -> None:
    """What a worker killed mid-upload leaves: a half-copied temp dir and a stray file for the job."""
    tmp = fs.artifacts / ".tmp" / f"up-default-{job_id}.deadbeef"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "model.safetensors").write_bytes(b"half")
    stray = fs.artifacts / "default" / job_id / "model" / "stale.safetensors"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"stale")


def test_pool_child_sigkilled_mid_pruning_is_requeued_and_resumes(faults: FaultStack) -> None:
    job_id = faults.submit("kill-child")
    faults.wait_stage(job_id, "pruning", block=1)  # held there on attempt 1: block 1 is checkpointed
    plant_partial_outputs(faults, job_id)
    faults.pool_child().send_signal(signal.SIGKILL)  # WorkerLostError -> rejected -> requeued at once
    job = faults.wait_done(job_id)
    assert job["status"] == "succeeded", (job, faults.logs("worker"))
    assert job["attempts"] == 2
    items = events(faults, job_id)
    statuses = [e["data"]["status"] for e in items if e["type"] == "status"]
    assert statuses == ["queued", "running", "running", "succeeded"]
    assert pruned_blocks_by_attempt(items) == [[1], [2]]  # attempt 2 continued after block 1
    assert_one_clean_artifact_set(faults, job_id)


def test_whole_worker_sigkilled_is_requeued_when_its_lease_expires(faults: FaultStack) -> None:
    """A lost host (main process and pool child SIGKILLed): the API's sweeper re-queues the job once
    its lease expires, not the broker after its visibility timeout (an hour here); the second attempt
    resumes after the checkpointed block, and the dead attempt's token can write nothing."""
    requeues = metric(faults, "prune_requeues_total")
    job_id = faults.submit("kill-worker")
    faults.wait_stage(job_id, "pruning", block=1)
    plant_partial_outputs(faults, job_id)
    old_token = faults.job(job_id)["delivery"]
    killed_ms = time.time() * 1000
    faults.kill_worker()  # main process and pool child: the message stays unacked in Redis
    assert faults.job(job_id)["status"] == "running"
    faults.stack.start_worker()
    job = faults.wait_done(job_id, timeout=120)  # on a visibility timeout alone: an hour
    assert job["status"] == "succeeded", (job, faults.logs("worker"), faults.logs("api"))
    assert job["attempts"] == 2 and job["delivery"] != old_token
    items = events(faults, job_id)
    status = [e for e in items if e["type"] == "status"]
    assert [e["data"]["status"] for e in status] == ["queued", "running", "queued", "running", "succeeded"]
    requeued = status[2]
    assert requeued["data"]["reason"] == "lease_expired" and requeued["data"]["previous"] == "running"
    # re-queued when the lease ran out: it was last renewed at most LEASE_RENEW s before the kill, and
    # the sweeper runs every LEASE_RENEW s (plus a few seconds' slack for a loaded machine)
    waited_s = (event_ms(requeued) - killed_ms) / 1000
    assert LEASE_EXPIRE - LEASE_RENEW - 0.1 <= waited_s <= LEASE_EXPIRE + LEASE_RENEW + 5, waited_s
    assert event_ms(status[3]) >= event_ms(requeued)
    assert pruned_blocks_by_attempt(items) == [[1], [2]]  # resumed from the surviving checkpoint
    assert_one_clean_artifact_set(faults, job_id)
    assert job_id in faults.broker_job_ids()  # the dead worker's message: still unacked, superseded
    assert metric(faults, "prune_requeues_total") == requeues + 1
    assert metric(faults, "prune_leases_expired_total") >= 1
    assert metric(faults, "prune_workers_live") >= 1

    # the zombie's late writes are refused, whatever it tries
    store = JobStore(faults.r)
    before, record = events(faults, job_id), faults.r.get(f"prune:job:{job_id}")
    with pytest.raises(Fenced):
        lifecycle.progress(store, job_id, old_token, JobProgress(stage="pruning", block=2))
    with pytest.raises(Fenced):
        lifecycle.publish(store, job_id, old_token, "artifacts", {"files": []})
    with pytest.raises(Fenced):
        lifecycle.finish(store, job_id, old_token, JobStatus.failed)
    with pytest.raises(Fenced):
        lifecycle.check_held(store, job_id, old_token)  # asked before every artifact upload
    assert not lifecycle.renew(store, job_id, old_token, "zombie", 60)
    with pytest.raises(lifecycle.Superseded):  # its message, once the broker redelivers it
        lifecycle.claim(store, job_id, old_token, worker="zombie", cap=3, lease_s=60)
    assert events(faults, job_id) == before and faults.r.get(f"prune:job:{job_id}") == record
    assert_one_clean_artifact_set(faults, job_id)


def test_upload_failure_requeues_and_the_retry_uploads_without_pruning_again(faults: FaultStack) -> None:
    artifacts = faults.artifacts
    moved = artifacts.with_name("artifacts.saved")
    artifacts.rename(moved)
    artifacts.write_text("not a directory")  # every upload attempt now fails with an OSError
    try:
        job_id = faults.submit(evaluation={"enabled": False})

        def given_back(job: dict[str, Any]) -> bool:
            return any(e["data"].get("reason") == "upload_failed" for e in events(faults, job_id))

        faults.wait(job_id, given_back, "re-queued after its upload failed")
    finally:
        artifacts.unlink()
        moved.rename(artifacts)  # storage is back before the next attempt starts (1.6 s later)
    job = faults.wait_done(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2, (job, faults.logs("worker"))
    items = events(faults, job_id)
    second = max(i for i, e in enumerate(items) if e["type"] == "status" and e["data"]["status"] == "running")
    stages = {e["data"]["stage"] for e in items[second:] if e["type"] == "progress"}
    assert stages == {"uploading"}  # no loading, calibrating or pruning again
    logs = [e["data"]["message"] for e in items[second:] if e["type"] == "log"]
    assert "re-using the output exported by an earlier attempt" in logs
    assert_one_clean_artifact_set(faults, job_id)


def test_job_that_kills_its_worker_fails_after_the_cap_and_the_next_job_runs(faults: FaultStack) -> None:
    rx = Receiver()
    try:
        # SIGKILLs its pool child while loading, every attempt; its completion webhook must still come
        poison = faults.submit("poison", webhook={"url": rx.url, "events": ["completed"]})
        job = faults.wait_done(poison)
        assert job["status"] == "failed", job
        assert job["attempts"] == 3
        assert job["error"]["code"] == "worker_lost"
        assert job["error"]["message"] == "worker died 3 times while running this job"
        assert faults.job_files(poison) == []
        after = faults.submit()
        assert faults.wait_done(after)["status"] == "succeeded"
        deadline = time.monotonic() + 30
        while not rx.received:
            assert time.monotonic() < deadline, faults.logs("worker")
            time.sleep(0.1)
        time.sleep(1)  # room for a second (wrong) delivery
    finally:
        rx.close()
    [(headers, raw)] = rx.received  # the job failed at the cap: exactly one `job.failed`, signed
    verify(WEBHOOK_SECRET, headers, raw)
    msg = json.loads(raw)
    assert msg["type"] == "job.failed" and msg["data"]["error"]["code"] == "worker_lost"
    assert msg["data"]["attempts"] == 3
