"""The OpenAPI document's security matches the configuration (issue 13, item 9)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from api.app import create_app
from jobs.auth import KeyRing
from jobs.settings import Settings
from jobs.sources import SourcePolicy


def _operations(schema: dict) -> list[tuple[str, dict]]:
    return [(f"{m.upper()} {p}", op) for p, item in schema["paths"].items() for m, op in item.items()]


def _schema(settings: Settings, keyring: KeyRing) -> dict:
    app = create_app(settings, keyring=keyring, sources=SourcePolicy(model_roots=[Path("/models")]))
    with TestClient(app) as c:
        return c.get("/openapi.json").json()


def test_open_mode_requires_no_authorization(settings: Settings) -> None:
    schema = _schema(settings, KeyRing())
    needing = [name for name, op in _operations(schema) if op.get("security")]
    assert needing == []
    assert "securitySchemes" not in schema.get("components", {})
    with TestClient(create_app(settings, keyring=KeyRing())) as c:
        assert c.get("/v1/jobs").status_code == 200  # and it indeed serves without one


def test_keyed_mode_requires_bearer_on_v1(settings: Settings) -> None:
    schema = _schema(settings, KeyRing.from_string("acme:0123456789abcdef0123"))
    ops = dict(_operations(schema))
    for name in ("POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}", "POST /v1/jobs/{job_id}/cancel"):
        assert ops[name]["security"] == [{"HTTPBearer": []}], name
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
