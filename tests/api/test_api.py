"""HTTP behaviour of the API against a real Redis (jobs stay queued: no worker here)."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from jobs.queue import Queue
from jobs.settings import Settings
from jobs.signing import Signer
from jobs.sources import SourcePolicy
from jobs.storage.local import LocalArtifactStore
from scripts.stack import REPO

BODY = {"model": {"source": "/models/tiny"}, "prune": {"method": "wanda", "pattern": "2:4"}}
PROBLEM = "application/problem+json"


def assert_problem(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["title"] and "type" in body and body["instance"]
    return body


def submit(client: TestClient, body: dict | None = None, key: str | None = None):
    headers = {"Idempotency-Key": key} if key else {}
    return client.post("/v1/jobs", json=body or BODY, headers=headers)


def test_create_and_get(client: TestClient, settings: Settings, redis_client) -> None:
    r = submit(client)
    assert r.status_code == 201
    job = r.json()
    assert job["status"] == "queued" and job["tenant"] == "default" and job["attempts"] == 0
    assert job["request"]["prune"]["sparsity"] == 0.5
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert client.get(r.headers["location"]).json() == job
    assert redis_client.llen(settings.queue) == 1  # sent to the broker by task name


def test_idempotent_retry_and_conflict(client: TestClient, settings: Settings, redis_client) -> None:
    first = submit(client, key="abc")
    again = submit(client, key="abc")
    assert first.status_code == 201 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    assert redis_client.llen(settings.queue) == 1  # the replay is not queued again
    other = submit(client, {**BODY, "prune": {"method": "magnitude"}}, key="abc")
    body = assert_problem(other, 409)
    assert body["job_id"] == first.json()["id"] and "Idempotency-Key" in body["detail"]


def broker_args(redis_client, settings: Settings) -> list[list]:
    """The task arguments of the messages waiting in the broker queue."""
    return [
        json.loads(base64.b64decode(json.loads(raw)["body"]))[0]
        for raw in redis_client.lrange(settings.queue, 0, -1)
    ]


def test_create_sends_the_delivery_token_and_leaves_no_outbox_entry(
    client: TestClient, settings: Settings, redis_client
) -> None:
    job = submit(client).json()
    record = client.app.state.services.store.require(job["id"])
    assert job["delivery"] == record.delivery and len(record.delivery) == 16
    assert broker_args(redis_client, settings) == [[job["id"], record.delivery]]
    assert redis_client.zcard(f"{settings.key_prefix}:outbox") == 0  # the send was confirmed


def test_enqueue_failure_is_503_and_fails_the_job(settings: Settings, redis_client) -> None:
    app = create_app(settings, sources=SourcePolicy(model_roots=[Path("/models")]))
    svc = app.state.services
    no_broker = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})  # no broker there
    svc.queue = Queue(no_broker, redis_client)
    with TestClient(app, raise_server_exceptions=False) as c:
        body = assert_problem(submit(c), 503)
        assert body["detail"].startswith("could not queue the job")
        [job] = c.get("/v1/jobs").json()["items"]
    assert job["status"] == "failed" and job["error"]["code"] == "queue_unavailable"
    assert redis_client.zcard(f"{settings.key_prefix}:outbox") == 0  # a failed job is never re-sent
    assert svc.store.active_count("default") == 0
    assert [i for i, _ in svc.store.finished()] == [job["id"]]  # retention will delete it in time


def test_validation_problem(client: TestClient) -> None:
    body = assert_problem(submit(client, {**BODY, "webhook": "http://x"}), 422)
    assert body["errors"] and body["errors"][0]["loc"][-1] == "webhook"
    body = assert_problem(submit(client, {"model": {"source": "x"}, "prune": {"sparsity": 1.5}}), 422)
    assert any("sparsity" in e["msg"] for e in body["errors"])
    r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert_problem(r, 422)
    assert_problem(client.get("/v1/jobs?limit=0"), 422)
    assert_problem(client.get("/v1/jobs/not-an-id"), 422)


def test_not_found_method_not_allowed_and_too_large(client: TestClient) -> None:
    assert_problem(client.get("/v1/jobs/" + "0" * 20), 404)
    assert_problem(client.get("/nope"), 404)
    assert_problem(client.delete("/v1/jobs"), 405)
    big = {**BODY, "prune": {"ignore": ["x" * 1000] * 100}}
    assert_problem(submit(client, big), 413)

    def chunks():  # streamed without Content-Length
        for _ in range(100):
            yield b" " * 1024

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(r, 413)


def test_list_pagination_and_filter(client: TestClient) -> None:
    ids = [submit(client).json()["id"] for _ in range(5)]
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    page1 = client.get("/v1/jobs?limit=2").json()
    page2 = client.get(f"/v1/jobs?limit=2&after={page1['next']}").json()
    page3 = client.get(f"/v1/jobs?limit=2&after={page2['next']}").json()
    got = [j["id"] for p in (page1, page2, page3) for j in p["items"]]
    assert got == ids[::-1] and page3["next"] is None
    assert [j["id"] for j in client.get("/v1/jobs?status=cancelled").json()["items"]] == [ids[0]]
    assert_problem(client.get("/v1/jobs?status=bogus"), 422)


def test_cancel_queued_then_conflict(client: TestClient) -> None:
    job = submit(client).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    body = assert_problem(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert body["job_status"] == "cancelled"
    assert_problem(client.post("/v1/jobs/" + "1" * 20 + "/cancel"), 404)
    assert_problem(client.get(f"/v1/jobs/{job['id']}/artifacts"), 409)


def test_events_page_and_sse(client: TestClient) -> None:
    job_id = submit(client).json()["id"]
    client.post(f"/v1/jobs/{job_id}/cancel")
    page = client.get(f"/v1/jobs/{job_id}/events").json()
    assert [e["data"]["status"] for e in page["items"]] == ["queued", "cancelled"]
    first = page["items"][0]["id"]
    assert [e["id"] for e in client.get(f"/v1/jobs/{job_id}/events?after={first}").json()["items"]] == [
        page["items"][1]["id"]
    ]
    # SSE on a finished job replays its events and ends
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers={"Accept": "text/event-stream"}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    assert text.count("event: status") == 2 and f"id: {first}" in text
    # Last-Event-ID resumes after that event
    headers = {"Accept": "text/event-stream", "Last-Event-ID": first}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        text = "".join(r.iter_text())
    assert text.count("event: status") == 1 and '"status":"cancelled"' in text
    assert_problem(client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "junk"}), 422)


def test_signed_download(client: TestClient, settings: Settings, tmp_path) -> None:
    store = LocalArtifactStore(settings.artifacts_dir, Signer(b"api-test-key"), "http://testserver")
    src = tmp_path / "src"
    src.mkdir()
    (src / "report.md").write_text("# hello")
    job_id = "a" * 20
    store.upload_dir(src, f"default/{job_id}")
    url = store.download_url(f"default/{job_id}", "report.md", 60)
    r = client.get(url)
    assert r.status_code == 200 and r.text == "# hello"
    assert_problem(client.get(url.replace("sig=", "sig=0")), 403)
    assert_problem(client.get(url.replace("report.md", "report.json")), 403)
    past = int(time.time()) - 5
    sig = Signer(b"api-test-key").sign("default", job_id, "report.md", past)
    body = assert_problem(
        client.get(f"/v1/artifacts/default/{job_id}/report.md?expires={past}&sig={sig}"), 403
    )
    assert "expired" in body["detail"]
    assert_problem(client.get(f"/v1/artifacts/default/{job_id}/report.md"), 422)


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["redis"] == "ok"
    submit(client)
    text = client.get("/metrics").text
    for name in (
        'prune_jobs{status="queued"} 1.0',
        "prune_queue_depth 1.0",
        "prune_job_duration_seconds_bucket",
        "prune_http_request_duration_seconds_bucket",
        'route="/v1/jobs"',
    ):
        assert name in text, name


def test_readyz_503_when_redis_down(tmp_path) -> None:
    settings = Settings(redis_url="redis://127.0.0.1:1/0", home=tmp_path, signing_key="k")
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        body = assert_problem(c.get("/readyz"), 503)
        assert "redis" in body["detail"]


def test_openapi_documents_problems(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = {
                c for c, r in op["responses"].items() if "application/problem+json" in r.get("content", {})
            }
            assert codes, f"{method} {path} documents no problem response"
            if path.startswith("/v1/jobs/{job_id}"):
                assert "404" in codes, (method, path)
    assert {"200", "201", "409", "413", "422"} <= set(spec["paths"]["/v1/jobs"]["post"]["responses"])


def test_api_import_does_not_load_torch(tmp_path) -> None:
    code = (
        "import sys, api.app; from api.app import create_app; create_app(); "
        "bad = [m for m in ('torch', 'transformers', 'core.run.pipeline', 'worker') if m in sys.modules]; "
        "print(json.dumps(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        env={
            "PATH": "/usr/bin:/bin",
            "PRUNE_SIGNING_KEY": "k",
            "PRUNE_HOME": str(tmp_path),
        },
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
