"""FastAPI dependencies: the caller's tenant and the service objects."""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aredis
from fastapi import Request

from jobs.events import AsyncEventLog, EventLog
from jobs.queue import Queue
from jobs.settings import Settings
from jobs.storage import ArtifactStore
from jobs.store import JobStore

DEFAULT_TENANT = "default"


def current_tenant() -> str:
    """The tenant the request acts for (a single default tenant until API keys land)."""
    return DEFAULT_TENANT


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

    @property
    def aevents(self) -> AsyncEventLog:
        """Async event reader (created in the app lifespan)."""
        assert self.aredis is not None, "async Redis client is created in the app lifespan"
        return AsyncEventLog(self.aredis, self.settings.key_prefix)


def services(request: Request) -> Services:
    """The app's services."""
    return request.app.state.services
