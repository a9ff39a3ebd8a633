"""The worker's Celery app: `celery -A worker.app worker -Q prune.gpu -c 1 --pool prefork`."""

from __future__ import annotations

import logging
import os
import threading

from celery.signals import setup_logging, worker_init, worker_ready

from jobs import lifecycle, logs, metrics
from jobs.queue import make_celery
from jobs.settings import get_settings, settings_or_exit

app = make_celery(settings_or_exit("prune worker"), include=["worker.tasks"])
log = logging.getLogger(__name__)


@setup_logging.connect
def _json_logging(loglevel: int | str | None = None, **_: object) -> None:
    """JSON lines on stderr (connecting this signal stops Celery from installing its own handlers)."""
    logs.configure("worker", loglevel or None)


@worker_init.connect
def _preload_engine(**_: object) -> None:
    """Name this worker for its pool children's leases, and import the engine (torch) once in the
    parent so forked children start jobs quickly; no library progress bars in the log (the job's
    progress goes to its events)."""
    os.environ.setdefault("PRUNE_WORKER_ID", lifecycle.worker_id())  # host:pid of this process
    try:
        import core.run.pipeline  # noqa: F401
        from core.run.quiet import silence_progress_bars

        silence_progress_bars()
    except ImportError as e:  # the task reports a clear error per job instead
        log.warning("engine not importable yet: %s", e)


@worker_ready.connect
def _heartbeat(**_: object) -> None:
    """Report this worker alive every PRUNE_LEASE_RENEW seconds (the `prune_workers_live` metric)."""
    from worker.runner import context

    settings = get_settings()
    worker = lifecycle.worker_id()

    def beat() -> None:
        while True:
            try:
                metrics.heartbeat(context().store, worker, settings.lease_expire_s)
            except Exception as e:  # Redis away: the next beat tries again
                log.warning("heartbeat not recorded: %s", e)
            stop.wait(settings.lease_renew_s)

    stop = threading.Event()
    threading.Thread(target=beat, name="heartbeat", daemon=True).start()


@worker_ready.connect
def _sweep_work_dirs(**_: object) -> None:
    """Remove stale job scratch dirs now and every PRUNE_WORK_SWEEP_INTERVAL seconds (worker/workdirs.py)."""
    from worker import workdirs
    from worker.runner import context

    settings = get_settings()
    workdirs.start(
        lambda: context().store, settings.work_dir, lifecycle.worker_id(), settings.work_sweep_interval
    )
