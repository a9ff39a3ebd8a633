"""Redis down: every /v1 route answers 503 problem+json with Retry-After (no traceback in the log), an
open SSE stream ends cleanly, signed downloads keep working, and the service recovers when Redis
is back. Malformed and out-of-range event ids are 422 problems, over real HTTP (issue 13, item 7).

The stack is a real redis-server on a fixed port (so it can be stopped and started in place) and
the API under uvicorn; no worker runs, so the job the tests create stays queued.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from jobs.signing import Signer
from scripts.stack import Stack, free_port
from tests import tiny_models
from tests.service_fixtures import DATA_DIR, SIGNING_KEY, start_aof_redis

pytestmark = pytest.mark.faults
PROBLEM = "application/problem+json"
MAX_ID = "18446744073709551615"
"""The largest part of a Redis stream id (2**64 - 1)."""


@dataclass
class ApiStack:
    """Redis (fixed port, AOF) + uvicorn API, with helpers to stop and restart Redis."""

    stack: Stack
    home: Path
    redis_port: int
    http: httpx.Client
    job_id: str = ""

    def start_redis(self) -> None:
        start_aof_redis(self.stack, self.home, self.redis_port)

    def stop_redis(self) -> None:
        self.stack.stop_process("redis", signal.SIGKILL)

    def api_log(self) -> str:
        return (self.stack.logs / "api.log").read_text(errors="replace")

    def new_job(self) -> str:
        """A new queued job (no worker runs)."""
        r = self.http.post("/v1/jobs", json=self.body())
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def call(self, method: str, url: str, **kwargs: object) -> tuple[httpx.Response, str]:
        """One request; the response and its body (an SSE body is not read: it may never end)."""
        with self.http.stream(method, url, **kwargs) as r:  # type: ignore[arg-type]
            sse = r.headers.get("content-type", "").startswith("text/event-stream")
            return r, "" if sse else r.read().decode(errors="replace")

    def body(self) -> dict:
        return {
            "model": {"source": str(self.home / "models" / "tiny")},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    home = tmp_path_factory.mktemp("outage-home")
    tiny_models.save("llama", home / "models" / "tiny")
    env = {
        "PRUNE_SIGNING_KEY": SIGNING_KEY,
        "PRUNE_DATA_DIR": str(DATA_DIR),
        "PRUNE_MODEL_ROOTS": str(home / "models"),
        "PRUNE_OUTBOX_INTERVAL": "0",
        "PRUNE_RETENTION_INTERVAL": "0",
    }
    port = free_port()
    stack = Stack(home, redis_url=f"redis://127.0.0.1:{port}/0", env=env)
    http = httpx.Client(timeout=httpx.Timeout(30, read=60))
    fs = ApiStack(stack, home, port, http)
    try:
        fs.start_redis()
        http.base_url = httpx.URL(stack.start_api())
        fs.job_id = fs.new_job()
        yield fs
    finally:
        http.close()
        stack.stop()


def _v1_requests(api: ApiStack, job_id: str) -> list[tuple[str, str, dict]]:
    """(method, path, request kwargs) for every /v1 operation of the live OpenAPI document, except the
    signed download (it needs no Redis; tested on its own)."""
    schema = api.http.get("/openapi.json").json()
    out = []
    for path, item in schema["paths"].items():
        if not path.startswith("/v1/") or path.startswith("/v1/artifacts/"):
            continue
        for method in item:
            url = path.replace("{job_id}", job_id)
            assert "{" not in url, f"a path parameter this test does not know: {path}"
            kwargs: dict = {"json": api.body()} if (method, path) == ("post", "/v1/jobs") else {}
            out.append((method.upper(), url, kwargs))
    assert len(out) >= 6, out
    return out


def _signed_download(api: ApiStack, job_id: str) -> str:
    """A signed URL of a file placed in the local artifact store (downloads do not read Redis)."""
    name = "report.md"
    path = api.home / "artifacts" / "default" / job_id / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# report\n")
    expires = int(time.time()) + 600
    sig = Signer(SIGNING_KEY.encode()).sign("default", job_id, name, expires)
    return f"/v1/artifacts/default/{job_id}/{name}?expires={expires}&sig={sig}"


def test_redis_down_is_503_with_retry_after_then_the_service_recovers(api: ApiStack) -> None:
    job_id = api.new_job()
    before = api.http.get(f"/v1/jobs/{job_id}").json()
    requests = _v1_requests(api, job_id)
    download = _signed_download(api, job_id)
    sse = {"accept": "text/event-stream"}
    requests.append(("GET", f"/v1/jobs/{job_id}/events", {"headers": sse}))
    log_before = len(api.api_log())
    api.stop_redis()
    try:
        for method, url, kwargs in requests:
            r, text = api.call(method, url, **kwargs)
            what = f"{method} {url} {kwargs.get('headers', '')}"
            assert r.status_code == 503, (what, r.status_code, text)
            assert r.headers["content-type"].startswith(PROBLEM), what
            assert int(r.headers["retry-after"]) > 0, what
            problem = json.loads(text)
            assert problem["status"] == 503 and problem["type"].endswith("store-unavailable"), problem
            assert problem["instance"] == url.split("?")[0]
        assert api.http.get("/readyz").status_code == 503
        assert api.http.get("/healthz").status_code == 200
        got = api.http.get(download)  # signed URLs need no Redis
        assert got.status_code == 200 and got.text == "# report\n"
        log = api.api_log()[log_before:]
        assert "Traceback" not in log, log[-3000:]
        assert "store unavailable" in log  # one warning line per refused request instead
    finally:
        api.start_redis()
    assert api.http.get(f"/v1/jobs/{job_id}").json() == before  # nothing lost, nothing changed
    for method, url, kwargs in requests:  # every route answers again (409: artifacts of a queued job)
        r, text = api.call(method, url, **kwargs)
        assert r.status_code in (200, 201, 409), (method, url, r.status_code, text)
    assert api.http.get("/readyz").status_code == 200


def test_open_sse_stream_ends_cleanly_when_redis_goes_away(api: ApiStack) -> None:
    """The queued job's stream is open (keep-alives) when Redis dies: the response ends properly
    (httpx would raise RemoteProtocolError on a cut connection) and says why."""
    job_id = api.new_job()
    lines = []
    try:
        with api.http.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"accept": "text/event-stream"}
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith("event: status"):
                    api.stop_redis()
    finally:
        api.start_redis()
    assert any(line.startswith("id: ") for line in lines), lines
    assert [line for line in lines if line][-1].startswith(": store unavailable"), lines[-5:]
    assert "Traceback" not in api.api_log()


@pytest.mark.parametrize(
    "event_id",
    [
        "99999999999999999999-0",
        f"{MAX_ID}0",
        f"1-{MAX_ID}0",
        "18446744073709551616-0",
        "garbage",
        "-1",
        "1-",
        "1-2-3",
        "１-0",  # full-width digit
        "1-0\n",
        " 1-0",
        "",
    ],
)
def test_malformed_or_out_of_range_event_ids_are_422(api: ApiStack, event_id: str) -> None:
    url = f"/v1/jobs/{api.job_id}/events"
    tries = [("after, JSON", {"params": {"after": event_id}})]
    tries.append(("after, SSE", {"params": {"after": event_id}, "headers": {"accept": "text/event-stream"}}))
    if event_id and event_id == event_id.strip() and event_id.isascii():  # sendable as a header value
        headers = {"accept": "text/event-stream", "last-event-id": event_id}
        tries.append(("Last-Event-ID, SSE", {"headers": headers}))
        tries.append(("Last-Event-ID, JSON", {"headers": {"last-event-id": event_id}}))
    for what, kwargs in tries:
        r = api.http.get(url, **kwargs)
        assert r.status_code == 422, (what, event_id, r.status_code, r.text)
        assert r.headers["content-type"].startswith(PROBLEM)
        assert r.json()["type"].endswith("invalid-event-id"), r.json()
    assert "Traceback" not in api.api_log()


@pytest.mark.parametrize("event_id", ["0", "0-0", "5", f"{MAX_ID}-{MAX_ID}", f"{MAX_ID}", "1-0"])
def test_largest_and_incomplete_event_ids_are_served(api: ApiStack, event_id: str) -> None:
    url = f"/v1/jobs/{api.job_id}/events"
    r = api.http.get(url, params={"after": event_id})
    assert r.status_code == 200, r.text
    if event_id.startswith(MAX_ID):
        assert r.json()["items"] == []  # nothing can come after the largest id
    else:
        assert [e["data"]["status"] for e in r.json()["items"]] == ["queued"]
    headers = {"accept": "text/event-stream", "last-event-id": event_id}
    with api.http.stream("GET", url, headers=headers) as resp:
        assert resp.status_code == 200
        first = next(line for line in resp.iter_lines() if re.match(r"(id|: keep-alive)", line))
    assert first == ": keep-alive" if event_id.startswith(MAX_ID) else first.startswith("id: ")
