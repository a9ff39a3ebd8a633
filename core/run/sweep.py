"""Sweeps: several variants pruned from one dense model.

Serially in one run, the dense weights of the decoder blocks are copied once (:class:`DenseSnapshot`)
and put back before every variant after the first. Fanned out (the service runs each variant as a job
of its own: ``core.run.pipeline.run(..., variant=label)``), :func:`gather` writes the sweep's top-level
report from the variants' reports. Both build it with :func:`sweep_report`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.artifacts import export
from core.artifacts import report as report_doc
from core.errors import InvalidInput
from core.evaluation import gate as gates
from core.result import GateOutcome, RunReport, SweepResult, Variant
from core.spec import GateSpec, PruneSpec, RunSpec

VARIANTS_DIR = "variants"


class DenseSnapshot:
    """A copy of every parameter of ``blocks`` (what pruning changes), restorable in place."""

    def __init__(self, blocks: nn.Module) -> None:
        self.blocks = blocks
        with torch.no_grad():
            self.saved = {n: p.detach().clone() for n, p in blocks.named_parameters()}

    @torch.no_grad()
    def restore(self) -> None:
        """Put the dense weights back (into the same parameter objects)."""
        for n, p in self.blocks.named_parameters():
            p.copy_(self.saved[n])


def variant_entry(label: str, prune: PruneSpec, report: RunReport, prune_s: float) -> Variant:
    """The sweep-table row of one variant's report."""
    ev = report.evaluation
    return Variant(
        label=label,
        method=prune.method,
        pattern=prune.pattern,
        target=prune.target_sparsity,
        sparsity=report.sparsity.overall,
        nm_ok=report.sparsity.nm_ok,
        pruned_ppl=ev.final_ppl if ev else None,
        ppl_ratio=ev.ratio if ev else None,
        verdict=report.verdict.label if report.verdict else "unknown",
        gate=report.gate,
        tasks=list(ev.tasks) if ev else [],
        dir=f"{VARIANTS_DIR}/{label}",
        prune_s=prune_s,
    )


def summarize(variants: list[Variant], gate: GateSpec | None) -> tuple[SweepResult, GateOutcome | None]:
    """The sweep section and, with a gate, the top-level gate outcome: the sparsest passing
    variant is the headline; with no gate or none passing, the sparsest variant is."""
    chosen = None
    if gate is not None:
        chosen = gates.pick([(v.label, v.sparsity, v.gate) for v in variants if v.gate is not None])
    sparsest = max(enumerate(variants), key=lambda iv: (iv[1].sparsity, -iv[0]))[1].label
    headline = chosen or sparsest
    top_gate = None
    if gate is not None:
        head = next(v for v in variants if v.label == headline)
        checks = head.gate.checks if head.gate is not None else []
        top_gate = GateOutcome(passed=chosen is not None, checks=checks, variant=chosen)
    return SweepResult(variants=variants, headline=headline, chosen_by_gate=chosen is not None), top_gate


def sweep_report(
    spec: RunSpec, reported: RunSpec, reports: list[RunReport], timings: dict[str, float], captures: int
) -> RunReport:
    """The sweep's top-level report from its variants' reports (in ``spec.variants()`` order): the
    sweep table, the gate's pick, and the headline variant's sections."""
    entries = [
        variant_entry(label, prune, rep, rep.timings["prune_s"])
        for (label, prune), rep in zip(spec.variants(), reports, strict=True)
    ]
    result, top_gate = summarize(entries, spec.gate)
    result.captures = captures
    head = reports[[e.label for e in entries].index(result.headline)]
    return head.model_copy(
        update={
            "spec": reported.model_dump(mode="json"),
            "timings": timings,
            "artifacts": None,
            "plots": [],
            "gate": top_gate,
            "sweep": result,
            "variant": result.headline,
        }
    )


def gather(spec: RunSpec, reported: RunSpec, reports: list[RunReport], root: Path) -> RunReport:
    """Write the top-level report of a sweep whose variants ran as runs of their own into ``root``,
    which holds each variant's artifacts under ``variants/<label>/``; the manifest lists them all.

    Timings add up every variant's (each loaded, calibrated and measured the dense model itself),
    peak RSS is the largest variant's."""
    if len(reports) != len(spec.variants()):
        raise InvalidInput(f"a sweep of {len(spec.variants())} variants got {len(reports)} reports")
    timings: dict[str, float] = {}
    for rep in reports:
        for k, v in rep.timings.items():
            timings[k] = timings.get(k, 0.0) + float(v)
    report = sweep_report(spec, reported, reports, timings, captures=len(reports))
    peaks = [r.peak_rss_mb for r in reports if r.peak_rss_mb is not None]
    report.peak_rss_mb = max(peaks) if peaks else None
    report_doc.finish(root, report, spec)
    export.write_reports(root, report, spec.outputs)
    return report
