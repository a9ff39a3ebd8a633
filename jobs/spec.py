"""Job request and job record models (pydantic only; no torch)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.spec import RunSpec


class JobStatus(StrEnum):
    """Lifecycle of a job."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        """True when the job will never change again."""
        return self in TERMINAL


TERMINAL: frozenset[JobStatus] = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled})
HELD: frozenset[JobStatus] = frozenset({JobStatus.running, JobStatus.cancelling})
"""Statuses in which a worker holds the job (and renews its lease)."""
ACTIVE: frozenset[JobStatus] = frozenset({JobStatus.queued, *HELD})
"""Statuses that count against a tenant's active-job limit: every status but the terminal ones."""


WebhookEvent = Literal["started", "progress", "completed"]


class WebhookSpec(BaseModel):
    """Where to POST signed notifications about the job (Standard Webhooks)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # as core.spec's models

    url: str = Field(max_length=2048, description="http(s) URL receiving the deliveries.")
    events: list[WebhookEvent] = Field(
        default=["completed"],
        min_length=1,
        max_length=3,
        description="Subset of started, progress (once per pruned block) and completed "
        "(succeeded, failed or cancelled).",
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"webhook events must not repeat, got {v}")
        return v


class JobRequest(RunSpec):
    """The body of `POST /v1/jobs`: a `core.spec.RunSpec` plus an optional `webhook` (unknown fields
    are refused)."""

    webhook: WebhookSpec | None = Field(default=None, description="Optional job notifications.")

    def to_run_spec(self) -> RunSpec:
        """The run spec handed to the engine (without service-only fields)."""
        return RunSpec.model_validate(self.model_dump(exclude={"webhook"}))


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobProgress(_Record):
    """Where a running job is."""

    stage: str | None = Field(
        default=None, description="loading, calibrating, pruning, evaluating, exporting or uploading."
    )
    block: int | None = Field(default=None, description="1-based decoder block while pruning.")
    nblocks: int | None = None
    fraction: float = Field(default=0.0, ge=0.0, le=1.0, description="Overall fraction done.")
    eta_s: float | None = Field(default=None, description="Estimated seconds left.")
    message: str = ""
    variant: str | None = Field(default=None, description="The sweep variant this step belongs to.")


class JobError(_Record):
    """Why a job failed: a stable machine-readable code and a message fit for users."""

    code: str
    message: str


class JobSummary(_Record):
    """Headline metrics of a finished job (from the engine's report.json)."""

    dense_ppl: float | None = None
    pruned_ppl: float | None = Field(default=None, description="One-shot pruned perplexity.")
    recovered_ppl: float | None = Field(
        default=None, description="Perplexity after the recovery stage; `ppl_ratio` uses it."
    )
    measured_sparsity: float | None = Field(
        default=None,
        description="Measured overall sparsity of the pruned layers (report.json `sparsity.overall`); "
        "the requested target is `prune.sparsity`.",
    )
    sparsity: float | None = Field(
        default=None,
        deprecated="renamed measured_sparsity (docs/core.md, 'Renamed names'); same value",
        description="Deprecated name of `measured_sparsity` (same value).",
    )
    durations: dict[str, float] = Field(default_factory=dict, description="Seconds per engine stage.")
    ppl_ratio: float | None = Field(default=None, description="final (recovered)/dense perplexity.")
    verdict: str | None = Field(default=None, description="good, fair, poor, damaged or unknown.")
    gate: dict[str, Any] | None = Field(
        default=None,
        description="Quality gate outcome `{passed, checks, variant}`; `passed: false` keeps artifacts. "
        "For a sweep, `variant` is the sparsest passing variant.",
    )
    variant: str | None = Field(default=None, description="Sweep: the headline variant the metrics are of.")
    variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Sweep: `{label, method, pattern, sparsity, pruned_ppl, ppl_ratio, passed}` per variant.",
    )
    tasks: list[dict[str, Any]] = Field(
        default_factory=list, description="Zero-shot tasks: `{task, metric, dense, pruned}` (lm-eval)."
    )

    @model_validator(mode="before")
    @classmethod
    def _same_sparsity(cls, data: Any) -> Any:
        """Either name fills both (records stored before the rename hold `sparsity` only)."""
        if isinstance(data, dict):
            value = data.get("measured_sparsity", data.get("sparsity"))
            data = {**data, "measured_sparsity": value, "sparsity": value}
        return data


class FanOut(_Record):
    """A sweep job whose variants run as jobs of their own (`jobs.lifecycle.fan_out`)."""

    variants: dict[str, str] = Field(description="Variant label -> the id of the job pruning it.")
    gathering: bool = Field(
        default=False, description="Every variant succeeded; a worker writes the sweep's report."
    )


class Job(_Record):
    """A job record as stored and as returned by the API."""

    id: str
    tenant: str
    status: JobStatus
    request: JobRequest
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: JobProgress = Field(default_factory=JobProgress)
    error: JobError | None = None
    summary: JobSummary | None = None
    attempts: int = Field(default=0, description="How many times a worker started this job.")
    sources: dict[str, str] = Field(
        default_factory=dict,
        description="Checked locations (model, calibration, evaluation) the worker loads.",
    )
    delivery: str | None = Field(
        default=None,
        description="Token of the job's current task message (its fencing token): it changes whenever "
        "the job is sent again (first enqueue never confirmed, lease expired, upload retry); workers "
        "skip messages carrying an older one and every write of a worker holding an older one is refused.",
    )
    fanout: FanOut | None = Field(
        default=None, description="Sweep fanned out over workers: one job per variant (docs/reliability.md)."
    )
    parent: str | None = Field(default=None, description="Variant job: the id of its sweep job.")
    variant: str | None = Field(default=None, description="Variant job: the label of the variant it prunes.")


UNREADABLE = "unreadable_record"
"""`JobError.code` of a job whose stored record does not parse (written by hand or another version)."""


class UnreadableJob(_Record):
    """What is known of a job whose stored record does not parse as a `Job`: its id, tenant and status
    (read leniently) and why it cannot be read. Such a job can be cancelled; a worker fails it."""

    id: str
    tenant: str | None = None
    status: JobStatus | None = None
    error: JobError


class JobPage(_Record):
    """One page of a job listing; pass `next` as `after` to get the following page."""

    items: list[Job]
    unreadable: list[UnreadableJob] = Field(
        default_factory=list,
        description="Jobs of this page whose stored record cannot be read (cancel them, or let a worker "
        "fail them); the page's other jobs are in `items`.",
    )
    next: str | None = None
