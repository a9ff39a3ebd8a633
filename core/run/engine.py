"""The block loop: sequential, block-by-block pruning of a causal LM, shared by every mode.

The loop's parts live in their own modules, each importing only downwards:

1. **Arguments** (:mod:`core.model.capture`): one recorder forward per calibration batch records what
   the model passes every decoder block.
2. **Hidden states** (:mod:`core.model.hidden`): block ``i``'s outputs per batch, on the compute device,
   in host memory or spilled, as :mod:`core.model.placement` decides.
3. **Statistics** (:mod:`core.run.block_stats`) and **per-block pruning** (:mod:`core.run.block_prune`):
   collect what the method ``needs`` over every batch, prune each matrix; the loop then re-runs the
   block so that the next one is calibrated on the *pruned* outputs. Methods with no statistics
   (magnitude) run no forward pass at all.
4. **Weights** come from a :class:`core.model.weights.WeightSource`: in memory, onloaded to the compute
   device block by block (:class:`core.model.weights.Onload`), or streamed from safetensors shards
   (``core.run.streaming``), loaded, written and released block by block.
5. **Resume**: with ``resume_dir`` every finished block's weights and the next block's inputs are
   persisted atomically (:mod:`core.run.resume`); a rerun with the same fingerprint continues after
   the last finished block and produces bit-identical weights.

The names of those modules are re-exported here (``engine.capture``, ``engine.HiddenStore``...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from core.errors import InvalidInput
from core.model import families, placement
from core.model.capture import (
    Args,
    Batch,
    CaptureCache,
    Captured,
    capture,
    capture_block_inputs,
    run_block,
    split_args,
)
from core.model.hidden import Batches, HiddenStore
from core.model.weights import InMemory, WeightSource, compute_device, source_for
from core.progress import CancelFn, ProgressFn, check_cancel, report_block
from core.result import ExpertTokens, PruneResult
from core.run import resume
from core.run.block_prune import (
    BlockResult,
    check_hessian_memory,
    check_nm_shapes,
    hessian_limit_bytes,
    method_named,
    prune_block,
    prune_targets,
)
from core.run.block_stats import collect_stats, eager_experts
from core.run.layer_prune import layer_needs
from core.run.owl_pass import owl_budgets
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.methods.base import Method

__all__ = [
    "Args",
    "Batch",
    "BlockResult",
    "CaptureCache",
    "Captured",
    "HiddenStore",
    "InMemory",
    "WeightSource",
    "capture",
    "capture_block_inputs",
    "check_hessian_memory",
    "check_nm_shapes",
    "collect_stats",
    "hessian_limit_bytes",
    "prune",
    "prune_block",
    "prune_targets",
    "run_block",
    "run_blocks",
    "split_args",
]


def __getattr__(name: str) -> int:
    """``HESSIAN_LIMIT_BYTES``: the old constant's name, now the value read when used."""
    if name == "HESSIAN_LIMIT_BYTES":
        return hessian_limit_bytes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _expert_report(tokens: dict[str, int], fallback: list[str]) -> list[ExpertTokens]:
    """Group ``….experts.<e>.<x>`` matrices by experts module: tokens of each expert's first matrix."""
    import re

    mods: dict[str, dict[int, int]] = {}
    fb: dict[str, set[int]] = {}
    for name, n in tokens.items():
        m = re.match(r"(.*\.experts)\.(\d+)\.", name)
        if not m:
            continue
        e = int(m.group(2))
        d = mods.setdefault(m.group(1), {})
        d.setdefault(e, n)  # first matrix of the expert: the routed tokens
        if name in fallback:
            fb.setdefault(m.group(1), set()).add(e)
    return [
        ExpertTokens(
            module=k,
            tokens=[d.get(e, 0) for e in range(max(d) + 1)],
            fallback_magnitude=sorted(fb.get(k, ())),
        )
        for k, d in mods.items()
    ]


def _checked_inputs(
    model: nn.Module, calibration: torch.Tensor, spec: PruneSpec
) -> tuple[Method, families.Family, nn.ModuleList]:
    """``(method, family, blocks)`` after checking the calibration shape, the N:M shapes and the
    first block's solver memory."""
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise InvalidInput(
            f"calibration must be a [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}"
        )
    method = method_named(spec.method)
    family = families.family_for(model)
    blocks = families.get_blocks(model, family)
    check_nm_shapes(model, family, spec)
    for i, block in enumerate(blocks[:1]):
        _check_block_memory(block, family.blocks, i, method, spec)
    return method, family, blocks


def _check_block_memory(block: nn.Module, prefix: str, i: int, method: Method, spec: PruneSpec) -> None:
    """Refuse block ``i`` before pruning when its solver's matrices would not fit in memory."""
    check_hessian_memory(prune_targets(block, f"{prefix}.{i}", spec)[0], method, f"block {i}", spec)


def _resume_partial(
    result: PruneResult, ckpt: resume.BlockCheckpoints | None, start: int
) -> tuple[dict[str, int], list[str]]:
    """Copy the partial result of the ``start`` finished blocks into ``result``; returns the expert
    token counts and fallback experts recorded so far (empty for a fresh run)."""
    if ckpt is not None and start:
        result.resumed_from_block = start
        prev = ckpt.partial_result()
        result.layers, result.ignored, result.mask_s = prev.layers, prev.ignored, prev.mask_s
        result.layer_records = prev.layer_records
        result.warnings = prev.warnings
    tokens: dict[str, int] = dict(ckpt.tokens() if ckpt and start else {})
    fallback: list[str] = list(ckpt.fallback() if ckpt and start else [])
    return tokens, fallback


def _capture_store(
    model: nn.Module,
    blocks: nn.ModuleList,
    cal: torch.Tensor,
    batch_size: int,
    dev: torch.device,
    source: WeightSource,
    capture_cache: CaptureCache | None,
    ckpt: resume.BlockCheckpoints | None,
    start: int,
    sdir: Path | None,
    place: placement.Placement,
) -> tuple[Captured, HiddenStore]:
    """Capture the blocks' arguments and put the hidden states (the resumed ones when resuming)
    where the placement says; the capture keeps the arguments only."""
    with source.capture_context():
        cap = (
            capture_cache.get(model, blocks, cal, batch_size, dev)
            if capture_cache is not None
            else capture(model, blocks, cal, batch_size, dev)
        )
    hidden = ckpt.hidden() if ckpt and start else cap.hidden
    store = HiddenStore(sdir, hidden, device=dev, host=place.activations == "host", pin=place.pinned)
    cap.hidden = []
    del hidden
    return cap, store


def _record_block(result: PruneResult, res: BlockResult, tokens: dict[str, int], fallback: list[str]) -> None:
    """Add one pruned block's layers, records, timings and expert counts to the run's totals."""
    result.layers.update(res.layers)
    result.layer_records.update(res.records)
    result.ignored.extend(res.ignored)
    result.mask_s += res.mask_s
    tokens.update(res.tokens)
    fallback.extend(res.fallback)
    for name in res.fallback:
        result.warnings.append(
            f"{name} saw no calibration token (the router never chose it): pruned by magnitude"
        )


def _advance_hidden(store: HiddenStore, cap: Captured, block: nn.Module, i: int) -> None:
    """Replace the hidden states by block ``i``'s (pruned) outputs: the next block's inputs."""
    for j in range(len(store)):
        store.replace(j, run_block(block, (store[j], *cap.args[i][j])))
    cap.args[i] = []  # this block's arguments are no longer needed


@dataclass
class _BlockLoop:
    """What the block loop shares between blocks: the method, the calibration state (captured
    arguments, hidden states, OWL budgets) and the totals (result, expert tokens, fallbacks)."""

    prefix: str
    nblocks: int
    method: Method
    spec: PruneSpec
    ntokens: int
    result: PruneResult
    tokens: dict[str, int]
    fallback: list[str]
    ckpt: resume.BlockCheckpoints | None
    cap: Captured | None = None
    store: HiddenStore | None = None
    budgets: dict[str, int] | None = None

    def owl_pass(
        self, blocks: nn.ModuleList, start: int, should_cancel: CancelFn | None, source: WeightSource
    ) -> None:
        """OWL's dense pass over every block: the per-layer sparsity budgets (not resumable)."""
        if start:
            raise InvalidInput("allocation 'owl' cannot resume from block checkpoints")
        assert self.cap is not None and self.store is not None
        self.budgets, owl_info = owl_budgets(
            blocks, self.prefix, self.store, self.cap.args, self.spec, should_cancel, source
        )
        self.result.owl = owl_info

    def prune(self, i: int, block: nn.Module, source: WeightSource) -> None:
        """Prune loaded block ``i``, record it, compute the next block's inputs, hand it back to
        ``source`` (written back or released), checkpoint it."""
        cap, store, last = self.cap, self.store, i + 1 >= self.nblocks
        if i > 0:
            _check_block_memory(block, self.prefix, i, self.method, self.spec)
        batches = Batches(store, cap.args[i]) if cap is not None and store is not None else []
        res = prune_block(
            block, f"{self.prefix}.{i}", batches, self.method, self.spec, self.budgets, self.ntokens
        )
        _record_block(self.result, res, self.tokens, self.fallback)
        if store is not None and cap is not None and not last:
            _advance_hidden(store, cap, block, i)
        written = source.written(i)
        if self.ckpt is not None and written is None:
            self.ckpt.save_weights(i, block)
        source.done(i, block)
        if self.ckpt is not None:
            hidden = store if not last else None
            self.ckpt.save_block(i, written, hidden, self.result, self.tokens, self.fallback)


@torch.no_grad()
def run_blocks(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: PruneSpec,
    source: WeightSource | None = None,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    *,
    resume_dir: Path | None = None,
    spill_dir: Path | None = None,
    device: torch.device | str | None = None,
    note: str = "",
    capture_cache: CaptureCache | None = None,
    max_device_memory: int | None = None,
    max_host_memory: int | None = None,
) -> PruneResult:
    """Prune every decoder block of ``model`` on calibration ids ``[n, seqlen]``: the one loop.

    ``device``: the compute device (default: where the model's weights are). ``source`` provides
    block weights; default: in memory when the weights are on ``device``, else
    :class:`core.model.weights.Onload` (each block copied to ``device`` and back, the model's weights
    stay where the caller put them). The calibration activations stay on the device, in host
    memory or on disk as :func:`core.model.placement.plan` decides from ``max_device_memory`` and
    ``max_host_memory`` (bytes; default: the worker settings, else 90% of what is free); the
    choice and its reasons are ``result.placement``. ``spill_dir``: keep the hidden states there
    (forces disk). ``resume_dir``: persist each finished block and continue a run interrupted
    earlier with the same fingerprint (:mod:`core.run.resume`). ``capture_cache``: reuse the block
    arguments captured by an earlier prune of the same dense model.
    """
    t0 = time.perf_counter()
    method, family, blocks = _checked_inputs(model, calibration, spec)
    need_stats = layer_needs(method, spec).any or spec.allocation == "owl"
    nblocks = len(blocks)
    cal = calibration.to(torch.long)
    dev = compute_device(model, device)
    source = source or source_for(model, blocks, dev)
    place = placement.plan_run(
        model, blocks, cal.shape, spec.batch_for(cal.shape[-1], dev.type), dev, source.where,
        "hessian" in method.needs, (max_device_memory, max_host_memory), spill_dir,
        fit=spec.batch_size is None and dev.type == "cuda",
    )  # fmt: skip
    batch_size = place.batch_size or 1
    ckpt = (
        resume.BlockCheckpoints.open(resume_dir, resume.fingerprint(model, cal, spec)) if resume_dir else None
    )
    start = ckpt.done if ckpt else 0
    result = PruneResult(
        method=spec.method, pattern=spec.pattern, target=spec.target_sparsity, nblocks=nblocks,
        placement=place.report(),
    )  # fmt: skip
    tokens, fallback = _resume_partial(result, ckpt, start)
    run = _BlockLoop(family.blocks, nblocks, method, spec, cal.numel(), result, tokens, fallback, ckpt)
    was_training = model.training
    model.eval()
    check_cancel(should_cancel)
    try:
        with eager_experts(model), placement.spill_area(place, spill_dir) as sdir:
            if need_stats and start < nblocks:
                run.cap, run.store = _capture_store(
                    model, blocks, cal, batch_size, dev, source, capture_cache, ckpt, start, sdir, place
                )
            if spec.allocation == "owl":
                run.owl_pass(blocks, start, should_cancel, source)
            for i, block in enumerate(blocks):
                check_cancel(should_cancel)
                if i < start:
                    assert ckpt is not None
                    source.restore(i, block, ckpt)
                    source.done(i, block)
                    continue
                source.load(i, block)
                run.prune(i, block, source)
                report_block(on_progress, i + 1, nblocks, note)
    finally:
        model.train(was_training)
    result.experts = _expert_report(tokens, fallback)
    result.prune_s = time.perf_counter() - t0
    return result


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: PruneSpec,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    resume_dir: Path | None = None,
    capture_cache: CaptureCache | None = None,
    *,
    device: torch.device | str | None = None,
    max_device_memory: int | None = None,
    max_host_memory: int | None = None,
) -> PruneResult:
    """Prune ``model`` in place, block by block, on calibration ids ``[n, seqlen]``.

    Progress is reported once per block with stage ``pruning`` and ``fraction = block / nblocks``;
    ``should_cancel`` is checked between blocks. ``capture_cache``, ``device`` and the memory
    budgets: see :func:`run_blocks` (weights off ``device`` are onloaded block by block).
    """
    return run_blocks(
        model, calibration, spec, None, on_progress, should_cancel, resume_dir=resume_dir,
        capture_cache=capture_cache, device=device, max_device_memory=max_device_memory,
        max_host_memory=max_host_memory,
    )  # fmt: skip
