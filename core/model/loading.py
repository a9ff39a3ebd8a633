"""Model and tokenizer loading: local Hugging Face directory, GGUF file, or hub id (online only).

The architecture is checked from the config *before* any weight is read. Missing or corrupted
files raise :class:`core.errors.ModelLoadError` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from core.errors import CoreError, InvalidInput, ModelLoadError
from core.model import families
from core.model.families import model_class
from core.settings import EngineSettings
from core.spec import ModelSpec

__all__ = [
    "Checked",
    "Loaded",
    "check_source",
    "checked_config",
    "hub_online",
    "load_config_and_tokenizer",
    "load_model",
    "load_tokenizer",
    "model_class",
    "model_context",
    "resolve_source",
]

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass
class Loaded:
    """A loaded model with its tokenizer and where they came from."""

    model: Any
    tokenizer: Any
    family: families.Family
    source: str
    gguf: bool
    gguf_cache: str | None = None
    """For a GGUF source: ``hit``, ``miss``, ``off`` or ``error`` (:mod:`core.model.model_cache`)."""
    resident: bool = True
    """Whether the weights sit on ``spec.device`` (else in host memory, onloaded block by block)."""


@dataclass(frozen=True)
class _Source:
    path: str  # directory or hub id passed to from_pretrained
    gguf_file: str | None
    local: bool


def hub_online() -> bool:
    """Whether the Hugging Face hub may be contacted."""
    return not EngineSettings.from_env().hf_hub_offline


def resolve_source(spec: ModelSpec) -> _Source:
    """Turn ``spec.source`` / ``spec.gguf_file`` into what ``from_pretrained`` needs, checking paths."""
    src = Path(spec.source).expanduser()
    if src.is_file():
        if spec.gguf_file is not None:
            raise InvalidInput("gguf_file is only valid when the model source is a directory")
        if src.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {src} is not a .gguf file; pass a Hugging Face directory or a .gguf"
            )
        _check_gguf(src)
        return _Source(str(src.parent), src.name, True)
    if src.is_dir():
        if spec.gguf_file is not None:
            gguf = src / spec.gguf_file
            if not gguf.is_file():
                raise ModelLoadError(f"GGUF file not found: {gguf}")
            _check_gguf(gguf)
            return _Source(str(src), spec.gguf_file, True)
        if not (src / "config.json").is_file():
            ggufs = sorted(src.glob("*.gguf"))
            if len(ggufs) == 1:
                _check_gguf(ggufs[0])
                return _Source(str(src), ggufs[0].name, True)
            raise ModelLoadError(f"model directory {src} has no config.json")
        return _Source(str(src), None, True)
    looks_local = (
        spec.source.startswith(("/", ".", "~")) or spec.source.count("/") > 1 or src.suffix == ".gguf"
    )
    if looks_local:
        raise ModelLoadError(f"model path not found: {spec.source}")
    if not hub_online():
        raise ModelLoadError(
            f"model path not found: {spec.source} (and the hub is offline, HF_HUB_OFFLINE=1)"
        )
    return _Source(spec.source, spec.gguf_file, False)


_checked_gguf: set[tuple[str, int, int, int]] = set()
_gguf_configs: dict[tuple[str, int, int, int], Any] = {}


def _check_gguf(path: Path) -> None:
    """Parse the GGUF header and tensor table; ModelLoadError naming the file if it is corrupted.

    Once per file and process (a run resolves its source more than once), and not at all for a file
    whose content the model cache already holds (:func:`core.model.model_cache.known`: it was parsed and
    dequantized whole before)."""
    from core.model import model_cache

    memo = model_cache.file_id(path)
    if memo in _checked_gguf:
        return
    if model_cache.known(path) is None:
        _parse_gguf(path)
    _checked_gguf.add(memo)


def _parse_gguf(path: Path) -> None:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
        if end > path.stat().st_size:
            raise ValueError(f"tensor data ends at byte {end} beyond the file size {path.stat().st_size}")
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"corrupted or unreadable GGUF file {path}: {exc}") from None


def _check_safetensors(directory: Path) -> None:
    """Open every safetensors file's header; ModelLoadError naming the file if one is corrupted."""
    from safetensors import safe_open

    files = sorted(directory.glob("*.safetensors"))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        import json

        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors index {index}: {exc}") from None
        for name in sorted(wanted):
            if not (directory / name).is_file():
                raise ModelLoadError(f"missing weight file {directory / name} (listed in {index.name})")
    if not files and not list(directory.glob("*.bin")):
        raise ModelLoadError(f"model directory {directory} holds no weights (*.safetensors)")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
        except Exception as exc:
            raise ModelLoadError(f"corrupted safetensors file {f}: {exc}") from None


def _load_config(src: _Source) -> Any:
    """The model's config. A local GGUF file's metadata is parsed once per file and process, and not
    at all when the model cache holds an entry of its content (the entry's ``config.json``)."""
    if not (src.local and src.gguf_file):
        return _read_config(src)
    import copy

    from core.model import model_cache

    gguf = Path(src.path) / src.gguf_file
    memo = model_cache.file_id(gguf)
    if memo not in _gguf_configs:
        config = None
        entry = model_cache.known(gguf)
        if entry is not None:
            from transformers import AutoConfig

            try:
                config = AutoConfig.from_pretrained(str(entry))
            except Exception:  # an unreadable entry: the file itself says
                config = None
        _gguf_configs[memo] = config if config is not None else _read_config(src)
    return copy.deepcopy(_gguf_configs[memo])


def _read_config(src: _Source) -> Any:
    from transformers import AutoConfig

    try:
        if src.gguf_file:
            return AutoConfig.from_pretrained(src.path, gguf_file=src.gguf_file)
        return AutoConfig.from_pretrained(src.path)
    except Exception as exc:
        msg = str(exc)
        where = Path(src.path) / (src.gguf_file or "config.json") if src.local else src.path
        if "architecture" in msg.lower() and "not supported" in msg.lower():
            from core.errors import UnsupportedModel

            raise UnsupportedModel(
                f"{where}: {msg.splitlines()[0]}; only decoder-only causal LMs that transformers "
                "builds (and multimodal wrappers around one) can be pruned"
            ) from None
        if "model_type" in msg or "Unrecognized model" in msg:
            from core.errors import UnsupportedModel

            raise UnsupportedModel(
                f"{where}: unrecognized model type (transformers cannot build it); only decoder-only "
                "causal LMs that transformers builds can be pruned"
            ) from None
        raise ModelLoadError(
            f"cannot read model config from {where}: {msg.splitlines()[0] if msg else exc}"
        ) from None


def model_context(model_or_config: Any) -> int | None:
    """The model's maximum context length, or None when it has no fixed one (e.g. BLOOM's ALiBi)."""
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("max_position_embeddings", "n_positions", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class Checked(NamedTuple):
    """A model source resolved and checked once per run (:func:`check_source`), handed down."""

    src: _Source
    config: Any
    family: families.Family
    where: str
    """The source as reports name it (a directory, a GGUF file, a hub id)."""


def check_source(spec: ModelSpec) -> Checked:
    """Resolve the source and run every check that needs no weight: config, architecture, headers."""
    src = resolve_source(spec)
    config = _load_config(src)
    family = families.check_config(config)  # refuse what discovery cannot prune before reading weights
    if src.local and not src.gguf_file:
        _check_safetensors(Path(src.path))
    where = str(Path(src.path) / src.gguf_file) if src.gguf_file else src.path
    return Checked(src, config, family, where)


def checked_config(spec: ModelSpec) -> tuple[Any, families.Family]:
    """``(config, family)`` after every check that needs no weight (see :mod:`core.run.preflight`)."""
    checked = check_source(spec)
    return checked.config, checked.family


def _load_tokenizer(src: _Source, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok_kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        return AutoTokenizer.from_pretrained(src.path, **tok_kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load tokenizer from {where}: {first}") from None


def load_model(spec: ModelSpec, checked: Checked | None = None) -> Loaded:
    """Load the model (in ``spec.dtype``, eval mode; on ``spec.device`` when it fits the device
    budget, else in host memory) and its tokenizer. ``checked``: the run's :func:`check_source`."""
    import torch

    src, _config, family, where = checked or check_source(spec)
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device 'cuda' requested but no CUDA device is available")
    dtype = getattr(torch, _DTYPES[spec.dtype])
    cached = _from_model_cache(src, spec.dtype, _config, dtype) if src.gguf_file else None
    entry = cached[2] if cached else None
    if cached and cached[0] is not None:
        model, tokenizer = cached[0], cached[1]
    else:
        kwargs: dict[str, Any] = {"dtype": dtype}
        if src.gguf_file:
            kwargs["gguf_file"] = src.gguf_file
        try:
            model = model_class(_config).from_pretrained(src.path, **kwargs)
        except CoreError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ModelLoadError(f"cannot load model weights from {where}: {first}") from None
        tokenizer = _load_tokenizer(src, where)
        if src.gguf_file:
            strip_quantization(model)
            # what save_pretrained (the cache's, the export's) records: so a hit, a miss and an
            # uncached load give the same config, hence the same resume fingerprint (core.run.resume)
            model.config.architectures = [type(model).__name__]
        if entry is not None:
            from core.model import model_cache

            entry = model_cache.store(entry, model, tokenizer, Path(src.path) / str(src.gguf_file))
    model.eval()
    family = families.family_for(model)
    resident = _place(model, family, spec)
    return Loaded(
        model=model,
        tokenizer=tokenizer,
        family=family,
        source=where,
        gguf=bool(src.gguf_file),
        gguf_cache=entry.status if entry is not None else None,
        resident=resident,
    )


def _place(model: Any, family: families.Family, spec: ModelSpec) -> bool:
    """Put the model on ``spec.device`` when it fits the device budget (:mod:`core.model.placement`);
    else leave it in host memory, from where the engine onloads one block at a time. Whether it
    went to the device."""
    if spec.device == "cpu":
        return True
    from core.model import placement

    dev_budget, _host = placement.budgets(spec.device, spec.max_device_memory, spec.max_host_memory)
    if not placement.weights_fit(model, families.get_blocks(model, family), dev_budget):
        return False
    model.to(spec.device)
    return True


def _from_model_cache(src: _Source, dtype_name: str, config: Any, dtype: Any) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, entry)`` from the host's cache of dequantized GGUF models; model and
    tokenizer are None unless it was a hit that loaded (an entry that fails to load is dropped)."""
    from transformers import AutoTokenizer

    from core.model import model_cache

    if not src.local:  # a hub GGUF: the hub's own cache holds the file
        return None, None, model_cache.Entry("off")
    entry = model_cache.lookup(Path(src.path) / str(src.gguf_file), dtype_name)
    if entry.path is None:
        return None, None, entry
    try:
        model = model_class(config).from_pretrained(str(entry.path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(entry.path))
    except Exception as exc:
        return None, None, model_cache.discard(entry, exc)
    model.config._name_or_path = model.name_or_path = src.path  # as the dequantizing load says
    return model, tokenizer, entry


def load_config_and_tokenizer(spec: ModelSpec) -> tuple[Any, Any, families.Family, str]:
    """``(config, tokenizer, family, where)`` without reading any weight (streaming mode).

    Same checks and errors as :func:`load_model`: the architecture from the config, the
    safetensors headers of a local directory, then the tokenizer.
    """
    src, config, family, where = check_source(spec)
    return config, _load_tokenizer(src, where), family, where


def load_tokenizer(checked: Checked) -> Any:
    """The tokenizer of a checked source (a run whose weights stay on disk loads nothing else)."""
    return _load_tokenizer(checked.src, checked.where)


def strip_quantization(model: Any) -> None:
    """Forget GGUF quantization metadata so that ``save_pretrained`` writes a plain dense checkpoint."""
    if hasattr(model, "hf_quantizer"):
        try:
            del model.hf_quantizer
        except AttributeError:
            model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    config = model.config
    if hasattr(config, "quantization_config"):
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
