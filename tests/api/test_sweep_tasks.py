"""Sweeps and zero-shot tasks at submit time: refused with a problem naming the field, nothing stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from jobs.settings import Settings
from jobs.sources import SourcePolicy

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"
PROBLEM = "application/problem+json"


@pytest.fixture
def data_client(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "data"
    shutil.copytree(TASKS, data / "lm_eval_tasks")
    (data / "lm_eval_tasks" / "no_data").mkdir()
    (data / "lm_eval_tasks" / "no_data" / "no_data.yaml").write_text("task: no_data\n")
    with_data = settings.model_copy(update={"data_dir": data})
    app = create_app(with_data, sources=SourcePolicy(model_roots=[Path("/models")]))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def body(**extra: object) -> dict:
    return {"model": {"source": "/models/llama"}, **extra}


@pytest.mark.parametrize(
    ("extra", "loc", "says"),
    [
        (
            {"sweep": {"sparsities": [0.3]}, "prune": {"pattern": "2:4"}},
            ["body", "sweep"],
            "add 'unstructured'",
        ),
        ({"sweep": {"patterns": ["2:4"]}, "prune": {"variant": True}}, ["body", "sweep"], "variant=true"),
        ({"sweep": {"sparsities": [1.5]}}, ["body", "sweep", "sparsities"], "(0, 1)"),
        ({"evaluation": {"tasks": ["no_such_task"]}}, ["body", "evaluation", "tasks", 0], "hub is offline"),
        (
            {"evaluation": {"tasks": ["tiny_mc", "no_data"]}},
            ["body", "evaluation", "tasks", 1],
            "no data file",
        ),
        ({"evaluation": {"tasks": ["../etc"]}}, ["body", "evaluation", "tasks"], "task name"),
    ],
)
def test_refused_at_submit(data_client: TestClient, extra: dict, loc: list, says: str) -> None:
    r = data_client.post("/v1/jobs", json=body(**extra))
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    err = r.json()["errors"][0]
    assert err["loc"] == loc and says in err["msg"]
    assert data_client.get("/v1/jobs").json()["items"] == []


def test_local_task_and_sweep_are_accepted(data_client: TestClient) -> None:
    r = data_client.post(
        "/v1/jobs", json=body(sweep={"sparsities": [0.3, 0.5]}, evaluation={"tasks": ["tiny_mc"]})
    )
    assert r.status_code == 201, r.text
    assert r.json()["request"]["sweep"]["sparsities"] == [0.3, 0.5]
