"""`prunectl submit --wait --quiet`: no progress on stderr (over real HTTP, from a scripted server)."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from prunectl.cli import EXIT_OK, main

JOB = {"id": "j1", "status": "queued", "request": {"model": {"source": "m"}}}
EVENTS = [
    ("1-0", "progress", {"stage": "loading", "fraction": 0.05, "message": "loading"}),
    ("2-0", "progress", {"stage": "pruning", "fraction": 0.5, "block": 1, "nblocks": 2, "eta_s": 3.0}),
    ("3-0", "status", {"status": "succeeded"}),
]


@pytest.fixture
def api() -> Iterator[str]:
    """POST /v1/jobs -> a queued job; its SSE stream: two progress events, then succeeded."""

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, ctype: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self._send(201, "application/json", json.dumps(JOB).encode())

        def do_GET(self) -> None:
            if self.path.endswith("/events"):
                sse = "".join(f"id: {i}\nevent: {t}\ndata: {json.dumps(d)}\n\n" for i, t, d in EVENTS)
                self._send(200, "text/event-stream", sse.encode())
            else:
                self._send(200, "application/json", json.dumps({**JOB, "status": "succeeded"}).encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _submit(url: str, *extra: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(["--url", url, "submit", "--model", "m", "--wait", *extra], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_quiet_wait_prints_no_progress(api: str) -> None:
    code, out, err = _submit(api)
    assert code == EXIT_OK, err
    assert "pruning" in err and "block 1/2" in err  # what --quiet takes away
    code, quiet_out, quiet_err = _submit(api, "--quiet")
    assert code == EXIT_OK, quiet_err
    assert quiet_err == ""
    assert quiet_out == out  # the result on stdout is unchanged
