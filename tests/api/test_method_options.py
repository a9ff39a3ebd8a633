"""Issue 10 method options over HTTP: valid combinations are queued, undefined ones are 422 problems."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.api.test_api import assert_problem, submit

MODEL = {"source": "/models/tiny"}

ACCEPTED = [
    {"method": "ria"},
    {"method": "ria", "pattern": "2:4", "ria_permute": True, "refine": "dsnot"},
    {"method": "wanda", "allocation": "owl", "owl_m": 7, "owl_lambda": 0.05, "sparsity": 0.7},
    {"method": "sparsegpt", "allocation": "owl", "refine": "dsnot", "dsnot_iters": 10},
    {"method": "magnitude", "allocation": "owl"},
]
REFUSED = [
    ({"method": "wanda", "allocation": "owl", "pattern": "2:4"}, "unstructured sparsity only"),
    ({"method": "wanda", "allocation": "owl", "sparsity": 0.95}, "lower owl_lambda"),
    ({"method": "wanda", "owl_m": 3}, "only apply with allocation 'owl'"),
    ({"method": "wanda", "dsnot_iters": 3}, "only apply with refine 'dsnot'"),
    ({"method": "wanda", "ria_alpha": 1.0}, "only apply to method 'ria'"),
    ({"method": "ria", "ria_permute": True}, "needs pattern 'N:M'"),
    ({"method": "wanda", "allocation": "owl", "variant": True}, "variant"),
    ({"method": "wanda", "refine": "prune-harder"}, "refine"),
]


@pytest.mark.parametrize("prune", ACCEPTED)
def test_valid_method_combinations_are_queued(client: TestClient, prune: dict[str, Any]) -> None:
    r = submit(client, {"model": MODEL, "prune": prune})
    assert r.status_code == 201, r.text
    job = r.json()
    for k, v in prune.items():
        assert job["request"]["prune"][k] == v


@pytest.mark.parametrize(("prune", "needle"), REFUSED)
def test_undefined_method_combinations_are_problems(
    client: TestClient, prune: dict[str, Any], needle: str
) -> None:
    body = assert_problem(submit(client, {"model": MODEL, "prune": prune}), 422)
    assert any(needle in (e.get("msg", "") + str(e.get("loc", ""))) for e in body["errors"]), body
