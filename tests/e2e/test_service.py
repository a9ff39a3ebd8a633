"""End to end over HTTP: real Redis, API (uvicorn), Celery worker and engine on tiny models."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.signing import Signer
from tests import tiny_models
from tests.service_fixtures import Service

pytestmark = pytest.mark.e2e
TERMINAL = {"succeeded", "failed", "cancelled"}
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api_url, timeout=httpx.Timeout(30, read=120)) as c:
        yield c


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "small": tiny_models.save("llama", root / "small"),
        "big": tiny_models.save("llama", root / "big", layers=12, hidden=256),
    }


def small_request(source: Path | str) -> dict[str, Any]:
    return {
        "model": {"source": str(source)},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2},
    }


def sse(http: httpx.Client, job_id: str, last_event_id: str | None = None) -> Iterator[dict[str, Any]]:
    """Parse the job's SSE stream into {id, event, data} dicts until the server ends it."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id:
        headers["Last-Event-ID"] = last_event_id
    with http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                if "data" in ev:
                    yield ev
                ev = {}
            elif line.startswith("id: "):
                ev["id"] = line[4:]
            elif line.startswith("event: "):
                ev["event"] = line[7:]
            elif line.startswith("data: "):
                ev["data"] = json.loads(line[6:])


def wait_status(http: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['status']}")


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    return r.json()


def test_job_lifecycle_artifacts_and_resume(
    service: Service, http: httpx.Client, models, tmp_path: Path
) -> None:
    body = small_request(models["small"])
    r = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    retry = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "e2e-1"})
    assert retry.status_code == 200 and retry.json()["id"] == job_id

    events = list(sse(http, job_id))
    kinds = [e["event"] for e in events]
    states = [e["data"]["status"] for e in events if e["event"] == "status"]
    assert states == ["queued", "running", "succeeded"], states
    stages = {e["data"]["stage"] for e in events if e["event"] == "progress"}
    assert {"loading", "calibrating", "pruning", "evaluating", "exporting", "uploading"} <= stages
    blocks = [
        e["data"]["block"] for e in events if e["event"] == "progress" and e["data"]["stage"] == "pruning"
    ]
    assert 2 in blocks
    assert kinds.index("artifacts") < len(kinds) - 1  # artifacts stored before success is recorded

    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 1 and job["progress"]["fraction"] == 1.0
    s = job["summary"]
    assert s["sparsity"] == pytest.approx(0.5) and s["dense_ppl"] > 1 and s["pruned_ppl"] > 1
    assert s["durations"]["total_s"] > 0

    # resume: only the events after Last-Event-ID
    mid = events[len(events) // 2]["id"]
    resumed = list(sse(http, job_id, last_event_id=mid))
    assert [e["id"] for e in resumed] == [e["id"] for e in events[len(events) // 2 + 1 :]]

    # every artifact through its signed URL over HTTP
    listing = http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    names = {a["name"] for a in listing}
    assert {"report.json", "report.md", "manifest.json", "model/config.json"} <= names
    assert any(n.startswith("model/") and n.endswith(".safetensors") for n in names)
    dl = tmp_path / "download"
    for a in listing:
        resp = httpx.get(a["url"], timeout=60)
        assert resp.status_code == 200, (a["name"], resp.text)
        assert len(resp.content) == a["size"] and hashlib.sha256(resp.content).hexdigest() == a["sha256"]
        (dl / a["name"]).parent.mkdir(parents=True, exist_ok=True)
        (dl / a["name"]).write_bytes(resp.content)
    manifest = json.loads((dl / "manifest.json").read_text())["files"]
    assert set(manifest) == names - {"manifest.json"}
    for rel, meta in manifest.items():
        data = (dl / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"] and len(data) == meta["size"], rel

    # the downloaded model loads and has the requested 2:4 sparsity
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dl / "model")
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert len(linears) == 2 * 7
    for lin in linears:
        w = lin.weight.detach()
        assert (w == 0).float().mean().item() == pytest.approx(0.5)
        assert ((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()

    # tampered and expired URLs are refused
    url = next(a["url"] for a in listing if a["name"] == "report.json")
    assert_problem(httpx.get(url.replace("report.json", "report.md")), 403)
    assert_problem(httpx.get(url[:-1] + ("0" if url[-1] != "0" else "1")), 403)
    past = int(time.time()) - 10
    sig = Signer(service.signing_key.encode()).sign("default", job_id, "report.json", past)
    expired = assert_problem(
        http.get(f"/v1/artifacts/default/{job_id}/report.json?expires={past}&sig={sig}"), 403
    )
    assert "expired" in expired["detail"]


def test_failed_job_has_clear_error_and_no_artifacts(service: Service, http: httpx.Client) -> None:
    missing = str(service.home / "does" / "not" / "exist")  # inside an allowed root, but absent
    r = http.post("/v1/jobs", json=small_request(missing))
    job_id = r.json()["id"]
    events = list(sse(http, job_id))
    assert events[-1]["data"]["status"] == "failed"
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "model_load_error"
    assert missing in job["error"]["message"] and "Traceback" not in job["error"]["message"]
    assert_problem(http.get(f"/v1/jobs/{job_id}/artifacts"), 409)
    assert not (service.artifacts_dir / "default" / job_id).exists()


def test_cancel_running_and_queued_jobs(service: Service, http: httpx.Client, models) -> None:
    big = {
        "model": {"source": str(models["big"])},
        "prune": {"method": "wanda", "sparsity": 0.5},
        "calibration": {"source": "wikitext2", "nsamples": 64, "seqlen": 128},
        "evaluation": {"enabled": False},
    }
    running_id = http.post("/v1/jobs", json=big).json()["id"]
    queued_id = http.post("/v1/jobs", json=small_request(models["small"])).json()["id"]

    stream = sse(http, running_id)
    for ev in stream:
        if ev["event"] == "progress" and ev["data"]["stage"] == "pruning" and ev["data"]["block"]:
            break
    # the worker is busy (concurrency 1): the second job is still queued; cancel it first
    r = http.post(f"/v1/jobs/{queued_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = http.post(f"/v1/jobs/{running_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelling", r.json()
    rest = list(stream)
    assert rest[-1]["event"] == "status" and rest[-1]["data"]["status"] == "cancelled"
    assert [e["data"]["status"] for e in rest if e["event"] == "status"] == ["cancelling", "cancelled"]
    job = http.get(f"/v1/jobs/{running_id}").json()
    assert job["status"] == "cancelled" and job["progress"]["stage"] == "pruning"
    assert job["progress"]["block"] < job["progress"]["nblocks"]  # stopped between blocks
    assert_problem(http.get(f"/v1/jobs/{running_id}/artifacts"), 409)
    assert not (service.artifacts_dir / "default" / running_id).exists()
    assert_problem(http.post(f"/v1/jobs/{running_id}/cancel"), 409)

    # the worker receives the cancelled job's task and skips it: it never starts
    deadline = time.monotonic() + 60
    while "prune_queue_depth 0.0" not in http.get("/metrics").text and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    job = http.get(f"/v1/jobs/{queued_id}").json()
    assert job["status"] == "cancelled" and job["attempts"] == 0 and job["started_at"] is None
    items = http.get(f"/v1/jobs/{queued_id}/events").json()["items"]
    assert [e["data"]["status"] for e in items] == ["queued", "cancelled"]


def test_problems_over_http(service: Service, http: httpx.Client) -> None:
    assert_problem(http.get("/v1/jobs/" + "0" * 20), 404)
    body = assert_problem(http.post("/v1/jobs", json={"model": {"source": "x"}, "bogus": 1}), 422)
    assert body["errors"][0]["loc"][-1] == "bogus"
    assert_problem(http.post("/v1/jobs", content=b"x" * (2 * 1024 * 1024)), 413)
    assert http.get("/readyz").json()["status"] == "ok"
