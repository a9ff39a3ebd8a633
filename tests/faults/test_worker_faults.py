"""Worker deaths: the pool child or the whole worker SIGKILLed mid-job, and a job that always kills it."""

from __future__ import annotations

import json
import signal

import pytest

from jobs.storage.base import INDEX_NAME
from tests.faults.conftest import VISIBILITY_TIMEOUT, FaultStack

pytestmark = pytest.mark.faults


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


def test_pool_child_sigkilled_mid_pruning_is_requeued_and_succeeds(faults: FaultStack) -> None:
    job_id = faults.submit("kill-child")
    faults.wait_stage(job_id, "pruning", block=1)  # held there on attempt 1
    plant_partial_outputs(faults, job_id)
    faults.pool_child().send_signal(signal.SIGKILL)  # WorkerLostError -> rejected -> requeued at once
    job = faults.wait_done(job_id)
    assert job["status"] == "succeeded", (job, faults.logs("worker"))
    assert job["attempts"] == 2
    statuses = [
        e["data"]["status"]
        for e in faults.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
        if e["type"] == "status"
    ]
    assert statuses == ["queued", "running", "running", "succeeded"]
    assert_one_clean_artifact_set(faults, job_id)


def test_whole_worker_sigkilled_is_redelivered_after_visibility_timeout(faults: FaultStack) -> None:
    job_id = faults.submit("kill-worker")
    faults.wait_stage(job_id, "pruning", block=1)
    plant_partial_outputs(faults, job_id)
    faults.kill_worker()  # main process and pool child: the message stays unacked in Redis
    assert job_id in faults.broker_job_ids()  # unacked (or already swept back): never lost
    assert faults.job(job_id)["status"] == "running"
    faults.stack.start_worker()  # the unacked message is restored once older than the visibility timeout
    job = faults.wait_done(job_id, timeout=VISIBILITY_TIMEOUT + 120)
    assert job["status"] == "succeeded", (job, faults.logs("worker"))
    assert job["attempts"] == 2
    assert_one_clean_artifact_set(faults, job_id)


def test_job_that_kills_its_worker_fails_after_the_cap_and_the_next_job_runs(faults: FaultStack) -> None:
    poison = faults.submit("poison")  # SIGKILLs its pool child at pruning block 1, every attempt
    job = faults.wait_done(poison)
    assert job["status"] == "failed", job
    assert job["attempts"] == 3
    assert job["error"]["code"] == "worker_lost"
    assert job["error"]["message"] == "worker died 3 times while running this job"
    assert faults.job_files(poison) == []
    after = faults.submit()
    assert faults.wait_done(after)["status"] == "succeeded"
