"""The worker's Celery app: `celery -A worker.app worker -Q prune.gpu -c 1 --pool prefork`."""

from __future__ import annotations

import logging

from celery.signals import setup_logging, worker_init

from jobs import logs
from jobs.queue import make_celery
from jobs.settings import get_settings

app = make_celery(get_settings(), include=["worker.tasks"])


@setup_logging.connect
def _json_logging(loglevel: int | str | None = None, **_: object) -> None:
    """JSON lines on stderr (connecting this signal stops Celery from installing its own handlers)."""
    logs.configure("worker", loglevel or None)


@worker_init.connect
def _preload_engine(**_: object) -> None:
    """Import the engine (torch) once in the parent so forked children start jobs quickly; no
    library progress bars in the log (the job's progress goes to its events)."""
    try:
        import core.pipeline  # noqa: F401
        from core.quiet import silence_progress_bars

        silence_progress_bars()
    except ImportError as e:  # the task reports a clear error per job instead
        logging.getLogger(__name__).warning("engine not importable yet: %s", e)
