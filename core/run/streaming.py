"""Streaming pruning for checkpoints larger than memory: the engine's block loop over shards.

The model skeleton is built with its parameters on the ``meta`` device; :class:`_ShardSource`
(a :class:`core.run.engine.WeightSource`) materialises only what one step needs:

1. for the argument capture, the modules before the blocks (embeddings, rotary buffers...) and
   block 0, which go back to ``meta`` afterwards;
2. one decoder block at a time: :func:`core.run.engine.run_blocks` loads it, prunes it exactly as
   in memory, re-runs it for the next block's inputs; the source writes its tensors to its own
   safetensors shard and returns it to ``meta``. Magnitude runs no forward pass at all;
3. the non-block tensors (embeddings, final norm, untied ``lm_head``) are copied from the input
   checkpoint in dtype ``dtype``; tied weights are written once, as ``save_pretrained`` does.

Masks and exported tensors are identical to ``core.run.engine.prune`` on the loaded model followed
by ``save_pretrained`` (tests/core/test_streaming.py checks every tensor). Activations can
spill to disk (one ``torch.save`` file per batch) when large. The output directory is written
atomically with the pipeline layout: ``model/`` (safetensors shards, index, config, tokenizer
files) and ``report.json``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from core.errors import InvalidInput, ModelLoadError
from core.model import families
from core.model.checkpoint import Checkpoint, weight_files
from core.model.weights import Restorer
from core.progress import CancelFn, Progress, ProgressFn, check_cancel
from core.result import PruneResult
from core.run import engine, resume
from core.spec import PruneSpec

if TYPE_CHECKING:
    from core.evaluation.evaluate import SparsityCounter
    from core.methods.base import Method

__all__ = [
    "Checkpoint",
    "checkpoint_bytes",
    "prune_streaming",
    "should_stream",
]

STREAM_FRACTION = 0.4
"""Streaming is the default when the checkpoint exceeds this fraction of available RAM."""

_SKIP_COPY_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_SKIP_COPY_NAMES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


# --------------------------------------------------------------------------------------------
# Checkpoint access
# --------------------------------------------------------------------------------------------


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the checkpoint's safetensors files in bytes."""
    model_dir = Path(model_dir)
    return sum((model_dir / f).stat().st_size for f in set(weight_files(model_dir).values()))


def should_stream(
    model_dir: str | Path, available_memory: int | None = None, fraction: float = STREAM_FRACTION
) -> bool:
    """Whether to prune ``model_dir`` in streaming mode: checkpoint > ``fraction`` x available RAM.

    ``available_memory`` defaults to psutil's ``virtual_memory().available``. A directory without
    safetensors files (GGUF, ``.bin``) cannot be streamed: False.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.glob("*.safetensors")):
        return False
    if available_memory is None:
        import psutil

        available_memory = int(psutil.virtual_memory().available)
    return checkpoint_bytes(model_dir) > fraction * available_memory


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        keep = isinstance(value, nn.Parameter)
        mod._parameters[attr] = value if keep else nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[attr] = value


def _materialize(root: nn.Module, names: dict[str, str], ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """Load ``{local name under root: model name}`` from the checkpoint into ``root``."""
    tensors = ckpt.load(list(names.values()), dtype)
    for local, full in names.items():
        _set_tensor(root, local, tensors.pop(full))


def _unload(root: nn.Module, names: dict[str, str]) -> None:
    """Put the named tensors of ``root`` back on ``meta`` (same shape and dtype)."""
    sd = root.state_dict(keep_vars=True)
    for local in names:
        _set_tensor(root, local, torch.empty_like(sd[local], device="meta"))
    _release_memory()


def _glibc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> None:
    """Serve allocations >= 1 MiB with mmap (returned to the OS on free).

    glibc's default *dynamic* threshold rises to the largest freed block (up to 32 MiB), after
    which every 16-32 MiB weight/activation buffer lands on the heap and stays resident when
    freed: peak RSS then grows block after block (2.1 GB instead of 0.9 GB on bench/scale.py).
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _release_memory() -> None:
    """Collect garbage and give freed heap pages back to the OS (glibc ``malloc_trim``)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _to_meta(module: nn.Module) -> None:
    module.to("meta")
    _release_memory()


# --------------------------------------------------------------------------------------------
# Streaming run
# --------------------------------------------------------------------------------------------


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return t.numel() * (torch.empty(0, dtype=dtype if t.is_floating_point() else t.dtype).element_size())


def _plan_non_block(
    model: nn.Module, block_prefix: str, dtype: torch.dtype, budget: int
) -> tuple[list[list[str]], dict[str, torch.Tensor]]:
    """Group the non-block tensors written to the output (tied duplicates dropped) into shards
    of at most ``budget`` bytes (a bigger tensor gets its own shard)."""
    seen: set[int] = set()
    meta: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name.startswith(block_prefix + "."):
            continue
        if id(t) in seen:
            continue  # a tied duplicate (lm_head.weight tied to the input embedding)
        seen.add(id(t))
        meta[name] = t
    groups: list[list[str]] = []
    size = 0
    for name, t in meta.items():
        b = _nbytes(t, dtype)
        if groups and size + b <= budget:
            groups[-1].append(name)
            size += b
        else:
            groups.append([name])
            size = b
    return groups, meta


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> int:
    from safetensors.torch import save_file

    # Block parameters and freshly loaded tensors own their storage: no copy unless needed.
    clean = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={"format": "pt"})
    return sum(v.numel() * v.element_size() for v in clean.values())


def _copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer, generation config and other small non-weight files."""
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name in _SKIP_COPY_NAMES or p.name.endswith(_SKIP_COPY_SUFFIXES):
            continue
        shutil.copy2(p, dst / p.name)


@contextmanager
def _spill_area(spill_dir: str | Path | None, default_parent: Path, wanted: bool) -> Iterator[Path | None]:
    if not wanted:
        yield None
        return
    parent = Path(spill_dir) if spill_dir is not None else default_parent
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / f".spill-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _rss_mb() -> float | None:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover
        return None


def skeleton(model_dir: Path, dtype: torch.dtype, config: Any = None) -> tuple[Any, nn.Module]:
    """``(config, model)``: the checkpoint's model with its parameters on ``meta`` (buffers real),
    tied weights tied, in eval mode. ``config``: already read (else read from ``model_dir``)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    if config is None:
        try:
            config = AutoConfig.from_pretrained(model_dir)
        except Exception as exc:
            msg = f"cannot read model config from {Path(model_dir) / 'config.json'}: {exc}"
            raise ModelLoadError(msg) from None
    families.check_config(config)
    with init_empty_weights(include_buffers=False):
        model = families.model_class(config).from_config(config, dtype=dtype)
    model.tie_weights()  # not done on meta by from_config; tied tensors are then written once
    model.eval()
    return config, model


def _aliases(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """``{name: [every name of the same tensor]}`` for tied parameters (a head tied to the embedding)."""
    by_id: dict[int, list[str]] = {}
    for n, t in model.state_dict(keep_vars=True).items():
        by_id.setdefault(id(t), []).append(n)
    sd = model.state_dict(keep_vars=True)
    return {n: by_id[id(sd[n])] for n in names}


class CheckpointSource(engine.WeightSource):
    """Weights on disk: a safetensors checkpoint read block by block into a meta skeleton
    (:func:`skeleton`), each block returned to ``meta`` when released; read only (evaluation)."""

    where = "disk"

    def __init__(self, model: nn.Module, model_dir: Path, dtype: torch.dtype) -> None:
        family = families.family_for(model)
        self.model, self.dtype, self.prefix = model, dtype, family.blocks
        self.blocks = families.get_blocks(model, family)
        self.ckpt = Checkpoint(Path(model_dir), model)
        _groups, non_block = _plan_non_block(model, family.blocks, dtype, 1)
        self.outside = _aliases(model, list(non_block))
        self.read_s = 0.0
        """Seconds spent reading tensors from the checkpoint."""

    @contextmanager
    def outside_context(self) -> Iterator[None]:
        t = time.perf_counter()
        tensors = self.ckpt.load(list(self.outside), self.dtype)
        self.read_s += time.perf_counter() - t
        for name, names in self.outside.items():
            value = nn.Parameter(tensors.pop(name), requires_grad=False)
            for alias in names:
                _set_tensor(self.model, alias, value)
        try:
            yield
        finally:
            sd = self.model.state_dict(keep_vars=True)
            for name, names in self.outside.items():
                meta = nn.Parameter(torch.empty_like(sd[name], device="meta"), requires_grad=False)
                for alias in names:
                    _set_tensor(self.model, alias, meta)
            _release_memory()

    @contextmanager
    def capture_context(self) -> Iterator[None]:
        with self.outside_context():
            self.load(0, self.blocks[0])
            try:
                yield
            finally:
                self.release(0, self.blocks[0])

    def load(self, index: int, block: nn.Module) -> None:
        prefix = f"{self.prefix}.{index}."
        t = time.perf_counter()
        _materialize(block, {k: prefix + k for k in block.state_dict()}, self.ckpt, self.dtype)
        self.read_s += time.perf_counter() - t

    def release(self, index: int, block: nn.Module) -> None:
        _to_meta(block)


_shard_name = "model-{:05d}-of-{:05d}.safetensors".format


def _check_stream_inputs(model_dir: Path, calibration: torch.Tensor, spec: PruneSpec) -> Method:
    """The run's method, after refusing what a streaming run cannot do."""
    from core.methods import get_method

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"model directory {model_dir} has no config.json")
    if calibration.dim() != 2 or calibration.shape[0] < 1:
        raise InvalidInput(
            f"calibration must be a [nsamples, seqlen] tensor, got shape {tuple(calibration.shape)}"
        )
    method = get_method(spec.method)
    if spec.allocation == "owl":
        raise InvalidInput(
            "allocation 'owl' needs a dense first pass over every block and is not supported by streaming "
            "runs; set model.stream to 'never'"
        )
    return method


@dataclass
class _StreamRun:
    """One streaming run: the meta skeleton, the output shard plan and the running totals."""

    model: nn.Module
    family: families.Family
    ckpt: Checkpoint
    blocks: nn.ModuleList
    dtype: torch.dtype
    spec: PruneSpec
    groups: list[list[str]]
    """Non-block tensor names, one list per output shard (written before the blocks' shards)."""
    before: dict[str, str]
    """Everything outside the blocks that block 0 may need, except the (untied) output head."""
    measured: SparsityCounter
    timings: dict[str, Any] = field(default_factory=dict)
    weight_map: dict[str, str] = field(default_factory=dict)
    size: int = 0
    peak: float = 0.0
    blocks_s: list[float] = field(default_factory=list)

    @property
    def nshards(self) -> int:
        return len(self.groups) + len(self.blocks)


def _plan_stream(model_dir: Path, dtype: torch.dtype, spec: PruneSpec) -> tuple[Any, _StreamRun, int]:
    """``(config, run, params)``: the skeleton and its output shard plan (non-block groups first,
    then one shard per block)."""
    from core.evaluation.evaluate import SparsityCounter

    config, model = skeleton(model_dir, dtype)
    family = families.family_for(model)
    ckpt = Checkpoint(model_dir, model)
    params = sum(p.numel() for p in model.parameters())
    blocks = families.get_blocks(model, family)
    engine.check_nm_shapes(model, family, spec)
    block_bytes = max(sum(_nbytes(t, dtype) for t in b.state_dict().values()) for b in blocks)
    groups, non_block = _plan_non_block(model, family.blocks, dtype, block_bytes)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    before = {n: n for n in non_block if head_name is None or not n.startswith(head_name + ".")}
    run = _StreamRun(model, family, ckpt, blocks, dtype, spec, groups, before, SparsityCounter(spec))
    run.peak = _rss_mb() or 0.0
    return config, run, params


class _ShardSource(engine.WeightSource):
    """Blocks from the input shards; each pruned block written to its own output shard, which a
    resume checkpoint links instead of copying (:meth:`written`, :meth:`restore`)."""

    def __init__(self, run: _StreamRun, mdir: Path) -> None:
        self.run = run
        self.mdir = mdir
        self.t = time.perf_counter()
        self.resumed: dict[int, Path] = {}
        """Blocks restored from their linked shards: ``done`` links them back instead of writing."""
        self._resume_reader: Checkpoint | None = None

    def written(self, index: int) -> Path:
        return self.mdir / _shard_name(len(self.run.groups) + index + 1, self.run.nshards)

    def restore(self, index: int, block: nn.Module, ckpt: Restorer) -> None:
        linked = ckpt.linked(index)
        if linked is None:  # checkpoint written by a run that copied the weights
            super().restore(index, block, ckpt)
            return
        run = self.run
        if self._resume_reader is None:  # reading the links must not change what export reverts
            conversions = getattr(run.model, "_weight_conversions", None)
            self._resume_reader = Checkpoint(linked.parent, run.model)
            run.model._weight_conversions = conversions
        prefix = f"{run.family.blocks}.{index}."
        _materialize(block, {k: prefix + k for k in block.state_dict()}, self._resume_reader, run.dtype)
        self.resumed[index] = linked

    @contextmanager
    def capture_context(self) -> Iterator[None]:
        run = self.run
        t = time.perf_counter()
        _materialize(run.model, run.before, run.ckpt, run.dtype)
        self.load(0, run.blocks[0])
        try:
            yield
        finally:
            _unload(run.model, run.before)
            _to_meta(run.blocks[0])
            run.timings["capture_s"] = time.perf_counter() - t
            self.t = time.perf_counter()

    def load(self, index: int, block: nn.Module) -> None:
        run = self.run
        prefix = f"{run.family.blocks}.{index}."
        t = time.perf_counter()
        _materialize(block, {k: prefix + k for k in block.state_dict()}, run.ckpt, run.dtype)
        run.timings["read_s"] += time.perf_counter() - t

    def done(self, index: int, block: nn.Module) -> None:
        run = self.run
        prefix = f"{run.family.blocks}.{index}."
        run.measured.add(families.block_targets(block, prefix[:-1], routers=run.spec.prune_routers))
        path = self.written(index)
        sd = run.ckpt.to_saved({prefix + k: v for k, v in block.state_dict().items()})
        t = time.perf_counter()
        if index in self.resumed:  # the same bytes are on disk already
            resume.link_file(self.resumed.pop(index), path)
            run.size += sum(v.numel() * v.element_size() for v in sd.values())
        else:
            run.size += _save_shard(sd, path)
        run.timings["write_s"] += time.perf_counter() - t
        run.weight_map.update(dict.fromkeys(sd, path.name))
        del sd
        run.peak = max(run.peak, _rss_mb() or 0.0)
        _to_meta(block)
        run.blocks_s.append(time.perf_counter() - self.t)
        self.t = time.perf_counter()


def _activations_too_large(model: nn.Module, cal: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether the calibration activations exceed 10% of the available RAM (then they spill)."""
    import psutil

    width = int(model.get_input_embeddings().weight.shape[-1])
    act_bytes = cal.numel() * width * torch.empty(0, dtype=dtype).element_size()
    return act_bytes > 0.1 * psutil.virtual_memory().available


def _stream_report(run: _StreamRun, params: int, cal: torch.Tensor, model_dir: Path) -> dict[str, Any]:
    """The report fields a streaming run adds after ``prune_s`` and before ``output_bytes``."""
    return {
        "streaming": True,
        "family": run.family.name,
        "params": params,
        "sparsity": run.measured.report(),
        "calibration": {"nsamples": int(cal.shape[0]), "seqlen": int(cal.shape[1])},
        "timings": run.timings,
        "checkpoint_bytes": checkpoint_bytes(model_dir),
    }


def _write_outside(run: _StreamRun, config: Any, model_dir: Path, mdir: Path, total_size: int) -> int:
    """Write the non-block tensors' shards, the index, the config (in the run's dtype) and the
    side files (tokenizer...); the output's total size."""
    for gi, group in enumerate(run.groups):
        fname = _shard_name(gi + 1, run.nshards)
        tensors = run.ckpt.to_saved(run.ckpt.load(group, run.dtype))
        total_size += _save_shard(tensors, mdir / fname)
        run.weight_map.update(dict.fromkeys(tensors, fname))
        del tensors
        _release_memory()
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(run.weight_map.items()))}
    (mdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = run.dtype
    config.save_pretrained(mdir)
    _copy_side_files(model_dir, mdir)
    return total_size


@torch.no_grad()
def prune_streaming(
    model_dir: str | Path,
    out_dir: str | Path,
    calibration: torch.Tensor,
    spec: PruneSpec,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    spill_dir: str | Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    spill: bool | None = None,
    tune_malloc: bool = True,
    resume_dir: str | Path | None = None,
) -> PruneResult:
    """Prune the safetensors checkpoint in ``model_dir`` block by block without loading it whole.

    Writes ``out_dir/model/`` (one safetensors shard per block plus the non-block shards, a
    ``model.safetensors.index.json``, config and tokenizer files) and ``out_dir/report.json``,
    atomically. ``spill``: True keeps block activations on disk (under ``spill_dir``, default
    beside ``out_dir``), False in memory, None decides: spill when they exceed 10% of available
    RAM. Returns the engine's keys (``layers``, ``ignored``, ``mask_s``, ``prune_s``...) plus
    ``streaming``, ``params``, ``sparsity`` (measured zeros, as ``core.evaluation.evaluate.sparsity_report``),
    ``timings`` (``capture_s``, ``blocks_s``, ``export_s``,
    ``total_s``), ``checkpoint_bytes``, ``output_bytes`` and ``spilled``.

    ``tune_malloc`` (glibc only) makes large allocations use mmap for the rest of the process
    (see :func:`_tune_malloc`) and trims the heap after every block; it bounds peak RSS.
    """
    from core.artifacts import export

    t_start = time.perf_counter()
    model_dir = Path(model_dir)
    method = _check_stream_inputs(model_dir, calibration, spec)
    out = export.check_out_dir(out_dir)
    if tune_malloc:
        _tune_malloc()
    config, run, params = _plan_stream(model_dir, dtype, spec)
    model, timings = run.model, run.timings

    with export.staging_dir(out) as root:
        mdir = root / "model"
        mdir.mkdir()
        check_cancel(should_cancel)
        cal = calibration.to(torch.long)
        if spill is None:
            spill = _activations_too_large(model, cal, dtype)
        timings["capture_s"] = timings["read_s"] = timings["write_s"] = 0.0
        with _spill_area(spill_dir, out.parent, bool(spill) and bool(method.needs)) as sdir:
            result = engine.run_blocks(
                model, cal, spec, _ShardSource(run, mdir), on_progress, should_cancel,
                resume_dir=Path(resume_dir) if resume_dir is not None else None, spill_dir=sdir,
                device="cpu", note=" (streaming)",  # streaming runs on the CPU
            )  # fmt: skip
        timings["blocks_s"] = run.blocks_s
        total_size, peak_rss, prune_s = run.size, run.peak, time.perf_counter() - t_start

        # 3. non-block tensors, config and side files.
        check_cancel(should_cancel)
        t = time.perf_counter()
        if on_progress is not None:
            on_progress(Progress(stage="exporting", fraction=0.0, message="writing non-block tensors"))
        total_size = _write_outside(run, config, model_dir, mdir, total_size)
        timings["export_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        peak_rss = max(peak_rss, _rss_mb() or 0.0)

        result = result.model_copy(
            update={
                "prune_s": prune_s,
                **_stream_report(run, params, cal, model_dir),
                "output_bytes": total_size,
                "spilled": bool(spill),
                "sampled_peak_rss_mb": peak_rss,
            }
        )
        (root / "report.json").write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return result
