"""The FastAPI application: `uvicorn api.app:app` (settings from the environment)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import maintenance
from api.deps import Services, document_security, open_tenant_of, services
from api.logctx import RequestLogMiddleware
from api.metrics import JobsCollector, http_latency_histogram
from api.problems import HANDLERS, ProblemError, UnexpectedErrors, problem_response, problems
from api.routes import router
from api.ui import router as ui_router
from jobs import logs
from jobs.auth import AuthConfigError, KeyRing
from jobs.events import EventLog
from jobs.queue import Queue
from jobs.redisconn import API_RETRIES, aconnect, connect
from jobs.settings import Settings, get_settings, settings_or_exit
from jobs.sources import SourcePolicy, service_policy
from jobs.storage import make_store
from jobs.store import JobStore
from jobs.webhooks import WebhookError, checked_secret

log = logging.getLogger("api.app")
BODY_METHODS = {"POST", "PUT", "PATCH"}
Svc = Annotated[Services, Depends(services)]


class BodyLimitMiddleware:
    """Refuse request bodies above `limit` bytes with a 413 problem (declared or streamed)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = declared is not None and declared.isdigit() and int(declared) > self.limit
        chunks: list[bytes] = []
        size = 0
        more = not too_big
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                too_big = True
                break
            chunks.append(chunk)
            more = message.get("more_body", False)
        if too_big:
            from starlette.requests import Request

            resp = problem_response(
                Request(scope), 413, f"request body larger than {self.limit} bytes", "payload-too-large"
            )
            await resp(scope, receive, send)
            return
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def build_services(settings: Settings) -> Services:
    """Clients for one app instance (no connection is made until first use)."""
    client = connect(settings.redis_url, retries=API_RETRIES, socket_timeout=10)
    return Services(
        settings=settings,
        redis=client,
        store=JobStore(client, settings.key_prefix),
        events=EventLog(client, settings.key_prefix),
        queue=Queue(settings, client),
        artifacts=make_store(settings),
    )


def create_app(
    settings: Settings | None = None, *, keyring: KeyRing | None = None, sources: SourcePolicy | None = None
) -> FastAPI:
    """Build the API app from `settings` (default: the environment's); API keys and the model source
    policy come from them unless given."""
    settings = settings or get_settings()
    svc = build_services(settings)
    svc.keyring = KeyRing.from_settings(settings) if keyring is None else keyring
    svc.open_tenant = open_tenant_of(svc.keyring, settings.default_max_active_jobs)
    svc.sources = service_policy(settings) if sources is None else sources
    svc.webhook_secret = checked_secret(settings.webhook_secret)
    svc.webhook_allow_private = settings.webhook_allow_private

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        svc.aredis = aconnect(settings.redis_url)
        tasks = maintenance.start(svc)
        try:
            yield
        finally:
            await maintenance.stop(tasks)
            await svc.aredis.aclose()
            svc.aredis = None

    app = FastAPI(
        title="Prune Service",
        version="0.1.0",
        description="Pruning-as-a-service for LLMs (Wanda, SparseGPT, magnitude). "
        "Every error is an RFC 9457 `application/problem+json` document.",
        lifespan=lifespan,
        responses=problems(400, 405, 413, 500),  # 400: a body that is not decodable (e.g. not UTF-8)
    )
    app.state.services = svc
    document_security(app, open_mode=svc.open_tenant is not None)
    registry = CollectorRegistry()
    registry.register(JobsCollector(svc))
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.add_middleware(UnexpectedErrors)  # innermost: the access log records its 500
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body)
    app.add_middleware(RequestLogMiddleware, latency=http_latency_histogram(registry))
    app.include_router(router)
    app.include_router(ui_router)

    @app.get("/healthz", summary="Liveness", tags=["ops"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz", summary="Readiness: Redis and artifact storage", tags=["ops"], responses=problems(503)
    )
    async def readyz(svc: Svc) -> dict[str, str]:
        """Pings Redis and checks the artifact store; 503 problem when either is down."""
        checks = {}
        for name, fn in (("redis", svc.store.ping), ("storage", svc.artifacts.check)):
            try:
                await run_in_threadpool(fn)
                checks[name] = "ok"
            except Exception as e:
                raise ProblemError(
                    503, f"{name} unavailable: {e}", "not-ready", "Service not ready"
                ) from None
        return {"status": "ok", **checks}

    @app.get("/metrics", summary="Prometheus metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Jobs by status, queue depth, job duration and HTTP latency histograms."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def __getattr__(name: str) -> FastAPI:
    """`api.app:app` builds the app from the environment on first access."""
    if name == "app":
        settings = settings_or_exit("prune api")
        logs.configure("api")
        try:
            application = create_app(settings)
        except (AuthConfigError, WebhookError) as exc:  # a malformed keys file or webhook secret
            raise SystemExit(f"prune api: invalid configuration: {exc}") from None
        globals()["app"] = application
        return application
    raise AttributeError(name)
