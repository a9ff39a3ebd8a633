"""FastAPI dependencies: the caller's tenant and the service objects."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Annotated

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.problems import ProblemError
from jobs.auth import KeyRing, Tenant
from jobs.events import AsyncEventLog, EventLog
from jobs.queue import Queue
from jobs.settings import Settings
from jobs.sources import SourcePolicy
from jobs.storage import ArtifactStore
from jobs.store import JobStore

log = logging.getLogger("api.auth")

DEFAULT_TENANT = "default"
OPEN_MAX_ACTIVE_JOBS = 1_000_000
"""Active-job limit of the open `default` tenant unless PRUNE_DEFAULT_MAX_ACTIVE_JOBS is set."""

bearer = HTTPBearer(auto_error=False, description="API key: `Authorization: Bearer <key>`.")


@dataclass
class Services:
    """Clients shared by the routes of one app."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    events: EventLog
    queue: Queue
    artifacts: ArtifactStore
    aredis: aredis.Redis | None = None
    keyring: KeyRing = field(default_factory=KeyRing)
    open_tenant: Tenant | None = None
    sources: SourcePolicy = field(default_factory=SourcePolicy)
    webhook_secret: str | None = None
    webhook_allow_private: bool = False

    @property
    def aevents(self) -> AsyncEventLog:
        """Async event reader (created in the app lifespan)."""
        assert self.aredis is not None, "async Redis client is created in the app lifespan"
        return AsyncEventLog(self.aredis, self.settings.key_prefix)


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


async def unique_json_keys(request: Request) -> None:
    """422 when the JSON body repeats a key at any depth (JSON parsers disagree on which one wins;
    refusing is the only reading every client agrees with)."""
    raw = await request.body()
    try:
        json.loads(raw, object_pairs_hook=_refuse_duplicates)
    except ValueError:
        return  # malformed JSON: FastAPI's own 422 describes it
    except _DuplicateKey as exc:
        raise ProblemError(
            422, f"duplicate key {exc.args[0]!r} in the JSON body", "duplicate-key", "Duplicate JSON key"
        ) from None


def services(request: Request) -> Services:
    """The app's services."""
    return request.app.state.services


def authenticated(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> Tenant:
    """The tenant owning the request's bearer key; 401 (`WWW-Authenticate: Bearer`) when the key is
    missing or unknown. Without any configured key the service is open: every request is `default`."""
    svc = services(request)
    if svc.open_tenant is not None:
        return svc.open_tenant
    tenant = svc.keyring.authenticate(creds.credentials if creds else None)
    if tenant is None:
        detail = "invalid API key" if creds else "missing API key (Authorization: Bearer <key>)"
        headers = {"WWW-Authenticate": 'Bearer realm="prune"' + (', error="invalid_token"' if creds else "")}
        raise ProblemError(401, detail, "unauthorized", "Unauthorized", headers=headers)
    return tenant


def current_tenant(tenant: Annotated[Tenant, Depends(authenticated)]) -> str:
    """The name of the tenant the request acts for (jobs, events and artifacts are scoped by it)."""
    return tenant.name


def document_security(app: FastAPI, open_mode: bool) -> None:
    """Make the OpenAPI document say what the configuration does: with API keys every operation that
    authenticates requires `Authorization: Bearer`; in open mode (no key configured) none does, so
    the bearer requirement and scheme are left out of the schema."""
    if not open_mode:
        return
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for item in schema.get("paths", {}).values():
                for op in item.values():
                    if isinstance(op, dict):
                        op.pop("security", None)
            schema.get("components", {}).pop("securitySchemes", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def open_tenant_of(keyring: KeyRing, max_active_jobs: int | None) -> Tenant | None:
    """The open `default` tenant when no API key is configured (with a warning), else None."""
    if len(keyring):
        return None
    log.warning(
        "no API keys configured (PRUNE_API_KEYS_FILE / PRUNE_API_KEYS): the API is open and every "
        "request acts as tenant %r",
        DEFAULT_TENANT,
    )
    return Tenant(DEFAULT_TENANT, max_active_jobs or OPEN_MAX_ACTIVE_JOBS)
