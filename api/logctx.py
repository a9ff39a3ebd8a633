"""Per-request observation: the job id of `/v1/jobs/{id}…` and `/v1/artifacts/{tenant}/{id}/…`
requests is bound to every log line of the request, each request is logged once (JSON), and its
latency is observed in the Prometheus histogram."""

from __future__ import annotations

import logging
import re
import time

from prometheus_client import Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.logs import reset_job_id, set_job_id

log = logging.getLogger("api.access")
_JOB_PATH = re.compile(r"^/v1/(?:jobs|artifacts/[^/]+)/([0-9a-f]{20})(?:/|$)")


class RequestLogMiddleware:
    """Bind the path's job id to the request's context; log and observe method, route, status, latency."""

    def __init__(self, app: ASGIApp, latency: Histogram | None = None) -> None:
        self.app = app
        self.latency = latency

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = _JOB_PATH.match(scope["path"])
        token = set_job_id(m.group(1) if m else None)
        status = [500]
        start = time.perf_counter()

        async def _send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            elapsed = time.perf_counter() - start
            if self.latency is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.latency.labels(scope["method"], route, str(status[0])).observe(elapsed)
            log.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status[0],
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status[0],
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            reset_job_id(token)
