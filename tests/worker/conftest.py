"""Fixtures for the worker tests (real redis-server)."""

from tests.service_fixtures import key_prefix, redis_client, redis_url  # noqa: F401
