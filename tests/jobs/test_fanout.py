"""The fan-out state machine of sweeps (jobs.lifecycle.fan_out / fan_check) on a real Redis."""

from __future__ import annotations

import pytest

from jobs import lifecycle
from jobs.spec import JobError, JobRequest, JobStatus
from jobs.store import Fenced, JobStore
from tests.jobs.test_lifecycle import Recorder, claim, expire

S = JobStatus
SWEEP = JobRequest.model_validate(
    {"model": {"source": "/m"}, "sweep": {"sparsities": [0.3, 0.5]}, "webhook": {"url": "https://h/x"}}
)
LABELS = ["wanda-0.3", "wanda-0.5"]


def fanned(store: JobStore, q: Recorder) -> tuple[str, dict[str, str]]:
    job, _ = store.create("acme", SWEEP)
    store.confirm_sent(job.id, job.delivery)
    held = claim(store, job.id)
    parent = lifecycle.fan_out(store, q, job.id, held.delivery, LABELS)
    assert parent.fanout is not None
    return job.id, parent.fanout.variants


def run_variant(store: JobStore, job_id: str, to: S, **changes) -> None:
    held = claim(store, job_id, worker="w2")
    lifecycle.finish(store, job_id, held.delivery, to, **changes)


def test_fan_out_makes_one_hidden_job_per_variant(store: JobStore) -> None:
    q = Recorder()
    job_id, variants = fanned(store, q)
    assert list(variants) == LABELS
    parent = store.require(job_id)
    assert parent.status == S.running and not store.lease_live(job_id) and store.fanouts() == [job_id]
    for label, child_id in variants.items():
        child = store.require(child_id)
        assert child.status == S.queued and child.parent == job_id and child.variant == label
        assert child.tenant == "acme~sweep" and child.request.webhook is None
        assert (child_id, child.delivery, None) in q.sent  # sent with its own token
    assert store.list("acme").items == [parent] and store.active_count("acme") == 1
    with pytest.raises(Fenced):  # the attempt that fanned it out holds it no more
        lifecycle.progress(store, job_id, store.require(job_id).delivery + "x", parent.progress)


def test_all_variants_succeeded_queue_the_gather_step(store: JobStore) -> None:
    q = Recorder()
    job_id, variants = fanned(store, q)
    run_variant(store, variants["wanda-0.3"], S.succeeded)
    assert lifecycle.fan_check(store, q, job_id).status == S.running  # one still queued
    run_variant(store, variants["wanda-0.5"], S.succeeded)
    parent = lifecycle.fan_check(store, q, job_id)
    assert parent.status == S.queued and parent.fanout.gathering
    assert q.sent[-1] == (job_id, parent.delivery, None)
    assert lifecycle.fan_check(store, q, job_id).delivery == parent.delivery  # idempotent: sent once
    gather = claim(store, job_id)
    assert gather.status == S.running and gather.attempts == 2
    lifecycle.finish(store, job_id, gather.delivery, S.succeeded)
    lifecycle.fan_done(store, job_id)
    assert store.fanouts() == [] and not store.r.exists(store.keys.fan_key(job_id))


def test_a_failed_variant_fails_the_sweep_and_stops_the_rest(store: JobStore) -> None:
    q = Recorder()
    job_id, variants = fanned(store, q)
    err = JobError(code="worker_lost", message="worker died 3 times while running this job")
    run_variant(store, variants["wanda-0.5"], S.failed, error=err)
    cleaned: list[str] = []
    parent = lifecycle.fan_check(store, q, job_id, on_finished=lambda j: cleaned.append(j.id))
    assert parent.status == S.failed and parent.error.code == "worker_lost"
    assert parent.error.message.startswith("variant wanda-0.5: worker died")
    assert store.require(variants["wanda-0.3"]).status == S.cancelled  # queued: never starts
    assert set(cleaned) == {job_id, *variants.values()} and store.fanouts() == []
    assert q.sent[-1] == (job_id, parent.delivery, None)  # its completion webhook's notice
    assert store.active_count("acme") == 0


def test_cancel_waits_for_running_variants(store: JobStore) -> None:
    q = Recorder()
    job_id, variants = fanned(store, q)
    held = claim(store, variants["wanda-0.3"], worker="w2")
    assert lifecycle.cancel(store, job_id).status == S.cancelling
    assert store.require(variants["wanda-0.5"]).status == S.cancelled  # queued one: at once
    assert lifecycle.sweep_stopped(store, store.require(variants["wanda-0.3"]))
    assert lifecycle.fan_check(store, q, job_id).status == S.cancelling  # one still running
    lifecycle.finish(store, variants["wanda-0.3"], held.delivery, S.cancelled)
    lifecycle.sweep_fanouts(store, q)
    assert store.require(job_id).status == S.cancelled and store.fanouts() == []


def test_a_variant_lost_by_its_worker_is_requeued_alone(store: JobStore) -> None:
    q = Recorder()
    job_id, variants = fanned(store, q)
    lost = claim(store, variants["wanda-0.3"], worker="w2")
    expire(store, lost.id)
    assert lifecycle.sweep_leases(store, q, cap=3) == [lost.id]
    again = store.require(lost.id)
    assert again.status == S.queued and again.attempts == 1 and again.delivery != lost.delivery
    assert store.require(job_id).status == S.running  # the sweep waits; its other variant untouched
    assert store.require(variants["wanda-0.5"]).status == S.queued
