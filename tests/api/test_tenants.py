"""API keys, tenant isolation and the per-tenant active-job limit (real app on a real Redis)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.auth import KeyRing, Tenant, hash_key
from jobs.settings import Settings
from jobs.sources import SourcePolicy

BODY = {"model": {"source": "/models/tiny"}, "prune": {"method": "wanda", "pattern": "2:4"}}
KEYS = {"alpha": "alpha-key-0123456789", "beta": "beta-key-0123456789"}


@pytest.fixture
def keyed(settings: Settings) -> Iterator[TestClient]:
    ring = KeyRing(
        [(hash_key(KEYS["alpha"]), Tenant("alpha", 2)), (hash_key(KEYS["beta"]), Tenant("beta", 3))]
    )
    app = create_app(settings, keyring=ring, sources=SourcePolicy(model_roots=[Path("/models")]))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_unauthenticated_is_401_problem(keyed: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = keyed.get("/v1/jobs", headers=headers)
        assert r.status_code == 401 and r.headers["content-type"].startswith("application/problem+json")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["status"] == 401
    assert keyed.get("/healthz").status_code == 200


def test_limit_429_with_retry_after_then_frees_on_cancel(keyed: TestClient) -> None:
    ids = [keyed.post("/v1/jobs", json=BODY, headers=auth("alpha")).json()["id"] for _ in range(2)]
    r = keyed.post("/v1/jobs", json=BODY, headers=auth("alpha"))
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0 and r.json()["limit"] == 2
    # the limit is per tenant
    assert keyed.post("/v1/jobs", json=BODY, headers=auth("beta")).status_code == 201
    # an idempotent replay is still answered at the limit
    first = keyed.post("/v1/jobs", json=BODY, headers={**auth("beta"), "Idempotency-Key": "k"})
    again = keyed.post("/v1/jobs", json=BODY, headers={**auth("beta"), "Idempotency-Key": "k"})
    assert first.status_code == 201 and again.status_code == 200
    assert keyed.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth("alpha")).json()["status"] == "cancelled"
    assert keyed.post("/v1/jobs", json=BODY, headers=auth("alpha")).status_code == 201


def test_limit_is_atomic_under_concurrency(keyed: TestClient) -> None:
    def submit(_: int) -> int:
        return keyed.post("/v1/jobs", json=BODY, headers=auth("beta")).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(submit, range(12)))
    assert codes.count(201) == 3 and codes.count(429) == 9


def test_other_tenants_jobs_are_404(keyed: TestClient) -> None:
    job_id = keyed.post("/v1/jobs", json=BODY, headers=auth("alpha")).json()["id"]
    for method, path in (
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("GET", f"/v1/jobs/{job_id}/artifacts"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ):
        r = keyed.request(method, path, headers=auth("beta"))
        assert r.status_code == 404 and r.json()["detail"] == f"no job {job_id}", path
    assert keyed.get("/v1/jobs", headers=auth("beta")).json()["items"] == []
    assert keyed.get(f"/v1/jobs/{job_id}", headers=auth("alpha")).status_code == 200


def test_refused_sources_and_webhooks_are_422(keyed: TestClient, tmp_path: Path) -> None:
    for source in ("/etc/passwd", "/models/../etc", "meta-llama/Llama-3.1-8B", "s3://bucket/m"):
        r = keyed.post("/v1/jobs", json={**BODY, "model": {"source": source}}, headers=auth("alpha"))
        assert r.status_code == 422, source
        assert r.json()["errors"][0]["loc"] == ["body", "model", "source"]
    hook = {**BODY, "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["completed"]}}
    r = keyed.post("/v1/jobs", json=hook, headers=auth("alpha"))
    assert r.status_code == 422 and "webhook" in r.json()["detail"]  # no secret configured here
    bad_event = {**BODY, "webhook": {"url": "https://example.com/h", "events": ["finished"]}}
    assert keyed.post("/v1/jobs", json=bad_event, headers=auth("alpha")).status_code == 422


def test_recovery_source_checked_like_calibration(keyed: TestClient) -> None:
    """recovery.source goes through the same source policy (no reading /etc/passwd by training on it)."""
    body = {**BODY, "recovery": {"enabled": True, "source": "/etc/passwd", "steps": 2}}
    r = keyed.post("/v1/jobs", json=body, headers=auth("alpha"))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["errors"][0]["loc"] == ["body", "recovery", "source"]
    ok = {**BODY, "recovery": {"enabled": True, "source": "wikitext2", "steps": 2}}
    assert keyed.post("/v1/jobs", json=ok, headers=auth("alpha")).status_code in (201, 202)
