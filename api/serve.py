"""The API's HTTP server: uvicorn with protocol classes whose own error answers are problem+json.

uvicorn answers a request it cannot parse (malformed, or a request line and headers above its limit)
itself, before the app sees it, with `400 text/plain`. `ProblemH11Protocol` and
`ProblemHttpToolsProtocol` answer the same cases with an RFC 9457 problem: 431 `request-head-too-large`
when the request line and headers exceed `MAX_HEAD` bytes, 400 `invalid-http-request` otherwise
(both close the connection, as uvicorn does), with one `MAX_HEAD` for both parsers. (Plain uvicorn
0.54 measured: h11 passes a 100 KB request line that arrives whole to the app, httptools answers it
`400 text/plain`, and both pass 40 KB of headers.)

Run: `python -m api.serve [APP] --host H --port P [--proxy-headers] ...` (the subset of the `uvicorn`
command's flags the deployments use; `main`).
"""

from __future__ import annotations

import argparse
import json
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import PROBLEM_JSON, TYPE_BASE

MAX_HEAD = 16 * 1024
"""Largest request line plus headers, in bytes (h11's default `max_incomplete_event_size`): a job id,
a signed download URL (`expires` + 64-hex `sig`) and a bearer key fit with a wide margin."""


def problem_bytes(too_large: bool) -> bytes:
    """A complete HTTP/1.1 problem response (connection closed after it)."""
    status = 431 if too_large else 400
    detail = (
        f"request line and headers larger than {MAX_HEAD} bytes"
        if too_large
        else "malformed HTTP request (request line or headers)"
    )
    slug = "request-head-too-large" if too_large else "invalid-http-request"
    body = json.dumps(
        {"type": TYPE_BASE + slug, "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    ).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: {PROBLEM_JSON}\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _HeadLimitedConnection(h11.Connection):
    """An h11 server connection refusing a request whose line and headers exceed `MAX_HEAD` (h11
    itself only caps a head that arrives in pieces: its `max_incomplete_event_size`)."""

    too_large = False

    def next_event(self) -> Any:
        event = super().next_event()
        if isinstance(event, h11.Request):
            size = len(event.method) + len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers)
            if size > MAX_HEAD:
                self.too_large = True
                raise h11.RemoteProtocolError("request head too large")
        return event


class ProblemH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a `MAX_HEAD` limit and problem answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _HeadLimitedConnection(h11.SERVER, MAX_HEAD)

    def send_400_response(self, msg: str) -> None:
        pending, _ = self.conn.trailing_data  # what h11 refused to buffer (a head arriving in pieces)
        too_large = getattr(self.conn, "too_large", False) or len(pending) > MAX_HEAD
        self.transport.write(problem_bytes(too_large))
        self.transport.close()


class _HeadTooLarge(Exception):
    pass


class ProblemHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a `MAX_HEAD` limit and problem answers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head = 0
        self._too_large = False

    def on_message_begin(self) -> None:
        self._head = 0
        super().on_message_begin()

    def _count(self, n: int) -> None:
        self._head += n
        if self._head > MAX_HEAD:
            self._too_large = True
            raise _HeadTooLarge  # httptools raises HttpParserCallbackError: the parent's 400 path

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        self.transport.write(problem_bytes(self._too_large))
        self.transport.close()


PROTOCOLS: dict[str, type] = {"h11": ProblemH11Protocol, "httptools": ProblemHttpToolsProtocol}


def main(argv: list[str] | None = None) -> None:
    """Serve the API (default `api.app:app`) with the problem-answering protocols."""
    p = argparse.ArgumentParser(prog="python -m api.serve", description=__doc__.split("\n")[0])
    p.add_argument("app", nargs="?", default="api.app:app", help="ASGI app import string")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--http", choices=sorted(PROTOCOLS), default="httptools")
    p.add_argument("--proxy-headers", action="store_true", help="trust X-Forwarded-* (see uvicorn)")
    p.add_argument("--forwarded-allow-ips", default=None)
    p.add_argument("--no-server-header", action="store_true")
    p.add_argument("--no-access-log", action="store_true")
    p.add_argument("--log-level", default="info")
    a = p.parse_args(argv)
    uvicorn.run(
        a.app,
        host=a.host,
        port=a.port,
        http=PROTOCOLS[a.http],  # type: ignore[arg-type]
        h11_max_incomplete_event_size=MAX_HEAD,
        proxy_headers=a.proxy_headers,
        forwarded_allow_ips=a.forwarded_allow_ips,
        server_header=not a.no_server_header,
        access_log=not a.no_access_log,
        log_level=a.log_level,
    )


if __name__ == "__main__":
    main()
