"""End to end on the open stack (no API keys, local storage): webhooks, prunectl against a real
worker, Prometheus metrics and JSON logs."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.webhooks import WebhookVerificationError, verify
from prunectl.cli import EXIT_BAD_INPUT, EXIT_JOB_FAILED, EXIT_OK, EXIT_UNREACHABLE, main
from scripts.stack import free_port
from tests import tiny_models
from tests.e2e.test_service import small_request, sse
from tests.service_fixtures import Service

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.api_url, timeout=httpx.Timeout(30, read=120)) as c:
        yield c


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save("llama", tmp_path_factory.mktemp("wiring-models") / "small")


class Receiver:
    """A threaded HTTP server recording every POST (headers, body)."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _prunectl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_webhooks_started_progress_completed_signed(
    service: Service, http: httpx.Client, small: Path
) -> None:
    rx = Receiver()
    try:
        body = {
            **small_request(small),
            "webhook": {"url": rx.url, "events": ["started", "progress", "completed"]},
        }
        r = http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert [e["data"]["status"] for e in sse(http, job_id) if e["event"] == "status"][-1] == "succeeded"
        deadline = time.monotonic() + 30  # the completed delivery follows the status change
        while not any(json.loads(b)["type"] == "job.succeeded" for _, b in rx.received):
            assert time.monotonic() < deadline, rx.received
            time.sleep(0.1)
    finally:
        rx.close()
    types = []
    for headers, raw in rx.received:
        verify(service.webhook_secret, headers, raw)  # raises unless signed with the service secret
        msg = json.loads(raw)
        assert msg["data"]["job_id"] == job_id and msg["data"]["tenant"] == "default"
        types.append(msg["type"])
    assert types[0] == "job.started" and types[-1] == "job.succeeded"
    progress = [json.loads(b)["data"] for _, b in rx.received if json.loads(b)["type"] == "job.progress"]
    assert any(p["stage"] == "pruning" and p["block"] == 2 for p in progress)
    ids = [h["webhook-id"] for h, _ in rx.received]
    assert len(set(ids)) == len(ids)
    with pytest.raises(WebhookVerificationError):
        verify("whsec_" + "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB", rx.received[0][0], rx.received[0][1])

    # every attempt is recorded in the job's event stream
    items = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
    hooks = [e["data"] for e in items if e["type"] == "webhook"]
    assert {h["event"] for h in hooks} >= {"job.started", "job.progress", "job.succeeded"}
    assert all(h["ok"] and h["status"] == 204 and h["attempt"] >= 1 for h in hooks)


def test_unreachable_webhook_does_not_fail_the_job(http: httpx.Client, small: Path) -> None:
    body = {
        **small_request(small),
        "webhook": {"url": f"http://127.0.0.1:{free_port()}/x", "events": ["started"]},
    }
    job_id = http.post("/v1/jobs", json=body).json()["id"]
    assert [e["data"]["status"] for e in sse(http, job_id) if e["event"] == "status"][-1] == "succeeded"
    deadline = time.monotonic() + 30  # attempts are recorded as they happen (backoff 1, 2, 4… s)
    while True:
        items = http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]
        hooks = [e["data"] for e in items if e["type"] == "webhook"]
        if len(hooks) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [h["attempt"] for h in hooks[:2]] == [1, 2], hooks
    assert not any(h["ok"] for h in hooks) and hooks[0]["error"] and hooks[0]["status"] is None
    assert len({h["msg_id"] for h in hooks}) == 1  # retries keep the message id


def test_prunectl_submit_wait_download(service: Service, small: Path, tmp_path: Path) -> None:
    dest = tmp_path / "pruned"
    code, _, err = _prunectl(
        "--url", service.api_url, "submit", "--model", str(small), "--method", "wanda", "--pattern", "2:4",
        "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--wait", "--download", str(dest),
    )  # fmt: skip
    assert code == EXIT_OK, err
    manifest = json.loads((dest / "manifest.json").read_text())["files"]
    assert any(n.endswith(".safetensors") for n in manifest)
    for rel, meta in manifest.items():
        data = (dest / rel).read_bytes()
        assert len(data) == meta["size"] and hashlib.sha256(data).hexdigest() == meta["sha256"], rel


def test_prunectl_exit_codes(service: Service) -> None:
    missing = str(service.home / "no-such-model")
    code, _, err = _prunectl(
        "--url", service.api_url, "submit", "--model", missing, "--nsamples", "4", "--wait"
    )
    assert code == EXIT_JOB_FAILED and "failed" in err and missing in err
    code, _, err = _prunectl("--url", service.api_url, "submit", "--model", "/etc/passwd")
    assert code == EXIT_BAD_INPUT and "422" in err and "outside the allowed model roots" in err
    dead = f"http://127.0.0.1:{free_port()}"
    code, _, err = _prunectl("--url", dead, "--retries", "1", "list")
    assert code == EXIT_UNREACHABLE, err


def test_metrics_after_jobs(service: Service, http: httpx.Client, small: Path) -> None:
    job_id = http.post("/v1/jobs", json=small_request(small)).json()["id"]
    list(sse(http, job_id))
    text = http.get("/metrics").text
    for name in (
        'prune_jobs{status="succeeded"}',
        "prune_queue_depth",
        "prune_job_duration_seconds_bucket",
        "prune_job_duration_seconds_count",
        "prune_block_seconds_bucket",
        "prune_block_seconds_sum",
        "prune_http_request_duration_seconds_bucket",
    ):
        assert name in text, name
    count = next(line for line in text.splitlines() if line.startswith("prune_block_seconds_count"))
    assert float(count.split()[-1]) >= 2  # two blocks of the tiny model per job


def test_logs_are_json_lines_with_job_ids(service: Service, http: httpx.Client, small: Path) -> None:
    job_id = http.post("/v1/jobs", json=small_request(small)).json()["id"]
    list(sse(http, job_id))
    http.get(f"/v1/jobs/{job_id}")
    for name in ("api", "worker"):
        lines = (service.stack.logs / f"{name}.log").read_text().splitlines()
        records = []
        for line in lines:
            if line.startswith("{"):
                records.append(json.loads(line))
        mine = [r for r in records if job_id in r["msg"]]
        assert mine, name
        assert all(r.get("job_id") == job_id for r in mine), [r for r in mine if r.get("job_id") != job_id]
        assert {"ts", "level", "logger", "service", "msg"} <= set(mine[0])
