"""Property-based conformance of the live API: schemathesis fuzzes every operation of /openapi.json.

Real uvicorn + real redis-server (no worker: jobs stay queued). Every response must be a non-5xx with a
documented status code, content type and a body matching its schema. Bounded and derandomized.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from scripts.stack import Stack
from tests.service_fixtures import SIGNING_KEY

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    """The OpenAPI schema served by a live API process."""
    home: Path = tmp_path_factory.mktemp("schemathesis-home")
    (home / "models").mkdir()
    with Stack(home, env={"PRUNE_SIGNING_KEY": SIGNING_KEY, "PRUNE_MAX_BODY": "65536"}) as stack:
        stack.start_redis()
        api = stack.start_api()
        yield schemathesis.openapi.from_url(f"{api}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=30,
    derandomize=True,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_schema(case: schemathesis.Case) -> None:
    case.call_and_validate(checks=CHECKS)
