"""The worker's sweep of stale scratch dirs: `$PRUNE_HOME/work/<job id>` outlives an attempt on
purpose (`resume/` checkpoints, a complete `out/` whose upload failed), so a host that comes back
after its job was re-queued elsewhere and finished would keep it forever. The worker's main process
sweeps at start and every PRUNE_WORK_SWEEP_INTERVAL seconds (`worker/app.py`): a dir goes when
`lifecycle.stale_work` says why (the job finished, is deleted or unknown, or runs on another host);
a queued job's dir and the dir of a job this host runs stay. Only names shaped like job ids are
looked at. An error (Redis away, a record that does not parse, a file that will not go) is logged
and skips that dir or that round; the sweep never stops the worker.

An attempt holds its dir's lock (`hold`, an exclusive `flock` on `<dir>/.lock`) from before it
touches the dir until it ends; the sweep removes a dir only while it holds that lock itself (taken
without waiting: a dir in use is skipped) and after asking `stale_work` again under it, so a job
this host claims between the sweep's first look and its removal keeps its dir."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from jobs import lifecycle
from jobs.store import JobStore

log = logging.getLogger("worker.workdirs")

JOB_DIR = re.compile(r"[0-9a-f]{20}")
"""Names of job work dirs (`jobs.store.new_job_id`); anything else under work/ is left alone."""


LOCK = ".lock"
"""The lock file inside each work dir (`hold`, `sweep`)."""


@contextlib.contextmanager
def hold(work: Path) -> Iterator[Path]:
    """Create `work` and hold its lock until the block ends (waiting while a sweep removes it; a dir
    the sweep removed meanwhile is created again)."""
    while True:
        work.mkdir(parents=True, exist_ok=True)
        fd = os.open(work / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.fstat(fd).st_ino == os.stat(work / LOCK).st_ino
            except FileNotFoundError:
                same = False
            if same:
                yield work
                return
        finally:
            os.close(fd)  # closing releases the lock


def _remove_if_stale(store: JobStore, path: Path, worker: str) -> str | None:
    """Remove `path` when the job's dir is stale, under the dir's lock; why, or None when kept (not
    stale, or an attempt holds the lock)."""
    if lifecycle.stale_work(store, path.name, worker) is None:  # most dirs: no lock file made
        return None
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # an attempt of this host runs in it
        why = lifecycle.stale_work(store, path.name, worker)  # again, now that no attempt can start
        if why is not None:
            shutil.rmtree(path)
        return why
    finally:
        os.close(fd)


def sweep(store: JobStore, work_dir: Path, worker: str) -> list[str]:
    """Remove the stale job dirs under `work_dir`; the ids removed. A dir whose check or removal
    fails is logged and kept for a later sweep."""
    try:
        entries = sorted(p for p in work_dir.iterdir() if p.is_dir() and JOB_DIR.fullmatch(p.name))
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for path in entries:
        try:
            why = _remove_if_stale(store, path, worker)
            if why is None:
                continue
        except FileNotFoundError:  # its attempt removed it meanwhile
            continue
        except Exception as e:
            log.warning("work dir %s not swept: %s", path.name, e, extra={"job_id": path.name})
            continue
        log.info("job %s: stale work dir removed (%s)", path.name, why, extra={"job_id": path.name})
        removed.append(path.name)
    return removed


def start(
    store: Callable[[], JobStore], work_dir: Path, worker: str, interval_s: float
) -> threading.Event | None:
    """Sweep now and then every `interval_s` seconds on a daemon thread (None: `0` turns it off);
    set the returned event to stop it. `store()` is asked each round (the worker's Redis connection
    is made on that thread, so a Redis away at start delays the sweep, not the worker)."""
    if interval_s <= 0:
        return None
    stop = threading.Event()

    def loop() -> None:
        while True:
            try:
                sweep(store(), work_dir, worker)
            except Exception as e:  # the next round tries again
                log.warning("work dir sweep failed: %s", e)
            if stop.wait(interval_s):
                return

    threading.Thread(target=loop, name="work-sweep", daemon=True).start()
    return stop
