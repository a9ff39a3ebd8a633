"""Retention seen through the API: a deleted job answers 404 and leaves the listings and metrics."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from jobs.retention import sweep
from jobs.settings import Settings
from jobs.sources import SourcePolicy
from jobs.spec import JobRequest, JobStatus
from jobs.store import JobStore, now
from tests.api.test_api import BODY, assert_problem, submit

DAY = 24 * 3600
REQUEST = JobRequest.model_validate(BODY)


def test_a_swept_job_answers_404_and_leaves_the_listing(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    svc = client.app.state.services
    old = submit(client, key="ci-42").json()["id"]
    kept = submit(client).json()["id"]
    svc.store.transition(old, [JobStatus.queued], JobStatus.running, attempts=1, started_at=now())
    src = tmp_path / "out"
    src.mkdir()
    (src / "report.md").write_text("# pruned")
    svc.artifacts.upload_dir(src, f"default/{old}")
    svc.store.transition(old, [JobStatus.running], JobStatus.succeeded)
    [artifact] = client.get(f"/v1/jobs/{old}/artifacts").json()["artifacts"]
    assert client.get(artifact["url"]).text == "# pruned"
    assert client.get(f"/v1/jobs/{old}").json()["status"] == "succeeded"

    svc.store.r.zadd(svc.store.keys.finished_key, {old: time.time() - 31 * DAY}, xx=True)
    assert sweep(svc.store, svc.artifacts, settings.retention_s) == [old]

    for path in ("", "/events", "/artifacts"):
        assert assert_problem(client.get(f"/v1/jobs/{old}{path}"), 404)["detail"] == f"no job {old}"
    assert_problem(client.post(f"/v1/jobs/{old}/cancel"), 404)
    assert_problem(client.get(artifact["url"]), 404)  # its files are gone too
    assert [j["id"] for j in client.get("/v1/jobs").json()["items"]] == [kept]
    assert client.get("/v1/jobs?status=succeeded").json()["items"] == []
    assert client.get(f"/v1/jobs/{kept}").json()["status"] == "queued"  # nothing else changed
    text = client.get("/metrics").text
    for line in (
        'prune_jobs{status="succeeded"} 0.0',
        'prune_jobs{status="queued"} 1.0',
        "prune_jobs_deleted_total 1.0",
    ):
        assert line in text, line
    again = submit(client, key="ci-42")  # the idempotency key went with the job
    assert again.status_code == 201 and again.json()["id"] not in (old, kept)


def test_each_api_process_sweeps_at_startup(settings: Settings, redis_client) -> None:
    store = JobStore(redis_client, settings.key_prefix)
    job, _ = store.create("default", REQUEST)
    store.transition(job.id, [JobStatus.queued], JobStatus.cancelled)
    store.r.zadd(store.keys.finished_key, {job.id: time.time() - 2 * DAY}, xx=True)
    recent, _ = store.create("default", REQUEST)
    store.transition(recent.id, [JobStatus.queued], JobStatus.cancelled)
    app = create_app(
        settings.model_copy(update={"retention_days": 1, "retention_interval": 3600, "outbox_interval": 0}),
        sources=SourcePolicy(model_roots=[Path("/models")]),
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        deadline = time.monotonic() + 60  # a wait for the background sweep, not a timing assertion
        while c.get(f"/v1/jobs/{job.id}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert_problem(c.get(f"/v1/jobs/{job.id}"), 404)
        assert [j["id"] for j in c.get("/v1/jobs").json()["items"]] == [recent.id]
