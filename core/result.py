"""Typed results of the engine and of a whole run (pydantic; no torch import).

:class:`PruneResult` is what :func:`core.engine.prune` and the block loop return;
:class:`RunReport` is what :func:`core.pipeline.run` returns and writes as ``report.json``
(``model_dump(mode="json")``: the same keys the untyped report had).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ExpertTokens", "ModelInfo", "PruneResult", "RunReport"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


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


class ModelInfo(_Open):
    source: str
    family: str
    architecture: str
    model_type: str | None
    nblocks: int
    params: int
    dtype: str
    device: str
    gguf: bool


class RunReport(_Open):
    """One run's report (``report.json``)."""

    spec: dict[str, Any]
    versions: dict[str, str]
    model: ModelInfo
    calibration: dict[str, Any]
    sparsity: dict[str, Any]
    evaluation: dict[str, Any] | None
    timings: dict[str, Any]
    peak_rss_mb: float | None = None
    streaming: dict[str, Any]
    experts: list[ExpertTokens] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
