"""Job records that do not parse, against a real redis-server: every sweep and store path handles them
once instead of raising on every pass (the queue is the only fake: it records what would be sent)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from jobs import lifecycle, metrics, retention
from jobs.signing import Signer
from jobs.spec import JobRequest, JobStatus
from jobs.storage.local import LocalArtifactStore
from jobs.store import JobStore
from tests.jobs.test_outbox import Recorder

S = JobStatus
REQUEST = JobRequest.model_validate({"model": {"source": "/models/a"}})


def poison(store: JobStore, job_id: str, raw: bytes | None = None) -> None:
    """A record the spec refuses: the `null` gate an infinite limit used to leave, or `raw` bytes."""
    if raw is None:
        record = json.loads(store.r.get(store.keys.job_key(job_id)) or b"{}")
        record["request"]["gate"] = {"max_pruned_ppl": None}
        raw = json.dumps(record).encode()
    store.r.set(store.keys.job_key(job_id), raw)


def statuses(store: JobStore, job_id: str) -> list[str]:
    rows = store.r.xrange(f"{store.prefix}:events:{job_id}")
    return [json.loads(f[b"data"])["status"] for _, f in rows if f[b"type"] == b"status"]


def test_the_outbox_sweep_fails_an_unreadable_queued_job_once(store: JobStore) -> None:
    bad, _ = store.create("default", REQUEST)
    good, _ = store.create("default", REQUEST)
    poison(store, bad.id)
    store.r.zadd(store.keys.outbox_key, {bad.id: time.time() - 60, good.id: time.time() - 60})
    queue = Recorder()
    assert lifecycle.resend_unsent(store, queue, 10) == [good.id]  # the good one is still sent
    assert [job_id for job_id, _ in queue.sent] == [good.id]
    assert store.outbox() == []  # the good one sent and confirmed, the bad one failed
    assert statuses(store, bad.id) == ["queued", "failed"]
    assert store.active_count("default") == 1 and metrics.status_counts(store)["failed"] == 1
    lifecycle.resend_unsent(store, queue, 0)  # a second pass changes nothing for it
    assert statuses(store, bad.id) == ["queued", "failed"]


def test_the_lease_sweep_fails_an_unreadable_running_job_once(store: JobStore) -> None:
    job, _ = store.create("default", REQUEST)
    lifecycle.claim(store, job.id, job.delivery, worker="w:1", cap=3, lease_s=0.05)
    poison(store, job.id)
    time.sleep(0.1)
    assert lifecycle.sweep_leases(store, Recorder(), cap=3) == []
    assert statuses(store, job.id) == ["queued", "running", "failed"]
    assert store.leases() == [] and not store.r.exists(store.keys.lease_key(job.id))
    assert store.active_count("default") == 0


def test_a_record_that_is_not_json_is_listed_cancelled_and_deleted(store: JobStore, tmp_path: Path) -> None:
    job, _ = store.create("default", REQUEST)
    poison(store, job.id, b"\x00 not json")
    page = store.list("default")
    assert page.items == [] and [(u.id, u.tenant) for u in page.unreadable] == [(job.id, "default")]
    assert store.status_of(job.id) is None
    info, changed = store.end_unreadable(job.id, S.cancelled, tenant="default") or (None, False)
    assert changed and info is not None and info.status == S.cancelled  # its status from the indexes
    assert store.status_of(job.id) == S.cancelled and store.active_count("default") == 0
    assert store.end_unreadable(job.id, S.cancelled, tenant="default") == (info, False)  # once
    assert "Invalid JSON" in info.error.message  # the original reason, kept in the rewritten record
    artifacts = LocalArtifactStore(tmp_path, Signer(b"k"), "http://x")
    assert retention.sweep(store, artifacts, older_than_s=-1) == [job.id]  # retention deletes it
    assert store.r.get(store.keys.job_key(job.id)) is None and metrics.status_counts(store)["cancelled"] == 0


def test_a_tenant_at_its_limit_is_not_locked_out_by_unreadable_jobs(store: JobStore) -> None:
    jobs = [store.create("t", REQUEST, max_active=2)[0] for _ in range(2)]
    for job in jobs:
        poison(store, job.id)
    _, created = store.create("t", REQUEST, max_active=2)  # both released (failed), then created
    assert created and store.active_count("t") == 1
    assert all(statuses(store, j.id) == ["queued", "failed"] for j in jobs)
