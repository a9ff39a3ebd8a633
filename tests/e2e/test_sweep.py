"""Sweeps and zero-shot tasks over the real stack (Redis, uvicorn API, Celery worker, prunectl)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from prunectl.cli import EXIT_GATE, main
from tests import tiny_models
from tests.e2e.test_service import assert_problem, wait_status
from tests.service_fixtures import Service

pytestmark = pytest.mark.e2e

LABELS = ["wanda-0.3", "wanda-0.5", "wanda-0.7"]


def request(model: Path, **extra: Any) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "prune": {"method": "wanda"},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 3, "generations": 1},
        **extra,
    }


def events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        params = {"limit": 1000, **({"after": after} if after else {})}
        page = http.get(f"/v1/jobs/{job_id}/events", params=params).json()
        if not page["items"]:
            return out
        out += page["items"]
        after = page["next"]


def test_sweep_with_a_gate_that_cannot_pass(service: Service, tmp_path: Path) -> None:
    model = tiny_models.save("llama", tmp_path / "tiny")
    spec = request(model, sweep={"sparsities": [0.3, 0.5, 0.7]}, gate={"max_pruned_ppl": 1.0})
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    out, err, dest = io.StringIO(), io.StringIO(), tmp_path / "dl"
    argv = [
        "--url",
        service.api_url,
        "--json",
        "submit",
        "--spec",
        str(path),
        "--wait",
        "--download",
        str(dest),
    ]
    assert main(argv, out, err) == EXIT_GATE, err.getvalue()
    job = json.loads(out.getvalue())
    summary = job["summary"]
    assert job["status"] == "succeeded" and summary["gate"]["passed"] is False
    assert summary["gate"]["variant"] is None and summary["variant"] == "wanda-0.7"
    assert [v["label"] for v in summary["variants"]] == LABELS
    assert [v["passed"] for v in summary["variants"]] == [False, False, False]

    # three artifact sets, each with its model and report; the top-level report has the curve
    with httpx.Client(base_url=service.api_url) as http:
        listed = {a["name"]: a for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]}
        evs = events(http, job["id"])
    for label in LABELS:
        assert f"variants/{label}/model/config.json" in listed
        assert f"variants/{label}/report.json" in listed
        vrep = json.loads((dest / "variants" / label / "report.json").read_text())
        assert vrep["variant"] == label and vrep["gate"]["passed"] is False
    report = json.loads((dest / "report.json").read_text())
    assert [v["label"] for v in report["sweep"]["variants"]] == LABELS
    assert report["sweep"]["captures"] == 1
    png = dest / "plots" / "sweep_ppl.png"
    assert hashlib.sha256(png.read_bytes()).hexdigest() == listed["plots/sweep_ppl.png"]["sha256"]
    md = (dest / "report.md").read_text()
    assert "## Sweep" in md and "No variant passes the gate." in md and "Quality gate: FAILED" in md

    # the dense baseline is measured once, before any variant; each variant is evaluated once
    progress = [e["data"] for e in evs if e["type"] == "progress"]
    first_prune = next(i for i, p in enumerate(progress) if p["stage"] == "pruning")
    dense = [i for i, p in enumerate(progress) if p["message"].startswith("dense perplexity")]
    assert dense and max(dense) < first_prune
    assert all(progress[i]["variant"] is None for i in dense)
    assert report["evaluation"]["dense_cached"] is False and "dense_eval_s" in summary["durations"]
    for label in LABELS:
        mine = [p for p in progress if p["variant"] == label]
        assert {p["stage"] for p in mine} >= {"pruning", "evaluating", "exporting"}
        assert all(p["message"].startswith(f"[{label} ") for p in mine if p["message"] != "done")
    evaluating = [p["variant"] for p in progress if "pruned perplexity" in p["message"]]
    assert sorted(set(evaluating)) == LABELS


def test_zero_shot_task_over_the_api(service: Service, tmp_path: Path) -> None:
    model = tiny_models.save("llama", tmp_path / "tiny")
    with httpx.Client(base_url=service.api_url) as http:
        unknown = request(model, evaluation={"max_windows": 1, "tasks": ["no_such_task"]})
        problem = assert_problem(http.post("/v1/jobs", json=unknown), 422)
        assert problem["errors"][0]["loc"] == ["body", "evaluation", "tasks", 0]
        assert "no_such_task" in problem["detail"]

        body = request(model, prune={"method": "wanda", "pattern": "2:4"}, outputs={"model": False},
                       evaluation={"max_windows": 1, "generations": 0, "tasks": ["tiny_mc"]})  # fmt: skip
        r = http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job = wait_status(http, r.json()["id"], {"succeeded", "failed"}, timeout=300)
        assert job["status"] == "succeeded", job["error"]
        [task] = job["summary"]["tasks"]
        assert task["task"] == "tiny_mc" and task["metric"] == "acc"
        assert 0 <= task["dense"] <= 1 and 0 <= task["pruned"] <= 1
        listed = {a["name"]: a for a in http.get(f"/v1/jobs/{job['id']}/artifacts").json()["artifacts"]}
        report = httpx.get(listed["report.json"]["url"]).json()
        [score] = report["evaluation"]["tasks"]
        assert score["samples"] == 8 and score["dense"] == task["dense"] and score["pruned"] == task["pruned"]
        md = httpx.get(listed["report.md"]["url"]).text
        assert "## Zero-shot tasks (lm-evaluation-harness)" in md and "| tiny_mc | acc |" in md
