"""Redis clients that ride out a Redis restart: commands are retried with exponential backoff."""

from __future__ import annotations

import redis
import redis.asyncio as aredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

WORKER_RETRIES = 40  # ~1 min of reconnect attempts: a long job must survive a Redis restart
API_RETRIES = 3  # ~1.5 s: a request (and /readyz) waits a little, then answers with a problem


def connect(url: str, retries: int = WORKER_RETRIES, **kwargs: object) -> redis.Redis:
    """A synchronous client retrying connection errors and timeouts with backoff (0.1 s doubling to 1 s)."""
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.1), retries)
    return redis.Redis.from_url(url, retry=retry, health_check_interval=30, **kwargs)


def aconnect(url: str, retries: int = API_RETRIES, **kwargs: object) -> aredis.Redis:
    """The asyncio counterpart of `connect`."""
    retry = AsyncRetry(ExponentialBackoff(cap=1.0, base=0.1), retries)
    return aredis.Redis.from_url(url, retry=retry, health_check_interval=30, **kwargs)
