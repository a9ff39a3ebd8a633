"""A poisoned job record must not take its tenant down, and every input is bounded (real Redis,
uvicorn API and Celery worker).

Non-finite numbers are refused at the door; a record that still fails to parse (edited by hand, or
written by an older version: the `null` gate limits an infinite gate used to be stored as) leaves the
tenant's listing, quota and other jobs working, answers one clear problem, can be cancelled, and is
failed once by the worker that receives its message. Bodies beyond the bounds are refused; the
largest accepted job is stored and read back whole.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobs.bounds import largest_request
from scripts.stack import Stack
from tests import tiny_models
from tests.service_fixtures import DATA_DIR, SIGNING_KEY, TASKS_DIR, WEBHOOK_SECRET

pytestmark = pytest.mark.e2e
PROBLEM = "application/problem+json"
LIMIT = 2
TASKS = [f"task{i}" + "x" * 59 for i in range(8)]


class Env:
    """The stack (started without a worker), an HTTP client, a Redis client and a small job body."""

    def __init__(self, stack: Stack, home: Path) -> None:
        self.stack, self.home = stack, home
        self.http = httpx.Client(base_url=stack.api_url, timeout=30)
        self.r = redis.Redis.from_url(stack.redis_url or "")

    def body(self, **overrides: Any) -> dict[str, Any]:
        text = str(self.home / "small.txt")
        return {
            "model": {"source": str(self.home / "tiny")},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": text, "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": text, "max_windows": 2},
            "outputs": {"model": False},
            **overrides,
        }

    def submit(self) -> str:
        r = self.http.post("/v1/jobs", json=self.body())
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def poison(self, job_id: str) -> None:
        """What an infinite gate limit used to leave in the record: `null` limits the spec refuses."""
        key = f"prune:job:{job_id}"
        record = json.loads(self.r.get(key) or b"{}")
        record["request"]["gate"] = {"max_pruned_ppl": None}
        self.r.set(key, json.dumps(record))

    def listing(self) -> dict[str, Any]:
        r = self.http.get("/v1/jobs")
        assert r.status_code == 200, r.text
        return r.json()

    def broker_job_ids(self) -> list[str]:
        raws = [*self.r.lrange("prune.gpu", 0, -1), *self.r.hvals("unacked")]
        out = []
        for raw in raws:
            msg = json.loads(raw)
            msg = msg[0] if isinstance(msg, list) else msg
            out.append(json.loads(base64.b64decode(msg["body"]))[0][0])
        return out

    def status_events(self, job_id: str) -> list[dict[str, Any]]:
        r = self.http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return [e["data"] for e in r.json()["items"] if e["type"] == "status"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("unreadable-home")
    tiny_models.save("llama", home / "tiny")
    wiki = (tiny_models.WIKITEXT / "valid.txt").read_text(encoding="utf-8")
    (home / "small.txt").write_text(wiki[:40_000], encoding="utf-8")
    data = home / "data"
    (data / "lm_eval_tasks").mkdir(parents=True)
    for entry in DATA_DIR.iterdir():
        if entry.name != "lm_eval_tasks":
            (data / entry.name).symlink_to(entry)
    for name in TASKS:  # eight task folders with the longest names (copies of the tiny test task)
        (data / "lm_eval_tasks" / name).symlink_to(TASKS_DIR / "tiny_mc")
    stack = Stack(
        home,
        env={
            "PRUNE_SIGNING_KEY": SIGNING_KEY,
            "PRUNE_DATA_DIR": str(data),
            "PRUNE_MODEL_ROOTS": str(home),
            "PRUNE_DEFAULT_MAX_ACTIVE_JOBS": str(LIMIT),
            "PRUNE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PRUNE_WEBHOOK_ALLOW_PRIVATE": "1",
        },
    )
    try:
        stack.start_redis()
        stack.start_api()
        e = Env(stack, home)
        yield e
        e.http.close()
        e.r.close()
    finally:
        stack.stop()


def is_problem(r: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["type"] == f"urn:prune:problem:{slug}", body
    return body


def test_non_finite_numbers_are_refused_and_nothing_is_stored(env: Env) -> None:
    base = json.dumps(env.body())[:-1]
    cases = {
        "gate 1e999": ', "gate": {"max_pruned_ppl": 1e999}}',
        "gate Infinity": ', "gate": {"max_ppl_ratio": Infinity}}',
        "gate -Infinity": ', "gate": {"min_sparsity": -Infinity}}',
        "sparsity NaN": ', "sweep": {"sparsities": [0.5, NaN]}}',
    }
    for case, tail in cases.items():
        r = env.http.post("/v1/jobs", content=base + tail, headers={"content-type": "application/json"})
        body = is_problem(r, 422, "validation-error")
        assert any(e["type"] == "finite_number" for e in body["errors"]), (case, body)
    assert env.r.keys("prune:job:*") == []


def test_the_100000_pattern_body_is_refused(env: Env) -> None:
    body = env.body(prune={"method": "wanda", "pattern": "2:4", "ignore": [f"{i:x}" for i in range(100_000)]})
    assert 800_000 < len(json.dumps(body)) < 1024 * 1024  # the 0.9 MB body the old 1 MiB limit let in
    is_problem(env.http.post("/v1/jobs", json=body), 413, "payload-too-large")
    body["prune"]["ignore"] = [f"l.{i}" for i in range(129)]  # small, but one pattern too many
    problem = is_problem(env.http.post("/v1/jobs", json=body), 422, "validation-error")
    assert problem["errors"][0]["loc"] == ["body", "prune", "ignore"], problem
    assert env.r.keys("prune:job:*") == []


def test_the_largest_accepted_job_is_stored_and_read_back(env: Env) -> None:
    body = largest_request(str(env.home / "tiny"), str(env.home / "small.txt"), TASKS, "http://127.0.0.1:9/")
    r = env.http.post(
        "/v1/jobs", content=json.dumps(body, indent=2), headers={"content-type": "application/json"}
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    got = env.http.get(f"/v1/jobs/{job_id}").json()
    assert got["request"]["prune"]["ignore"] == body["prune"]["ignore"]
    assert got["request"]["webhook"]["url"] == body["webhook"]["url"]
    assert env.http.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"  # frees its slot


def test_poisoned_records_leave_the_tenant_working(env: Env) -> None:
    a, b = env.submit(), env.submit()  # no worker yet: both stay queued
    env.poison(a)
    env.poison(b)

    page = env.listing()  # the tenant's listing still answers, naming the unreadable jobs
    assert {a, b}.isdisjoint(j["id"] for j in page["items"])
    assert {j["id"]: j["status"] for j in page["unreadable"]} == {a: "queued", b: "queued"}
    assert all(j["error"]["code"] == "unreadable_record" for j in page["unreadable"])

    got = is_problem(env.http.get(f"/v1/jobs/{a}"), 409, "job-unreadable")
    assert got["job_status"] == "queued" and "gate" in got["detail"] and "cancel" in got["detail"]
    is_problem(env.http.get(f"/v1/jobs/{a}/artifacts"), 409, "job-unreadable")
    assert [e["status"] for e in env.status_events(a)] == ["queued"]

    r = env.http.post(f"/v1/jobs/{a}/cancel")  # cancellable
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    is_problem(env.http.post(f"/v1/jobs/{a}/cancel"), 409, "job-finished")
    with env.http.stream("GET", f"/v1/jobs/{a}/events", headers={"accept": "text/event-stream"}) as s:
        assert s.status_code == 200
        sse = s.read().decode()  # the stream of a finished job ends by itself
    assert '"status":"cancelled"' in sse

    c = env.submit()  # a's slot is free; b still holds one
    d = env.submit()  # at the limit: b, unreadable, no longer holds its slot (failed)
    failed_b = {j["id"]: j for j in env.listing()["unreadable"]}[b]
    assert failed_b["status"] == "failed"
    assert [e["status"] for e in env.status_events(b)] == ["queued", "failed"]
    is_problem(env.http.post("/v1/jobs", json=env.body()), 429, "too-many-active-jobs")  # c, d: limit holds

    env.poison(d)  # now the worker receives an unreadable job's message
    env.stack.start_worker()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        job_c = env.http.get(f"/v1/jobs/{c}").json()
        if job_c["status"] in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(0.2)
    assert job_c["status"] == "succeeded", job_c  # the tenant's other jobs run
    deadline = time.monotonic() + 60
    while env.http.get(f"/v1/jobs/{d}").json()["job_status"] != "failed" and time.monotonic() < deadline:
        time.sleep(0.2)
    got = is_problem(env.http.get(f"/v1/jobs/{d}"), 409, "job-unreadable")
    assert got["job_status"] == "failed"
    events = env.status_events(d)
    assert [e["status"] for e in events] == ["queued", "failed"]  # failed once
    assert events[-1]["error"]["code"] == "unreadable_record"
    assert d not in env.broker_job_ids()  # its message was acked, not redelivered
    log = (env.stack.logs / "worker.log").read_text(errors="replace")
    assert log.count(f"job {d}: the stored record of job {d} cannot be read") == 1, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    env.submit()  # quota free again


def test_unexpected_errors_are_problems_on_a_kept_connection(env: Env) -> None:
    """A record key of the wrong Redis type (edited by hand) raises an error no handler expects: sync
    and async routes answer a 500 problem, and the keep-alive connection stays usable."""
    job_id = "f" * 20
    env.r.hset(f"prune:job:{job_id}", "broken", "1")
    env.r.zadd("prune:idx:default", {job_id: 0})
    with httpx.Client(base_url=env.stack.api_url, timeout=30) as http:  # one connection, reused
        for path in ("", "/events", "/artifacts", "/cancel", "/events"):
            method = "POST" if path == "/cancel" else "GET"
            is_problem(http.request(method, f"/v1/jobs/{job_id}{path}"), 500, "internal-error")
        assert http.get("/healthz").status_code == 200
    log = (env.stack.logs / "api.log").read_text(errors="replace")
    assert "WRONGTYPE" in log  # logged with its traceback
    env.r.delete(f"prune:job:{job_id}")
    env.r.zrem("prune:idx:default", job_id)


def test_a_record_broken_while_its_job_runs_fails_it_once(env: Env, tmp_path: Path) -> None:
    """The running attempt finds the record unreadable at its next progress or cancel check: the job
    fails once with the reason, the attempt stops, and the worker runs the next job."""
    if "worker" not in env.stack.procs:
        env.stack.start_worker()
    big = tiny_models.save("llama", env.home / "big", layers=12, hidden=256)
    body = env.body(
        model={"source": str(big)},
        calibration={"source": str(env.home / "small.txt"), "nsamples": 64, "seqlen": 128},
    )
    deadline = time.monotonic() + 120
    while (r := env.http.post("/v1/jobs", json=body)).status_code == 429 and time.monotonic() < deadline:
        time.sleep(0.5)  # the previous test's last job still holds a slot
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    while time.monotonic() < deadline:
        job = env.http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] != "queued" and (job["progress"] or {}).get("stage") in ("calibrating", "pruning"):
            break
        time.sleep(0.1)
    assert job["status"] == "running", job
    env.poison(job_id)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = env.http.get(f"/v1/jobs/{job_id}").json()
        if got.get("job_status") == "failed":
            break
        time.sleep(0.2)
    assert got["job_status"] == "failed", got
    events = env.status_events(job_id)
    assert [e["status"] for e in events] == ["queued", "running", "failed"], events
    assert events[-1]["error"]["code"] == "unreadable_record"
    follow_up = env.submit()
    deadline = time.monotonic() + 180
    while (s := env.http.get(f"/v1/jobs/{follow_up}").json()["status"]) not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert s == "succeeded"
    assert not (env.stack.home / "work" / job_id).exists()  # the stopped attempt left no scratch
