"""Requests the server in front of the app refuses (oversized or malformed request heads) are
problem+json too: `python -m api.serve` over real sockets, both of uvicorn's HTTP parsers."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.serve import MAX_HEAD
from scripts.stack import REPO, Stack, _wait, free_port

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module", params=["h11", "httptools"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The API served by `python -m api.serve --http <parser>` on a free port (with a real Redis)."""
    home = tmp_path_factory.mktemp(f"limits-{request.param}")
    stack = Stack(home, env={"PRUNE_SIGNING_KEY": "k"})
    try:
        stack.start_redis()
        port = free_port()
        cmd = [sys.executable, "-m", "api.serve", "--port", str(port), "--http", request.param]
        log = Path(home) / "api.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=stack.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait(
                "api", lambda: httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200, 60, proc, log
            )
            yield port
        finally:
            proc.terminate()
            proc.wait(15)
    finally:
        stack.stop()


def exchange(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):  # it may answer before reading everything
            pass
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def check_problem(answer: tuple[int, dict[str, str], bytes], status: int, slug: str) -> None:
    code, headers, body = answer
    assert code == status, answer
    assert headers["content-type"] == PROBLEM
    problem = json.loads(body)
    assert problem["status"] == status and problem["type"] == f"urn:prune:problem:{slug}", problem


def test_oversized_request_line_is_a_431_problem(api: int) -> None:
    sig = "a" * 100_000  # a 100 KB `sig` query parameter
    raw = f"GET /v1/artifacts/t/{'0' * 20}/x?expires=1&sig={sig} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    check_problem(exchange(api, raw), 431, "request-head-too-large")


def test_oversized_headers_are_a_431_problem(api: int) -> None:
    big = "".join(f"X-Pad-{i}: {'b' * 1000}\r\n" for i in range(40))
    raw = f"GET /healthz HTTP/1.1\r\nHost: x\r\n{big}\r\n".encode()
    check_problem(exchange(api, raw), 431, "request-head-too-large")


def test_malformed_request_is_a_400_problem(api: int) -> None:
    check_problem(
        exchange(api, b"GET /healthz HTTP/1.1\r\nHost x\r\nbad header\r\n\r\n"), 400, "invalid-http-request"
    )


def get(port: int, target: str) -> tuple[int, dict[str, str], bytes]:
    return exchange(port, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())


def test_requests_within_the_limit_reach_the_app(api: int) -> None:
    code, _, body = get(api, f"/healthz?pad={'c' * (MAX_HEAD // 2)}")
    assert code == 200 and json.loads(body) == {"status": "ok"}
    code, headers, _ = get(api, f"/v1/artifacts/t/{'0' * 20}/x?expires=1&sig={'d' * 200}")
    assert code == 422 and headers["content-type"] == PROBLEM  # the app's own bound on `sig`
