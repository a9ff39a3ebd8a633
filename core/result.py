"""Typed results of the engine and of a whole run (pydantic; no torch import).

:class:`PruneResult` is what :func:`core.run.engine.prune` and the block loop return;
:class:`RunReport` is what :func:`core.run.pipeline.run` returns and writes as ``report.json``
(``model_dump(mode="json")``). The worker, the exporters and the human reports read it by attribute.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "CalibrationInfo",
    "Evaluation",
    "ExpertTokens",
    "GateCheck",
    "GateOutcome",
    "Generation",
    "ModelInfo",
    "PruneResult",
    "RecoveryCheck",
    "RecoveryInfo",
    "RunReport",
    "SparsityInfo",
    "SweepResult",
    "TaskScore",
    "Variant",
    "Verdict",
]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ExpertTokens(BaseModel):
    """Calibration tokens the router sent to each expert of one experts module."""

    module: str
    tokens: list[int]
    """``tokens[e]``: tokens expert ``e`` saw (summed over its matrices' first input)."""
    fallback_magnitude: list[int] = Field(default_factory=list)
    """Experts that saw no token and were pruned by magnitude instead."""


class PruneResult(BaseModel):
    """What the block loop did."""

    method: str
    pattern: str
    target: float
    nblocks: int
    layers: dict[str, float] = Field(default_factory=dict)
    """``{qualified name: achieved sparsity}`` of every pruned matrix (experts: ``….experts.<e>.<param>``)."""
    layer_records: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-layer report records (method, allocation, refine, sparsity, recon_error, ...)."""
    owl: dict[str, Any] | None = None
    ignored: list[str] = Field(default_factory=list)
    experts: list[ExpertTokens] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    mask_s: float = 0.0
    prune_s: float = 0.0
    resumed_from_block: int | None = None
    """First block pruned by this process when it continued from a resume directory."""
    placement: dict[str, Any] | None = None
    """Where weights and activations lived and why (:class:`core.model.placement.Placement`)."""
    # streaming-only facts (None in memory)
    streaming: bool = False
    family: str | None = None
    params: int | None = None
    sparsity: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    timings: dict[str, Any] = Field(default_factory=dict)
    checkpoint_bytes: int | None = None
    output_bytes: int | None = None
    spilled: bool | None = None
    sampled_peak_rss_mb: float | None = None


class ModelInfo(_Closed):
    """The model that was pruned."""

    source: str
    family: str
    architecture: str
    model_type: str | None
    nblocks: int
    params: int
    dtype: str
    device: str
    gguf: bool
    gguf_cache: Literal["hit", "miss", "off", "error"] | None = None
    """GGUF sources: whether the host's cache of dequantized models (:mod:`core.model.model_cache`) served
    the weights (``hit``), was filled (``miss``), is disabled (``off``) or failed (``error``)."""


class CalibrationInfo(_Closed):
    """The calibration windows actually used."""

    source: str
    nsamples: int
    seqlen: int
    seed: int


class SparsityInfo(_Closed):
    """Measured zeros of the prunable linears (:func:`core.evaluation.evaluate.sparsity_report`)."""

    target: float | None
    overall: float
    all_linears: float | None = None
    layers: dict[str, float] = Field(default_factory=dict)
    ignored: list[str] = Field(default_factory=list)
    nm_ok: bool | None = None


class TaskScore(_Closed):
    """One zero-shot task (lm-evaluation-harness) on the dense and the pruned model."""

    task: str
    metric: str
    dense: float | None = None
    pruned: float | None = None
    stderr_dense: float | None = None
    stderr_pruned: float | None = None
    samples: int | None = None
    source: str = Field(description="Where the task came from: a local task folder or 'hub'.")


class Evaluation(_Closed):
    """Perplexity before and after (the dense one possibly from the cached baseline)."""

    dense_ppl: float | None
    dense_cached: bool = False
    pruned_ppl: float | None
    windows: int | None
    seqlen: int
    tokens: int | None
    formula: str
    source: str | None
    tasks: list[TaskScore] = Field(default_factory=list)
    recovered_ppl: float | None = None
    """Perplexity after the recovery stage (``pruned_ppl`` is then the one-shot pruned model's)."""

    @property
    def final_ppl(self) -> float | None:
        """The delivered model's perplexity: recovered when the run recovered, else pruned."""
        return self.recovered_ppl if self.recovered_ppl is not None else self.pruned_ppl

    @property
    def ratio(self) -> float | None:
        """final/dense perplexity (:attr:`final_ppl`), or None when either was not measured."""
        final = self.final_ppl
        if not self.dense_ppl or final is None:
            return None
        return float(final) / float(self.dense_ppl)


class RecoveryCheck(_Closed):
    """Sparsity after the recovery merge, checked against the masks the pruning left."""

    zeros_kept: bool
    """Every weight pruned before recovery is exactly zero after the merge."""
    pruned_entries: int
    """Weights pruned before recovery (all still zero when ``zeros_kept``)."""
    rows_ok: bool
    """Every row of every pruned matrix has at least as many zeros as before (per-row budgets)."""
    nm_ok: bool | None
    """Every N:M group valid after the merge (None for unstructured)."""


class RecoveryInfo(_Closed):
    """What the recovery stage did (:mod:`core.run.recovery`)."""

    mode: str
    steps: int
    tokens: int
    seqlen: int
    batch: int
    lr: float
    seed: int
    source: str
    train_windows: int
    trainable_params: int
    gradient_checkpointing: bool
    autocast: str | None
    seconds: float
    resumed_from_step: int | None = None
    losses: list[tuple[int, float]] = Field(default_factory=list)
    """``(step, training loss)``, at most 1000 points (evenly thinned on long runs)."""
    check: RecoveryCheck
    pruned_ppl: float | None = None
    recovered_ppl: float | None = None


class Verdict(_Closed):
    """A plain verdict on the perplexity ratio (:mod:`core.artifacts.report.verdict`)."""

    ratio: float | None
    label: str
    text: str
    warning: bool


class GateCheck(_Closed):
    name: str
    limit: float
    value: float | None
    passed: bool


class GateOutcome(_Closed):
    """A quality gate's outcome; for a sweep, ``variant`` is the sparsest passing variant."""

    passed: bool
    checks: list[GateCheck]
    variant: str | None = None


class Generation(_Closed):
    prompt: str
    dense: str | None
    pruned: str | None


class Variant(_Closed):
    """One variant of a sweep: its own pruning, evaluation and artifact directory."""

    label: str
    method: str
    pattern: str
    target: float
    sparsity: float
    nm_ok: bool | None
    pruned_ppl: float | None
    ppl_ratio: float | None
    verdict: str
    gate: GateOutcome | None = None
    tasks: list[TaskScore] = Field(default_factory=list)
    dir: str
    prune_s: float


class SweepResult(_Closed):
    """Every variant of a sweep and the one the top-level report describes."""

    variants: list[Variant]
    headline: str
    """The gate's pick when one passes, else the sparsest variant."""
    chosen_by_gate: bool
    captures: int = 0
    """Calibration argument captures run for all the variants together (1: shared)."""


class RunReport(_Closed):
    """One run's report (``report.json``). For a sweep, the top-level sections describe the
    headline variant (:attr:`SweepResult.headline`); each variant has its own report."""

    spec: dict[str, Any]
    versions: dict[str, Any]
    model: ModelInfo
    calibration: CalibrationInfo
    sparsity: SparsityInfo
    layers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    allocation: dict[str, Any] | None = None
    evaluation: Evaluation | None
    timings: dict[str, float]
    generations: list[Generation] = Field(default_factory=list)
    peak_rss_mb: float | None = None
    peak_cuda_mb: float | None = None
    placement: dict[str, Any] | None = None
    """Where weights and calibration activations lived, the sizes compared and why (core.model.placement)."""
    streaming: dict[str, Any]
    experts: list[ExpertTokens] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    artifacts: dict[str, Any] | None = None
    verdict: Verdict | None = None
    gate: GateOutcome | None = None
    plots: list[str] = Field(default_factory=list)
    sweep: SweepResult | None = None
    variant: str | None = None
    """The sweep variant this report describes (None outside sweeps)."""
    recovery: RecoveryInfo | None = None
    """The recovery stage (None when the run did not recover)."""

    def to_json(self) -> dict[str, Any]:
        """The JSON document written as ``report.json``."""
        return self.model_dump(mode="json")
