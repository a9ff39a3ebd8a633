"""Celery worker: runs queued jobs through `core.pipeline` and stores their artifacts."""
