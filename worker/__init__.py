"""Celery worker: runs queued jobs through `core.run.pipeline` and stores their artifacts."""
