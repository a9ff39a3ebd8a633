"""Streaming pruning for checkpoints larger than memory.

The model skeleton is built with its parameters on the ``meta`` device; only what one step
needs is ever materialised from the safetensors files:

1. the modules before block 0 (embeddings...) to capture block 0's inputs with
   :func:`core.engine.capture_block_inputs`, batch by batch, then they go back to ``meta``;
2. one decoder block at a time: load its tensors, collect statistics and prune with exactly the
   engine's per-block procedure (:func:`core.engine.prune_block`), re-run it to produce the next block's
   inputs, write its tensors to its own safetensors shard, and return it to ``meta``;
3. the non-block tensors (embeddings, final norm, untied ``lm_head``) are copied from the input
   checkpoint in dtype ``dtype``; tied weights are written once, as ``save_pretrained`` does.

Masks and exported tensors are identical to ``core.engine.prune`` on the loaded model followed
by ``save_pretrained`` (tests/core/test_streaming.py checks every tensor). Activations can
spill to disk (one ``torch.save`` file per batch) when large. The output directory is written
atomically with the pipeline layout: ``model/`` (safetensors shards, index, config, tokenizer
files) and ``report.json``.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import engine, families
from core.errors import InvalidInput, ModelLoadError
from core.progress import CancelFn, Progress, ProgressFn, check_cancel, report_block
from core.spec import PruneSpec

__all__ = [
    "ActivationStore",
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


def _weight_files(model_dir: Path) -> dict[str, str]:
    """``{tensor name: file name}`` from the index, or from the single ``model.safetensors``."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            return dict(json.loads(index.read_text())["weight_map"])
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors index {index}: {exc}") from None
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(
            f"model directory {model_dir} holds no safetensors weights (streaming needs them)"
        )
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                out.update({k: f.name for k in fh.keys()})
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors file {f}: {exc}") from None
    return out


def checkpoint_bytes(model_dir: str | Path) -> int:
    """Total size of the checkpoint's safetensors files in bytes."""
    model_dir = Path(model_dir)
    return sum((model_dir / f).stat().st_size for f in set(_weight_files(model_dir).values()))


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


class Checkpoint:
    """Reads named tensors from a (sharded) safetensors checkpoint.

    Each :meth:`load` opens the files it needs and closes them before returning, so no mmap'd
    pages stay mapped between steps. Names are the model's ``state_dict`` names; checkpoints
    saved without the base-model prefix (old GPT-2/BLOOM/OPT hub files) are resolved too.
    """

    def __init__(self, model_dir: Path, model: nn.Module | None = None) -> None:
        self.dir = model_dir
        self.weight_map = _weight_files(model_dir)
        self.base_prefix = getattr(model, "base_model_prefix", "") or ""
        renamings = _renamings(model) if model is not None else []
        self._to_ckpt = {_model_name(k, renamings): k for k in self.weight_map}

    def resolve(self, name: str) -> str | None:
        """The checkpoint's name for the model tensor ``name`` (None if absent)."""
        if name in self._to_ckpt:
            return self._to_ckpt[name]
        if name in self.weight_map:
            return name
        p = self.base_prefix + "."
        if self.base_prefix and name.startswith(p) and name[len(p) :] in self.weight_map:
            return name[len(p) :]
        return None

    def saved_name(self, name: str) -> str:
        """The name to write ``name`` under: the checkpoint's own when transformers renames it on
        load (GPT-NeoX ``embed_out`` -> ``lm_head``), as ``save_pretrained`` reverts those."""
        return self._to_ckpt.get(name, name)

    def load(self, names: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` in ``dtype``, owning its memory; ModelLoadError if one is missing."""
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for name in names:
            key = self.resolve(name)
            if key is None:
                raise ModelLoadError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
            by_file.setdefault(self.weight_map[key], []).append((name, key))
        out: dict[str, torch.Tensor] = {}
        for fname, pairs in by_file.items():
            path = self.dir / fname
            try:
                with safe_open(str(path), framework="pt") as fh:
                    for name, key in pairs:
                        t = fh.get_tensor(key)
                        out[name] = t.to(dtype) if t.is_floating_point() else t.clone()
            except ModelLoadError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"cannot read tensors from {path}: {exc}") from None
        return out


def _renamings(model: nn.Module) -> list[Any]:
    """transformers' load-time key renamings for ``model`` (plain renamings only)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - older transformers: no renamings
        return []
    try:
        return [c for c in get_model_conversion_mapping(model) if isinstance(c, WeightRenaming)]
    except Exception:  # pragma: no cover - be lenient: fall back to identical names
        return []


def _model_name(key: str, renamings: list[Any]) -> str:
    """The model's ``state_dict`` name of checkpoint tensor ``key`` after load-time renamings."""
    for r in renamings:
        key, _ = r.rename_source_key(key)
    return key


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = root.get_submodule(mod_name) if mod_name else root
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
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
# Activations
# --------------------------------------------------------------------------------------------


class ActivationStore(Sequence[engine.Batch]):
    """Block inputs per batch: ``(hidden, args, kwargs)``, hidden kept in memory or spilled.

    With a ``spill_dir`` each batch's hidden state lives in its own ``torch.save`` file and is
    read back on access (bit-exact), so only one batch's activations are resident at a time.
    """

    def __init__(self, spill_dir: Path | None = None) -> None:
        self.spill_dir = spill_dir
        self._hidden: list[torch.Tensor | Path] = []
        self._rest: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def _put(self, i: int, hidden: torch.Tensor) -> torch.Tensor | Path:
        if self.spill_dir is None:
            return hidden
        path = self.spill_dir / f"batch-{i:05d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(hidden.contiguous(), tmp)
        os.replace(tmp, path)
        return path

    def append(self, batch: engine.Batch) -> None:
        hidden, rest, kwargs = batch
        self._hidden.append(self._put(len(self._hidden), hidden))
        self._rest.append((rest, kwargs))

    def replace_hidden(self, i: int, hidden: torch.Tensor) -> None:
        """Replace batch ``i``'s hidden state (the next block's input)."""
        self._hidden[i] = self._put(i, hidden)

    def __len__(self) -> int:
        return len(self._hidden)

    def __getitem__(self, i: int) -> engine.Batch:  # type: ignore[override]
        h = self._hidden[i]
        hidden = torch.load(h, weights_only=True) if isinstance(h, Path) else h
        rest, kwargs = self._rest[i]
        return hidden, rest, kwargs

    def __iter__(self) -> Iterator[engine.Batch]:
        for i in range(len(self)):
            yield self[i]

    def nbytes(self) -> int:
        """Bytes of hidden states held in memory (0 when spilled)."""
        return sum(h.numel() * h.element_size() for h in self._hidden if isinstance(h, torch.Tensor))


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
) -> dict[str, Any]:
    """Prune the safetensors checkpoint in ``model_dir`` block by block without loading it whole.

    Writes ``out_dir/model/`` (one safetensors shard per block plus the non-block shards, a
    ``model.safetensors.index.json``, config and tokenizer files) and ``out_dir/report.json``,
    atomically. ``spill``: True keeps block activations on disk (under ``spill_dir``, default
    beside ``out_dir``), False in memory, None decides: spill when they exceed 10% of available
    RAM. Returns the engine's keys (``layers``, ``ignored``, ``mask_s``, ``prune_s``...) plus
    ``streaming``, ``params``, ``sparsity`` (measured zeros, as ``core.evaluate.sparsity_report``),
    ``timings`` (``capture_s``, ``blocks_s``, ``export_s``,
    ``total_s``), ``checkpoint_bytes``, ``output_bytes`` and ``spilled``.

    ``tune_malloc`` (glibc only) makes large allocations use mmap for the rest of the process
    (see :func:`_tune_malloc`) and trims the heap after every block; it bounds peak RSS.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from core import export
    from core.evaluate import SparsityCounter
    from core.methods import get_method

    t_start = time.perf_counter()
    model_dir = Path(model_dir)
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
    out = export.check_out_dir(out_dir)
    if tune_malloc:
        _tune_malloc()
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"cannot read model config from {model_dir / 'config.json'}: {exc}") from None
    family = families.family_for(config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # not done on meta by from_config; tied tensors are then written once
    model.eval()
    ckpt = Checkpoint(model_dir, model)
    params = sum(p.numel() for p in model.parameters())
    blocks = families.get_blocks(model, family)
    nblocks = len(blocks)
    engine.check_nm_shapes(model, family, spec)

    # Output shard plan: non-block groups first, then one shard per block.
    block_bytes = max(sum(_nbytes(t, dtype) for t in b.state_dict().values()) for b in blocks)
    groups, non_block = _plan_non_block(model, family.blocks, dtype, block_bytes)
    nshards = len(groups) + nblocks
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    # Everything outside the blocks that block 0 may need, except the (untied) output head.
    before = {n: n for n in non_block if head_name is None or not n.startswith(head_name + ".")}

    timings: dict[str, Any] = {}
    layers: dict[str, float] = {}
    ignored: list[str] = []
    measured = SparsityCounter(spec)
    mask_s = 0.0
    weight_map: dict[str, str] = {}
    total_size = 0
    peak_rss = _rss_mb() or 0.0

    with export.staging_dir(out) as root:
        mdir = root / "model"
        mdir.mkdir()
        # 1. block 0's inputs.
        check_cancel(should_cancel)
        t = time.perf_counter()
        _materialize(model, before, ckpt, dtype)
        cal = calibration.to(torch.long)
        bs = spec.batch_for(cal.shape[-1], "cpu")  # streaming runs on the CPU
        first = engine.capture_block_inputs(model, cal[:bs], bs, family)
        act_bytes = first[0][0].numel() * first[0][0].element_size() * -(-cal.shape[0] // bs)
        if spill is None:
            import psutil

            spill = act_bytes > 0.1 * psutil.virtual_memory().available
        with _spill_area(spill_dir, out.parent, bool(spill)) as sdir:
            store = ActivationStore(sdir)
            store.append(first[0])
            del first
            for start in range(bs, cal.shape[0], bs):
                store.append(engine.capture_block_inputs(model, cal[start : start + bs], bs, family)[0])
            _unload(model, before)
            timings["capture_s"] = time.perf_counter() - t

            # 2. block by block.
            blocks_s: list[float] = []
            for i, block in enumerate(blocks):
                check_cancel(should_cancel)
                tb = time.perf_counter()
                prefix = f"{family.blocks}.{i}."
                names = {k: prefix + k for k in block.state_dict()}
                _materialize(block, names, ckpt, dtype)
                res = engine.prune_block(block, f"{family.blocks}.{i}", store, method, spec)
                layers.update(res.layers)
                ignored.extend(res.ignored)
                mask_s += res.mask_s
                measured.add(families.block_linears(block, f"{family.blocks}.{i}"))
                if i + 1 < nblocks:
                    for j in range(len(store)):
                        store.replace_hidden(j, engine.run_block(block, store[j]))
                fname = shard_name(len(groups) + i + 1, nshards)
                sd = {ckpt.saved_name(prefix + k): v for k, v in block.state_dict().items()}
                total_size += _save_shard(sd, mdir / fname)
                weight_map.update(dict.fromkeys(sd, fname))
                del sd
                peak_rss = max(peak_rss, _rss_mb() or 0.0)
                _to_meta(block)
                blocks_s.append(time.perf_counter() - tb)
                report_block(on_progress, i + 1, nblocks, " (streaming)")
            del store
        timings["blocks_s"] = blocks_s
        prune_s = time.perf_counter() - t_start

        # 3. non-block tensors, config and side files.
        check_cancel(should_cancel)
        t = time.perf_counter()
        if on_progress is not None:
            on_progress(Progress(stage="exporting", fraction=0.0, message="writing non-block tensors"))
        for gi, group in enumerate(groups):
            fname = shard_name(gi + 1, nshards)
            tensors = {ckpt.saved_name(k): v for k, v in ckpt.load(group, dtype).items()}
            total_size += _save_shard(tensors, mdir / fname)
            weight_map.update(dict.fromkeys(tensors, fname))
            del tensors
            _release_memory()
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (mdir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.dtype = dtype
        config.save_pretrained(mdir)
        _copy_side_files(model_dir, mdir)
        timings["export_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_start
        peak_rss = max(peak_rss, _rss_mb() or 0.0)

        report: dict[str, Any] = {
            "streaming": True,
            "method": spec.method,
            "pattern": spec.pattern,
            "target": spec.target_sparsity,
            "nblocks": nblocks,
            "family": family.name,
            "layers": layers,
            "ignored": ignored,
            "mask_s": mask_s,
            "prune_s": prune_s,
            "params": params,
            "sparsity": measured.report(),
            "calibration": {"nsamples": int(cal.shape[0]), "seqlen": int(cal.shape[1])},
            "timings": timings,
            "checkpoint_bytes": checkpoint_bytes(model_dir),
            "output_bytes": total_size,
            "spilled": bool(spill),
            "sampled_peak_rss_mb": peak_rss,
        }
        (root / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report
