"""prunectl exit codes against the real API (uvicorn api.app:app + a real redis-server; no worker)."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from jobs.keys import Keys
from prunectl.cli import EXIT_BAD_INPUT, EXIT_JOB_FAILED, main

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(API url, Redis url) of a real uvicorn API over a real redis-server."""
    home = tmp_path_factory.mktemp("prune-home")
    rport, aport = _port(), _port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--dir", str(home)],
        stdout=subprocess.DEVNULL,
    )
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{rport}/0",
        "PRUNE_HOME": str(home),
        "PRUNE_STORAGE": "local",
        "PRUNE_PUBLIC_URL": f"http://127.0.0.1:{aport}",
        "PRUNE_SIGNING_KEY": "test-signing-key",
        "PRUNE_MODEL_ROOTS": "/models",  # the (absent) model paths below pass the source policy
    }
    api = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(aport)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_port(rport, redis, "redis")
        _wait_port(aport, api, "api")
        yield f"http://127.0.0.1:{aport}", env["REDIS_URL"]
    finally:
        for p in (api, redis):
            p.terminate()
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture(scope="module")
def api_url(stack: tuple[str, str]) -> str:
    return stack[0]


def _run(url: str, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--url", url, "--retries", "2", *argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_submit_status_list_cancel(api_url: str) -> None:
    code, out, err = _run(
        api_url, "submit", "--model", "/models/tiny", "--method", "wanda", "--nsamples", "8"
    )
    assert code == 0, err
    job_id = out.strip()
    assert len(job_id) == 20
    code, out, _ = _run(api_url, "--json", "status", job_id)
    assert code == 0 and json.loads(out)["request"]["prune"]["method"] == "wanda"
    code, out, _ = _run(api_url, "list", "--status", "queued")
    assert code == 0 and job_id in out
    code, out, _ = _run(api_url, "events", job_id)
    assert code == 0
    code, out, _ = _run(api_url, "--json", "cancel", job_id)
    assert code == 0 and json.loads(out)["status"] == "cancelled"
    code, _, err = _run(api_url, "cancel", job_id)  # finished: 409
    assert code == EXIT_BAD_INPUT and "409" in err


def test_idempotency_key_reuses_job(api_url: str) -> None:
    argv = ("--json", "submit", "--model", "/models/tiny", "--idempotency-key", "ci-run-42")
    first = json.loads(_run(api_url, *argv)[1])
    second = json.loads(_run(api_url, *argv)[1])
    assert first["id"] == second["id"]
    code, _, err = _run(api_url, "submit", "--model", "/models/other", "--idempotency-key", "ci-run-42")
    assert code == EXIT_BAD_INPUT and "409" in err


def test_validation_error_prints_problem_detail(api_url: str, tmp_path: Path) -> None:
    code, _, err = _run(api_url, "submit", "--model", "/m", "--pattern", "2:4", "--sparsity", "0.7")
    assert code == EXIT_BAD_INPUT
    assert "422" in err and "contradicts" in err
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps({"model": {"source": "/m"}, "prune": {"bogus": 1}}))
    code, _, err = _run(api_url, "submit", "--spec", str(spec))
    assert code == EXIT_BAD_INPUT and "bogus" in err
    code, _, err = _run(api_url, "status", "0" * 20)
    assert code == EXIT_BAD_INPUT and "404" in err


def test_submit_wait_exits_1_when_cancelled(api_url: str) -> None:
    result: dict[str, tuple[int, str, str]] = {}
    source = "/models/wait-then-cancel"
    t = threading.Thread(
        target=lambda: result.setdefault(
            "r", _run(api_url, "submit", "--model", source, "--wait", "--poll", "0.2")
        )
    )
    t.start()
    job_id = None
    deadline = time.monotonic() + 20
    while job_id is None and time.monotonic() < deadline:
        items = httpx.get(f"{api_url}/v1/jobs", params={"status": "queued"}).json()["items"]
        job_id = next((j["id"] for j in items if j["request"]["model"]["source"] == source), None)
        time.sleep(0.1)
    assert job_id is not None
    time.sleep(0.5)  # let prunectl attach to the event stream
    assert httpx.post(f"{api_url}/v1/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    t.join(timeout=30)
    assert not t.is_alive()
    code, _, err = result["r"]
    assert code == EXIT_JOB_FAILED, err
    assert job_id in err and "cancelled" in err


def test_list_shows_an_unreadable_job_and_cancel_ends_it(stack: tuple[str, str]) -> None:
    api_url, redis_url = stack
    code, out, err = _run(api_url, "submit", "--model", "/models/tiny")
    assert code == 0, err
    bad = out.strip()
    r = redis.Redis.from_url(redis_url)
    r.set(Keys("prune").job_key(bad), b'{"id": "' + bad.encode() + b'", "status": "queued", "request": 7}')
    code, out, _ = _run(api_url, "list")
    assert code == 0
    (row,) = [line for line in out.splitlines() if bad in line]
    assert "queued" in row and "unreadable" in row
    code, _, err = _run(api_url, "status", bad)
    assert code == EXIT_BAD_INPUT and "409" in err
    code, out, err = _run(api_url, "--json", "cancel", bad)
    assert code == 0 and json.loads(out)["status"] == "cancelled", err
