"""End-to-end fixtures: a real redis-server, uvicorn API and Celery worker for the session."""

from tests.service_fixtures import service  # noqa: F401
