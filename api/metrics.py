"""Prometheus metrics: HTTP latency (middleware) plus job counts, queue depth, job durations, live
workers, leases and re-queues read from Redis at scrape time (the worker runs in other processes)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from jobs import metrics

if TYPE_CHECKING:
    from api.deps import Services

log = logging.getLogger("api.metrics")


class JobsCollector(Collector):
    """Job gauges computed from the service's Redis keys on every scrape."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Metric]:
        try:
            counts = metrics.status_counts(self.svc.store)
            messages = self.svc.queue.messages()
            life = metrics.lifecycle_counts(self.svc.store)
            buckets, total = metrics.duration_histogram(self.svc.store)
            block_buckets, block_total = metrics.block_histogram(self.svc.store)
            deleted = metrics.deleted_count(self.svc.store)
        except Exception as e:  # a scrape must not fail because Redis is down
            log.warning("metrics unavailable: %s", e)
            return
        jobs = GaugeMetricFamily(
            "prune_jobs", "Stored jobs by status (jobs deleted by retention leave it).", labels=["status"]
        )
        for status, n in sorted(counts.items()):
            jobs.add_metric([status], n)
        yield jobs
        yield CounterMetricFamily(
            "prune_jobs_deleted", "Finished jobs deleted by retention (PRUNE_RETENTION_DAYS).", value=deleted
        )
        yield GaugeMetricFamily(
            "prune_queue_depth",
            "Runnable jobs waiting for a worker (queued; not cancelled).",
            value=counts["queued"],
        )
        yield GaugeMetricFamily(
            "prune_broker_messages",
            "Task messages in the broker list, including those of cancelled or superseded jobs.",
            value=messages,
        )
        yield GaugeMetricFamily(
            "prune_workers_live",
            "Workers whose heartbeat is current (PRUNE_LEASE_EXPIRE).",
            value=life["workers"],
        )
        yield GaugeMetricFamily(
            "prune_leases_live", "Running jobs whose lease is current.", value=life["leases"]
        )
        yield CounterMetricFamily(
            "prune_leases_expired",
            "Leases the sweeper found expired (the job's worker stopped renewing it).",
            value=life["leases_expired"],
        )
        yield CounterMetricFamily(
            "prune_requeues",
            "Jobs put back in the queue for another attempt (lease expired, upload failed).",
            value=life["requeued"],
        )
        yield HistogramMetricFamily(
            "prune_job_duration_seconds",
            "Run time of finished jobs (start to end).",
            buckets=buckets,
            sum_value=total,
        )
        yield HistogramMetricFamily(
            "prune_block_seconds",
            "Time to prune one decoder block (recorded by the workers in Redis).",
            buckets=block_buckets,
            sum_value=block_total,
        )


def http_latency_histogram(registry: CollectorRegistry) -> Histogram:
    """The HTTP latency histogram (method, route template, status), observed by the request middleware."""
    return Histogram(
        "prune_http_request_duration_seconds",
        "HTTP request latency.",
        ["method", "route", "status"],
        registry=registry,
        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    )
