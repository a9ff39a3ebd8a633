"""Sweeps: several variants pruned from one dense model in memory.

The dense weights of the decoder blocks are copied once (:class:`DenseSnapshot`) and put back before
every variant after the first; the report's sweep table and headline come from :func:`summarize`.
"""

from __future__ import annotations

import torch
from torch import nn

from core.evaluation import gate as gates
from core.result import GateOutcome, RunReport, SweepResult, Variant
from core.spec import GateSpec, PruneSpec

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
