"""The service's counters and histograms in Redis (the keys are `jobs.keys`'s): jobs per status,
job durations, per-block pruning times, live workers and leases, lease expiries and re-queues, jobs
deleted by retention. The API's `/metrics` (`api.metrics`) reads them; the store, the lifecycle and
the worker write them (the transition's own counters inside its transaction)."""

from __future__ import annotations

import math
import time
from typing import Any, Protocol

import redis

from jobs.keys import Keys
from jobs.spec import JobStatus

DURATION_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, math.inf)
BLOCK_BUCKETS: tuple[float, ...] = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 30, 60, 300, 900, math.inf)


class JobStore(Protocol):
    """What this module needs of `jobs.store.JobStore` (which writes through it)."""

    r: redis.Redis
    keys: Keys


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _observe(pipe: Any, key: str, bounds: tuple[float, ...], seconds: float) -> None:
    le = next(b for b in bounds if seconds <= b)
    pipe.hincrby(key, "+Inf" if math.isinf(le) else f"{le:g}", 1)
    pipe.hincrbyfloat(key, "sum", seconds)


def record_duration(pipe: Any, keys: Keys, seconds: float) -> None:
    """In `pipe`'s transaction: a finished job ran `seconds`."""
    _observe(pipe, keys.durations, DURATION_BUCKETS, seconds)


def count_lifecycle(pipe: Any, keys: Keys, counter: str) -> None:
    """In `pipe`'s transaction: one more `counter` (`leases_expired`, `requeued`, `given_back`)."""
    pipe.hincrby(keys.lifecycle_key, counter, 1)


def observe_block(store: JobStore, seconds: float) -> None:
    """Record the time the worker took to prune one decoder block."""
    with store.r.pipeline(transaction=True) as pipe:
        _observe(pipe, store.keys.blocks, BLOCK_BUCKETS, seconds)
        pipe.execute()


def _histogram(store: JobStore, key: str, bounds: tuple[float, ...]) -> tuple[list[tuple[str, int]], float]:
    raw = {_text(k): float(v) for k, v in store.r.hgetall(key).items()}
    buckets, acc = [], 0
    for b in bounds:
        le = "+Inf" if math.isinf(b) else f"{b:g}"
        acc += int(raw.get(le, 0))
        buckets.append((le, acc))
    return buckets, raw.get("sum", 0.0)


def duration_histogram(store: JobStore) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) buckets and the sum of finished jobs' run durations (seconds)."""
    return _histogram(store, store.keys.durations, DURATION_BUCKETS)


def block_histogram(store: JobStore) -> tuple[list[tuple[str, int]], float]:
    """Cumulative (le, count) buckets and the sum of per-block pruning times (seconds)."""
    return _histogram(store, store.keys.blocks, BLOCK_BUCKETS)


def status_counts(store: JobStore) -> dict[str, int]:
    """Number of stored jobs per status, across tenants (deleted jobs are not counted)."""
    counts = {s.value: 0 for s in JobStatus}
    for k, v in store.r.hgetall(store.keys.counts).items():
        counts[_text(k)] = int(v)
    return counts


def deleted_count(store: JobStore) -> int:
    """How many finished jobs retention has deleted."""
    return int(store.r.get(store.keys.deleted) or 0)


def heartbeat(store: JobStore, worker: str, ttl_s: float) -> None:
    """Record that `worker` is alive for the next `ttl_s` seconds (the live-workers metric)."""
    t = time.time()
    with store.r.pipeline(transaction=True) as pipe:
        pipe.zadd(store.keys.workers_key, {worker: t + ttl_s})
        pipe.zremrangebyscore(store.keys.workers_key, "-inf", t - 3600)  # long gone
        pipe.execute()


def lifecycle_counts(store: JobStore) -> dict[str, int]:
    """Live workers, live leases, and the counters of expired leases and re-queues."""
    t = time.time()
    raw = {_text(k): int(v) for k, v in store.r.hgetall(store.keys.lifecycle_key).items()}
    return {
        "workers": int(store.r.zcount(store.keys.workers_key, t, "+inf")),
        "leases": int(store.r.zcount(store.keys.leases_key, t, "+inf")),
        "leases_expired": raw.get("leases_expired", 0),
        "requeued": raw.get("requeued", 0),
    }
