"""Sweeps fanned out over workers, on the real stack: Redis, the uvicorn API and two Celery workers
(prefork, concurrency 1 each). Each variant is a job of its own; the last gather step writes the
sweep's report (docs/reliability.md, "Sweeps fan out")."""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from core.run import pipeline
from core.spec import RunSpec
from jobs.spec import Job, JobStatus
from jobs.store import JobStore
from scripts.stack import Stack
from tests import tiny_models
from tests.service_fixtures import DATA_DIR, SIGNING_KEY

pytestmark = pytest.mark.e2e

TERMINAL = {"succeeded", "failed", "cancelled"}
SLOW = {"source": "wikitext2", "nsamples": 8, "seqlen": 64}
"""Calibration of the 12-block model: long enough to kill or cancel a variant mid-prune."""


@dataclass
class Fan:
    stack: Stack
    http: httpx.Client
    store: JobStore
    home: Path
    models: Path

    def submit(self, body: dict[str, Any]) -> str:
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        return self.http.get(f"/v1/jobs/{job_id}").json()

    def wait(self, what: str, pred: Callable[[], Any], timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}")

    def variants(self, job_id: str) -> dict[str, Job]:
        """The sweep's variant jobs, read from the store (they are not the tenant's to list)."""
        fan = self.store.require(job_id).fanout
        assert fan is not None
        return {label: self.store.require(i) for label, i in fan.variants.items()}

    def start_worker(self, name: str) -> None:
        self.stack.start_worker(name)


@pytest.fixture(scope="module")
def fan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fan]:
    home = tmp_path_factory.mktemp("fanout-home")
    models = home / "models"
    tiny_models.save("llama", models / "small")
    tiny_models.save("llama", models / "big", layers=12, hidden=256)
    env = {
        "PRUNE_SIGNING_KEY": SIGNING_KEY,
        "PRUNE_DATA_DIR": str(DATA_DIR),
        "PRUNE_MODEL_ROOTS": str(models),
        "PRUNE_LEASE_RENEW": "1",
        "PRUNE_LEASE_EXPIRE": "6",
        "PRUNE_MAX_ATTEMPTS": "3",
        "PRUNE_SWEEP_FANOUT": "1",
    }
    stack = Stack(home, env=env)
    try:
        stack.start_redis()
        stack.start_api()
        stack.start_worker("w1")
        stack.start_worker("w2")
        client = redis.Redis.from_url(stack.redis_url or "")
        with httpx.Client(base_url=stack.api_url, timeout=httpx.Timeout(30, read=60)) as http:
            yield Fan(stack, http, JobStore(client), home, models)
        client.close()
    finally:
        stack.stop()


def body(model: Path, sparsities: list[float], **extra: Any) -> dict[str, Any]:
    return {
        "model": {"source": str(model)},
        "prune": {"method": "wanda"},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2, "generations": 0},
        "sweep": {"sparsities": sparsities},
        **extra,
    }


def test_variants_run_on_both_workers_and_gather_like_the_serial_sweep(fan: Fan, tmp_path: Path) -> None:
    gate = {"min_sparsity": 0.45, "max_ppl_ratio": 1000.0}
    request = body(fan.models / "small", [0.5, 0.3, 0.7], gate=gate)
    job_id = fan.submit(request)
    job = fan.wait("the sweep", lambda: (j := fan.job(job_id))["status"] in TERMINAL and j)
    assert job["status"] == "succeeded", job["error"]

    # one job per variant, each with its own attempt and lease, two of them at once
    variants = fan.variants(job_id)
    assert list(variants) == ["wanda-0.5", "wanda-0.3", "wanda-0.7"]
    assert all(v.status == JobStatus.succeeded and v.attempts == 1 for v in variants.values())
    assert all(v.parent == job_id and v.tenant == "default~sweep" for v in variants.values())
    spans = sorted((v.started_at, v.finished_at) for v in variants.values())
    assert any(b[0] < a[1] for a, b in itertools.pairwise(spans)), spans  # overlapped
    listed = fan.http.get("/v1/jobs").json()
    assert [j["id"] for j in listed["items"]] == [job_id]  # variant jobs are not the tenant's

    # the same table, gate and headline as the serial sweep of the same spec on this host
    spec = RunSpec.model_validate(request)
    serial = pipeline.run(spec, tmp_path / "serial", data_dir=DATA_DIR)
    summary = job["summary"]
    assert summary["variant"] == serial.sweep.headline == "wanda-0.7"
    assert summary["gate"] == serial.gate.model_dump(mode="json")
    for row, ref in zip(summary["variants"], serial.sweep.variants, strict=True):
        assert row["label"] == ref.label and row["sparsity"] == ref.sparsity
        assert row["pruned_ppl"] == pytest.approx(ref.pruned_ppl, rel=1e-6)
        assert row["passed"] == ref.gate.passed

    # one artifact set: every variant's files under variants/, the sweep's report on top
    names = {a["name"] for a in fan.http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]}
    for label in variants:
        assert {f"variants/{label}/model/config.json", f"variants/{label}/report.json"} <= names
    assert {"report.json", "manifest.json", "plots/sweep_ppl.png"} <= names
    assert not (fan.home / "artifacts" / "default~sweep").exists() or not any(
        (fan.home / "artifacts" / "default~sweep").iterdir()
    )  # the variants' copies went once gathered

    # the sweep's stream shows every variant's progress
    evs = fan.http.get(f"/v1/jobs/{job_id}/events?limit=1000").json()["items"]
    seen = {
        e["data"].get("variant") for e in evs if e["type"] == "progress" and e["data"]["stage"] == "pruning"
    }
    assert set(variants) <= seen
    exported = {
        e["data"]["variant"]
        for e in evs
        if e["type"] == "progress" and e["data"]["message"].endswith("] exported")
    }
    assert exported == set(variants)  # each variant's last step, as the web page's sweep view reads it
    fracs = [e["data"]["fraction"] for e in evs if e["type"] == "progress"]
    assert max(fracs) <= 1.0 and job["progress"]["fraction"] == 1.0


def test_a_killed_worker_costs_one_variant(fan: Fan) -> None:
    job_id = fan.submit(body(fan.models / "big", [0.3, 0.5], calibration=SLOW))

    def running_variant() -> tuple[str, Job] | None:
        try:
            found = fan.variants(job_id)
        except AssertionError:
            return None
        held = [
            (x, v)
            for x, v in found.items()
            if v.status == JobStatus.running and v.progress.stage == "pruning"
        ]
        return held[0] if held else None

    label, victim = fan.wait("a variant pruning", running_variant)
    owner = fan.store.lease_owner(victim.id) or ""
    name = next(n for n in ("w1", "w2") if owner.endswith(f":{fan.stack.procs[n].pid}"))
    fan.stack.stop_process(name, sig=signal.SIGKILL)  # the whole worker: main process and pool
    try:
        job = fan.wait("the sweep", lambda: (j := fan.job(job_id))["status"] in TERMINAL and j, timeout=300)
    finally:
        fan.start_worker(name)
    assert job["status"] == "succeeded", job["error"]
    variants = fan.variants(job_id)
    assert variants[label].attempts == 2  # only the killed variant ran again
    assert [v.attempts for x, v in variants.items() if x != label] == [1]
    assert job["attempts"] == 2  # the sweep: its fan-out, then its gather step


def test_cancelling_the_sweep_stops_its_variants(fan: Fan) -> None:
    job_id = fan.submit(body(fan.models / "big", [0.3, 0.5, 0.6, 0.7], calibration=SLOW))
    fan.wait("a variant running", lambda: fan.store.require(job_id).fanout and any(
        v.status == JobStatus.running for v in fan.variants(job_id).values()))  # fmt: skip
    r = fan.http.post(f"/v1/jobs/{job_id}/cancel")
    assert r.status_code in (200, 202), r.text
    job = fan.wait("the sweep", lambda: (j := fan.job(job_id))["status"] in TERMINAL and j)
    assert job["status"] == "cancelled"
    ended = {JobStatus.cancelled, JobStatus.succeeded}
    states = fan.wait(
        "every variant finished",
        lambda: (s := {v.status for v in fan.variants(job_id).values()}) <= ended and s,
    )
    assert JobStatus.cancelled in states
    assert fan.http.get(f"/v1/jobs/{job_id}/artifacts").status_code == 409  # nothing to download
    stored = fan.home / "artifacts"
    for v in fan.variants(job_id).values():
        if v.status == JobStatus.cancelled:
            assert not (stored / v.tenant / v.id).exists()
    assert not (stored / "default" / job_id).exists()
