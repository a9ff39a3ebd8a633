"""The block loop: sequential, block-by-block pruning of a causal LM, shared by every mode.

1. **Arguments** (:func:`capture`): one forward of the model per calibration batch with every
   decoder block stood in by a recorder that stores the ``(args, kwargs)`` the model passes
   *that* block (its own attention mask per layer type, rotary ``position_embeddings``, ALiBi,
   position ids...) and returns its input unchanged. The last recorder stops the forward (no
   final norm / head). Cache objects are dropped, ``use_cache`` forced to False; a value equal to
   the previous block's is stored once (shared, not copied).
2. **Per block** (:func:`prune_block`): collect the statistics the method ``needs`` over every
   batch (forward pre-hooks on linears; for fused 3-D experts a torch-function tap inside the
   experts module that records each expert's own inputs: the routed tokens for ``gate_up_proj``,
   that expert's intermediate activations for ``down_proj``), prune each matrix, then re-run the
   block so that the next one is calibrated on the *pruned* outputs. Methods with no statistics
   (magnitude) run no forward pass at all.
3. **Weights** come from a :class:`WeightSource`: in memory (:class:`InMemory`) or streamed from
   safetensors shards (``core.streaming``), loaded, written and released block by block.
4. **Resume**: with ``resume_dir`` every finished block's weights and the next block's inputs are
   persisted atomically (:mod:`core.resume`); a rerun with the same fingerprint continues after
   the last finished block and produces bit-identical weights.

Experts: an expert that saw no calibration token is pruned by magnitude, with a warning.
SparseGPT keeps one ``in × in`` fp32 Hessian per matrix of a block (so ``E × in²`` for fused
experts); above :data:`HESSIAN_LIMIT_BYTES` per block the run is refused before any work.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from core import families
from core.errors import InvalidInput
from core.progress import CancelFn, ProgressFn, check_cancel, report_block
from core.result import ExpertTokens, PruneResult
from core.settings import EngineSettings
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.methods.base import Method
    from core.stats import LayerStats

__all__ = [
    "HESSIAN_LIMIT_BYTES",
    "Args",
    "BlockResult",
    "CaptureCache",
    "Captured",
    "HiddenStore",
    "InMemory",
    "WeightSource",
    "capture",
    "capture_block_inputs",
    "prune",
    "prune_block",
    "prune_targets",
    "run_block",
    "run_blocks",
]

HESSIAN_LIMIT_BYTES = EngineSettings.from_env().hessian_limit_bytes
"""Largest total of SparseGPT Hessians (fp32 ``in × in`` per pruned matrix) held for one block."""

Batch = tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]
Args = tuple[tuple[Any, ...], dict[str, Any]]


# --------------------------------------------------------------------------------------------
# Argument capture
# --------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the last recorder: every block's arguments of this batch are recorded."""


def _drop_cache(value: Any) -> Any:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover
        return value
    return None if isinstance(value, Cache) else value


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple | list) and isinstance(b, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def _share(value: Any, previous: Any) -> Any:
    """``previous`` when it holds the same values as ``value`` (one copy shared by the blocks)."""
    return previous if previous is not None and _same(value, previous) else value


def _split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Batch:
    if args:
        hidden, rest = args[0], tuple(_drop_cache(a) for a in args[1:])
    else:
        kwargs = dict(kwargs)
        hidden, rest = kwargs.pop("hidden_states"), ()
    kw = {k: _drop_cache(v) for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    return hidden, rest, kw


def _declared_return(block: nn.Module) -> int | None:
    """0 when the block's ``forward`` is annotated to return a plain tensor, else None (unknown)."""
    import inspect

    try:
        ann = inspect.signature(type(block).forward).return_annotation
    except (TypeError, ValueError):  # pragma: no cover
        return None
    return 0 if ann is torch.Tensor or ann in ("torch.Tensor", "Tensor", "torch.FloatTensor") else None


class _Recorder(nn.Module):
    """Stands in for block ``index``: records its arguments, returns its input hidden state."""

    def __init__(self, block: nn.Module, index: int, sink: Callable[[int, Batch], Any], last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_orig", block)
        self.index, self.sink, self.last = index, sink, last

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_orig"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden, rest, kw = _split(args, kwargs)
        shape = self.sink(self.index, (hidden, rest, kw))
        if self.last:
            raise _Captured
        if shape is None:  # first batch: learn what the model expects back from a block
            orig = object.__getattribute__(self, "_orig")
            shape = _declared_return(orig)
            if shape is None:  # not declared: ask the real block once
                out = orig(*args, **kwargs)
                shape = len(out) if isinstance(out, tuple | list) else 0
            self.sink(self.index, None, shape)
        return (hidden, *([None] * (shape - 1))) if shape else hidden


@dataclass
class Captured:
    """Block 0's hidden input per batch and every block's own ``(args, kwargs)`` per batch."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[list[Args]] = field(default_factory=list)
    """``args[block][batch]``; identical values are shared between blocks."""


@torch.no_grad()
def capture(model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int) -> Captured:
    """Every block's arguments for ``calibration`` ``[n, seqlen]``, in one recorder forward per batch."""
    device = (
        next(p.device for p in model.parameters() if p.device.type != "meta")
        if any(p.device.type != "meta" for p in model.parameters())
        else torch.device("cpu")
    )
    n = len(blocks)
    out = Captured(args=[[] for _ in range(n)])
    ret_shape: list[int | None] = [None]

    def sink(i: int, batch: Batch | None, shape: int | None = None) -> int | None:
        if batch is None:
            ret_shape[0] = shape
            return None
        hidden, rest, kw = batch
        if i == 0:
            out.hidden.append(hidden.detach())
        prev = out.args[i - 1][-1] if i > 0 and out.args[i - 1] else None
        if prev is not None:
            rest = (
                tuple(_share(v, p) for v, p in zip(rest, prev[0], strict=False))
                if len(rest) == len(prev[0])
                else rest
            )
            kw = {k: _share(v, prev[1].get(k)) for k, v in kw.items()}
        out.args[i].append((rest, kw))
        return ret_shape[0]

    originals = list(blocks)
    try:
        for i, b in enumerate(originals):
            blocks[i] = _Recorder(b, i, sink, i == n - 1)
        for start in range(0, calibration.shape[0], batch_size):
            ids = calibration[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
            else:  # pragma: no cover - the last recorder always fires
                raise RuntimeError("the last decoder block was never called")
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return out


class CaptureCache:
    """Block arguments captured once and handed to every prune of the same dense model (a sweep):
    the capture stops before the first block, so it does not depend on the blocks' weights."""

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._cap: Captured | None = None
        self.captures = 0
        """How many capture forwards this cache ran."""

    def get(
        self, model: nn.Module, blocks: nn.ModuleList, calibration: torch.Tensor, batch_size: int
    ) -> Captured:
        """A fresh view of the captured arguments (the loop consumes its lists; tensors are shared)."""
        key = (calibration.data_ptr(), tuple(calibration.shape), batch_size, len(blocks))
        if self._cap is None or key != self._key:
            self._cap, self._key = capture(model, blocks, calibration, batch_size), key
            self.captures += 1
        return Captured(hidden=list(self._cap.hidden), args=[list(a) for a in self._cap.args])


def capture_block_inputs(
    model: nn.Module, calibration: torch.Tensor, batch_size: int, family: families.Family | None = None
) -> list[Batch]:
    """Block 0's ``(hidden, args, kwargs)`` per batch (see :func:`capture`)."""
    cap = capture(model, families.get_blocks(model, family), calibration, batch_size)
    return [(h, *cap.args[0][j]) for j, h in enumerate(cap.hidden)]


@torch.no_grad()
def run_block(block: nn.Module, batch: Batch) -> torch.Tensor:
    """Run one block on a captured batch and return its hidden-state output."""
    hidden, rest, kwargs = batch
    out = block(hidden, *rest, **kwargs)
    if isinstance(out, tuple | list):
        out = out[0]
    return out


# --------------------------------------------------------------------------------------------
# Hidden states between blocks
# --------------------------------------------------------------------------------------------


class HiddenStore(Sequence[torch.Tensor]):
    """Hidden state per batch, in memory or spilled (one ``torch.save`` file per batch, bit-exact)."""

    def __init__(self, spill_dir: Path | None = None, items: list[torch.Tensor] | None = None) -> None:
        self.spill_dir = spill_dir
        self._items: list[torch.Tensor | Path] = []
        for t in items or []:
            self.append(t)

    def _put(self, i: int, hidden: torch.Tensor) -> torch.Tensor | Path:
        if self.spill_dir is None:
            return hidden
        path = self.spill_dir / f"batch-{i:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(hidden.contiguous(), tmp)
        os.replace(tmp, path)
        return path

    def append(self, hidden: torch.Tensor) -> None:
        self._items.append(self._put(len(self._items), hidden))

    def replace(self, i: int, hidden: torch.Tensor) -> None:
        self._items[i] = self._put(i, hidden)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        h = self._items[i]
        return torch.load(h, weights_only=True) if isinstance(h, Path) else h

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def nbytes(self) -> int:
        """Bytes held in memory (0 when spilled)."""
        return sum(h.numel() * h.element_size() for h in self._items if isinstance(h, torch.Tensor))


class _Batches(Sequence[Batch]):
    """``(hidden, args, kwargs)`` of one block per batch, from the store and that block's arguments."""

    def __init__(self, hidden: Sequence[torch.Tensor], args: list[Args]) -> None:
        self.hidden, self.args = hidden, args

    def __len__(self) -> int:
        return len(self.args)

    def __getitem__(self, j: int) -> Batch:  # type: ignore[override]
        return (self.hidden[j], *self.args[j])


# --------------------------------------------------------------------------------------------
# Statistics of one block
# --------------------------------------------------------------------------------------------


def _method(name: str) -> Any:
    from core.methods import get_method

    return get_method(name)


@dataclass
class BlockResult:
    """What :func:`prune_block` did to one block."""

    layers: dict[str, float] = field(default_factory=dict)
    numel: dict[str, int] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    """Calibration tokens seen by each pruned matrix."""
    fallback: list[str] = field(default_factory=list)
    """Matrices that saw no token and were pruned by magnitude."""
    mask_s: float = 0.0
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-layer report records (method, allocation, refine, sparsity, recon_error, ...)."""


class _StatsComplete(Exception):
    """Raised by the statistics pre-hook of a block's last linear once its input is recorded."""


class _CallOrder:
    """Ends a statistics pass as soon as every target linear has recorded its input.

    The first batch runs whole and records the call order; when it called each target exactly
    once (never for blocks with experts, whose calls depend on routing), later batches stop in
    the pre-hook of the last one (statistics unchanged: every input is recorded before the stop).
    """

    def __init__(self, enabled: bool = True) -> None:
        self.order: list[str] = []
        self.stop_at: str | None = None
        self.learning = enabled

    def pre_hook(self, name: str, feed: Callable[[Any, tuple[Any, ...]], None]) -> Callable[..., None]:
        def fn(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            feed(module, inputs)
            if self.learning:
                self.order.append(name)
            elif name == self.stop_at:
                raise _StatsComplete

        return fn

    def batch_done(self, ntargets: int) -> None:
        if self.learning:
            self.learning = False
            if len(self.order) == ntargets == len(set(self.order)):
                self.stop_at = self.order[-1]


_MATMULS = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _ExpertTap(TorchFunctionMode):
    """Feeds each fused-expert matrix's accumulator the input of every product with that expert's slice.

    Inside an experts module the model computes, per expert ``e``, ``linear(x_e, W[e])`` (or
    ``x_e @ W[e]`` for transposed layouts) on exactly the tokens routed to ``e``; the tap
    recognises ``W[e]`` by storage and offset, so the statistics are those of the model's own
    computation (routing, activation, clamps and biases included).
    """

    def __init__(self, fused: dict[str, families.Target], feed: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.feed = feed
        self.by_slice: dict[tuple[int, int], str] = {}
        for name, t in fused.items():
            p = getattr(t.module, t.param)
            off = p.storage_offset() + int(t.expert or 0) * p.stride(0)
            self.by_slice[(p.untyped_storage().data_ptr(), off)] = name

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func in _MATMULS and len(args) >= 2:
            x, w = args[0], args[1]
            if isinstance(w, torch.Tensor) and w.dim() == 2 and w.device.type != "meta":
                name = self.by_slice.get((w.untyped_storage().data_ptr(), w.storage_offset()))
                if name is not None:
                    self.feed(name, x)
        return func(*args, **kwargs)


@contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Run fused experts modules with transformers' eager per-expert loop while pruning (the
    statistics tap reads it, and the re-run producing the next block's inputs matches it)."""
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(m, "is_transposed") and cfg is not None and hasattr(cfg, "_experts_implementation"):
            configs.append((cfg, cfg._experts_implementation))
    try:
        for cfg, _ in configs:
            cfg._experts_implementation = "eager"
        yield
    finally:
        for cfg, old in configs:
            cfg._experts_implementation = old


def prune_targets(
    block: nn.Module, prefix: str, spec: PruneSpec
) -> tuple[dict[str, families.Target], list[str]]:
    """``({name: target}, ignored names)``: the matrices of ``block`` that ``spec`` prunes."""
    allt = families.block_targets(block, prefix, routers=spec.prune_routers)
    targets = {n: t for n, t in allt.items() if not families.is_ignored(n, spec.ignore)}
    return targets, [n for n in allt if n not in targets]


@torch.no_grad()
def collect_stats(
    block: nn.Module,
    targets: dict[str, families.Target],
    batches: Sequence[Batch],
    needs: Any,
    outputs: list[torch.Tensor] | None = None,
) -> dict[str, LayerStats]:
    """The per-matrix statistics ``needs`` asks for, over every batch (the loop's stats point).

    ``outputs``: when given, every batch runs the whole block and its output is appended there
    (OWL's dense first pass); otherwise a batch may stop at the block's last linear.
    """
    from core.stats import SharedInputs, StatsAccumulator

    accs = {
        n: StatsAccumulator(
            t.in_features,
            needs.xnorm,
            needs.hessian,
            need_xsum=needs.xsum,
            gram_tokens=needs.gram_tokens,
            sample_tokens=needs.sample_tokens,
            sample_every=needs.sample_every,
        )
        for n, t in targets.items()
    }
    shared = SharedInputs()
    linears = {n: t for n, t in targets.items() if not t.fused}
    fused = {n: t for n, t in targets.items() if t.fused}
    calls = _CallOrder(enabled=outputs is None and not any(t.is_expert for t in targets.values()))
    handles = [
        t.module.register_forward_pre_hook(calls.pre_hook(n, shared.hook(accs[n])))
        for n, t in linears.items()
    ]

    def feed(name: str, x: torch.Tensor) -> None:
        accs[name].add_partial(shared.partial_for(x, accs[name]))

    tap = _ExpertTap(fused, feed) if fused else nullcontext()
    try:
        for b in batches:
            try:
                with tap:
                    out = run_block(block, b)
                if outputs is not None:
                    outputs.append(out)
            except _StatsComplete:
                pass
            calls.batch_done(len(linears))
            shared.clear()
    finally:
        shared.clear()
        for h in handles:
            h.remove()
    return {n: a.result() for n, a in accs.items()}


def check_hessian_memory(
    targets: dict[str, families.Target], method: Method, where: str, spec: PruneSpec | None = None
) -> None:
    """Refuse SparseGPT/ALPS/reconstruction when one block's Hessians exceed :data:`HESSIAN_LIMIT_BYTES`."""
    if "hessian" not in method.needs and (spec is None or spec.reconstruct == "none"):
        return
    need = sum(4 * t.in_features**2 for t in targets.values())
    if need > HESSIAN_LIMIT_BYTES:
        nexp = sum(1 for t in targets.values() if t.is_expert)
        raise InvalidInput(
            f"{method.name} needs one fp32 in x in Hessian per pruned matrix of a block: {where} has "
            f"{len(targets)} matrices ({nexp} of them expert matrices) = {need / 2**30:.1f} GiB, above the "
            f"limit of {HESSIAN_LIMIT_BYTES / 2**30:.1f} GiB (PRUNE_HESSIAN_LIMIT_BYTES); use wanda or "
            "magnitude for this model, or keep experts dense with 'ignore'"
        )


@torch.no_grad()
def prune_block(
    block: nn.Module,
    block_prefix: str,
    batches: Sequence[Batch],
    method: Method,
    spec: PruneSpec,
    budgets: dict[str, int] | None = None,
    total_tokens: int = 0,
) -> BlockResult:
    """Collect the statistics ``method.needs`` over ``batches``, then prune ``block`` in place.

    The single per-block step of every mode. Producing the next block's inputs is the caller's.
    A matrix that saw no calibration token (an expert the router never chose) is pruned by
    magnitude and listed in ``fallback``. ``total_tokens``: calibration tokens in ``batches``
    (spreads the error report's input sample over all of them; 0: the first tokens).
    """
    from core.layer_prune import layer_needs, prune_layer
    from core.methods import get_method
    from core.stats import LayerStats

    targets, ignored = prune_targets(block, block_prefix, spec)
    res = BlockResult(ignored=ignored)
    needs = layer_needs(method, spec, total_tokens)
    stats = collect_stats(block, targets, batches, needs) if targets and needs.any else {}
    for name, t in targets.items():
        weight = t.get_weight()
        st = stats.pop(name, None) or LayerStats(xnorm_sq=None, hessian=None, ntokens=0)
        use = method
        if needs.any and st.ntokens == 0:
            use = get_method("magnitude")
            res.fallback.append(name)
        tm = time.perf_counter()
        outcome = prune_layer(weight, st, use, spec, None if budgets is None else budgets.get(name))
        mask = outcome.mask
        res.mask_s += time.perf_counter() - tm
        t.set_weight(weight)
        res.layers[name] = outcome.record["sparsity"]
        res.records[name] = outcome.record
        res.numel[name] = mask.numel()
        res.tokens[name] = st.ntokens
        del st
    return res


def check_nm_shapes(model: nn.Module, family: families.Family, spec: PruneSpec) -> None:
    """Refuse, before any work, an N:M pattern whose M does not divide a pruned matrix's inputs."""
    nm = spec.nm
    if nm is None:
        return
    for i, block in enumerate(families.get_blocks(model, family)):
        for name, t in prune_targets(block, f"{family.blocks}.{i}", spec)[0].items():
            if t.in_features % nm[1]:
                raise InvalidInput(
                    f"layer {name} has {t.in_features} input features, "
                    f"not a multiple of M={nm[1]} for pattern {spec.pattern}"
                )


# --------------------------------------------------------------------------------------------
# Weight sources and the loop
# --------------------------------------------------------------------------------------------


class WeightSource:
    """Where block weights live. The in-memory source does nothing; streaming loads, writes and
    releases each block (``core.streaming``)."""

    def capture_context(self) -> Any:
        """Context in which the model can run up to its blocks (streaming: embeddings loaded)."""
        return nullcontext()

    def load(self, index: int, block: nn.Module) -> None:
        """Make ``block``'s dense weights available."""

    def done(self, index: int, block: nn.Module) -> None:
        """``block`` is pruned (and, when not last, has produced the next inputs)."""


class InMemory(WeightSource):
    """Every block is already in memory; nothing to load or write."""


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
) -> PruneResult:
    """Prune every decoder block of ``model`` on calibration ids ``[n, seqlen]``: the one loop.

    ``source`` provides block weights (default: in memory). ``spill_dir``: keep the hidden states
    there instead of in memory. ``resume_dir``: persist each finished block and continue a run
    interrupted earlier with the same fingerprint (:mod:`core.resume`). ``capture_cache``: reuse
    the block arguments captured by an earlier prune of the same dense model.
    """
    from core import resume

    t0 = time.perf_counter()
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise InvalidInput(
            f"calibration must be a [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}"
        )
    from core.layer_prune import layer_needs

    source = source or InMemory()
    method = _method(spec.method)
    need_stats = layer_needs(method, spec).any or spec.allocation == "owl"
    family = families.family_for(model)
    blocks = families.get_blocks(model, family)
    nblocks = len(blocks)
    check_nm_shapes(model, family, spec)
    for i, block in enumerate(blocks[:1]):
        targets0 = prune_targets(block, f"{family.blocks}.{i}", spec)[0]
        check_hessian_memory(targets0, method, f"block {i}", spec)
    cal = calibration.to(torch.long)
    dev = torch.device(device) if device is not None else _device(model)
    batch_size = spec.batch_for(cal.shape[-1], dev.type)
    ckpt = (
        resume.BlockCheckpoints.open(resume_dir, resume.fingerprint(model, cal, spec)) if resume_dir else None
    )
    start = ckpt.done if ckpt else 0
    result = PruneResult(
        method=spec.method, pattern=spec.pattern, target=spec.target_sparsity, nblocks=nblocks
    )
    if ckpt is not None and start:
        result.resumed_from_block = start
        prev = ckpt.partial_result()
        result.layers, result.ignored, result.mask_s = prev.layers, prev.ignored, prev.mask_s
        result.layer_records = prev.layer_records
        result.warnings = prev.warnings
    tokens: dict[str, int] = dict(ckpt.tokens() if ckpt and start else {})
    fallback: list[str] = list(ckpt.fallback() if ckpt and start else [])
    was_training = model.training
    model.eval()
    check_cancel(should_cancel)
    cap: Captured | None = None
    store: HiddenStore | None = None
    budgets: dict[str, int] | None = None
    try:
        with eager_experts(model):
            if need_stats and start < nblocks:
                with source.capture_context():
                    cap = (
                        capture_cache.get(model, blocks, cal, batch_size)
                        if capture_cache is not None
                        else capture(model, blocks, cal, batch_size)
                    )
                hidden = ckpt.hidden() if ckpt and start else cap.hidden
                store = HiddenStore(spill_dir, hidden)
                cap.hidden = []
                del hidden
            if spec.allocation == "owl":
                if start:
                    raise InvalidInput("allocation 'owl' cannot resume from block checkpoints")
                from core.owl_pass import owl_budgets

                assert cap is not None and store is not None
                budgets, owl_info = owl_budgets(blocks, family.blocks, store, cap.args, spec, should_cancel)
                result.owl = owl_info
            for i, block in enumerate(blocks):
                check_cancel(should_cancel)
                if i < start:
                    assert ckpt is not None
                    source.load(i, block)
                    ckpt.restore_block(i, block)
                    source.done(i, block)
                    continue
                source.load(i, block)
                if i > 0:
                    check_hessian_memory(
                        prune_targets(block, f"{family.blocks}.{i}", spec)[0], method, f"block {i}", spec
                    )
                batches = _Batches(store, cap.args[i]) if cap is not None and store is not None else []
                res = prune_block(block, f"{family.blocks}.{i}", batches, method, spec, budgets, cal.numel())
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
                if store is not None and cap is not None and i + 1 < nblocks:
                    for j in range(len(store)):
                        store.replace(j, run_block(block, (store[j], *cap.args[i][j])))
                    cap.args[i] = []  # this block's arguments are no longer needed
                if ckpt is not None:
                    ckpt.save_block(i, block, store if i + 1 < nblocks else None, result, tokens, fallback)
                source.done(i, block)
                report_block(on_progress, i + 1, nblocks, note)
    finally:
        model.train(was_training)
    result.experts = _expert_report(tokens, fallback)
    result.prune_s = time.perf_counter() - t0
    return result


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def prune(
    model: nn.Module,
    calibration: torch.Tensor,
    spec: PruneSpec,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    resume_dir: Path | None = None,
    capture_cache: CaptureCache | None = None,
) -> PruneResult:
    """Prune ``model`` in place, block by block, on calibration ids ``[n, seqlen]``.

    Progress is reported once per block with stage ``pruning`` and ``fraction = block / nblocks``;
    ``should_cancel`` is checked between blocks. ``capture_cache``: see :func:`run_blocks`.
    """
    return run_blocks(
        model, calibration, spec, InMemory(), on_progress, should_cancel, resume_dir=resume_dir,
        capture_cache=capture_cache,
    )  # fmt: skip
