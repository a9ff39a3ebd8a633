"""Fixtures for the jobs-layer tests (real redis-server)."""

import pytest
import redis

from jobs.events import EventLog
from jobs.store import JobStore
from tests.service_fixtures import key_prefix, redis_client, redis_url  # noqa: F401


@pytest.fixture
def store(redis_client: redis.Redis, key_prefix: str) -> JobStore:  # noqa: F811
    """A JobStore on the test's Redis under a key prefix of its own."""
    return JobStore(redis_client, key_prefix)


@pytest.fixture
def events(redis_client: redis.Redis, key_prefix: str) -> EventLog:  # noqa: F811
    """The EventLog of the same prefix."""
    return EventLog(redis_client, key_prefix)
