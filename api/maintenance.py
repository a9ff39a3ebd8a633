"""The API process's maintenance loops, started with the app and stopped with it (`create_app`'s
lifespan): every API process runs them, each safe to run in any number of processes at once.

- outbox: re-send jobs an API process created but never sent (`jobs.lifecycle.resend_unsent`),
  every `PRUNE_OUTBOX_INTERVAL` seconds (0: off);
- leases: re-queue, fail or cancel held jobs whose worker stopped renewing its lease
  (`jobs.lifecycle.sweep_leases`), every `PRUNE_LEASE_RENEW` seconds; the artifacts of a job it
  ends are deleted;
- fan-outs: move every sweep fanned out over workers on from its variant jobs' statuses
  (`jobs.lifecycle.sweep_fanouts`: fail it when a variant failed, finish a cancel, queue the gather
  step), every `PRUNE_LEASE_RENEW` seconds;
- retention: delete finished jobs older than `PRUNE_RETENTION_DAYS` with their artifacts
  (`jobs.retention.sweep_all`), every `PRUNE_RETENTION_INTERVAL` seconds (0 or no retention: off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from api.deps import Services
from jobs.lifecycle import resend_unsent, sweep_fanouts, sweep_leases
from jobs.retention import sweep_all as sweep_retention
from jobs.spec import Job

log = logging.getLogger("api.maintenance")


async def every(interval_s: float, what: str, fn: Callable[..., object], *args: object) -> None:
    """Run `fn(*args)` in a thread now and then every `interval_s` seconds, until cancelled; errors
    are logged, not raised (Redis away: the next run tries again)."""
    while True:
        try:
            await asyncio.to_thread(fn, *args)
        except Exception as e:
            log.warning("%s failed: %s", what, e)
        await asyncio.sleep(interval_s)


def start(svc: Services) -> list[asyncio.Task[None]]:
    """Start the loops the settings enable; the running tasks (`stop` ends them)."""
    s = svc.settings

    def drop_artifacts(job: Job) -> None:  # a job the lease sweeper failed or cancelled
        svc.artifacts.delete_prefix(f"{job.tenant}/{job.id}")

    store, queue = svc.store, svc.queue
    loops = []
    if s.outbox_interval > 0:
        loops.append(every(s.outbox_interval, "outbox sweep", resend_unsent, store, queue, s.outbox_age))
    lease_args = (store, queue, s.max_attempts, drop_artifacts)
    loops.append(every(s.lease_renew_s, "lease sweep", sweep_leases, *lease_args))
    loops.append(every(s.lease_renew_s, "fan-out sweep", sweep_fanouts, *lease_args[:2], drop_artifacts))
    if s.retention_interval > 0 and s.retention_s is not None:
        retention_args = (store, svc.artifacts, s.retention_s)
        loops.append(every(s.retention_interval, "retention sweep", sweep_retention, *retention_args))
    return [asyncio.create_task(loop) for loop in loops]


async def stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the loops and wait for them to end."""
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
