"""API tests: the real app (TestClient) on a real redis-server; no worker consumes the queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.settings import Settings
from jobs.sources import SourcePolicy
from tests.service_fixtures import key_prefix, redis_client, redis_url  # noqa: F401


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, key_prefix: str) -> Settings:  # noqa: F811
    return Settings(
        redis_url=redis_url,
        home=tmp_path,
        public_url="http://testserver",
        signing_key="api-test-key",
        queue=f"{key_prefix}.gpu",
        key_prefix=key_prefix,
        max_body=64 * 1024,
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    app = create_app(settings, sources=SourcePolicy(model_roots=[Path("/models")]))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
