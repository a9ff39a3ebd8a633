"""Prune, then quantize: int8 weight-only checkpoints in the compressed-tensors format.

The pruned linears' weights are quantized symmetric per output channel
(:func:`core.artifacts.formats.bits.quantize_rows`, so zeros stay exactly zero) and stored the way
compressed-tensors' ``pack-quantized`` format does (``weight_packed`` int32, ``weight_scale``,
``weight_shape``), with a ``quantization_config`` in ``config.json`` built from
compressed-tensors' own config classes. ``AutoModelForCausalLM.from_pretrained`` loads the
directory with no code of ours (compressed-tensors installed) and vLLM serves it as W8A16.
Every other tensor is copied unchanged. Streams one tensor at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from core.artifacts.formats import bits
from core.artifacts.formats.shards import ShardWriter, dense_layout, iter_tensors

__all__ = ["linear_names", "quantization_config", "write_int8"]

INDEX = "model.safetensors.index.json"


def linear_names(model_dir: str | Path) -> list[str]:
    """Qualified names of every ``nn.Linear`` of the model in ``model_dir`` (built on the meta
    device from its config; no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def quantization_config(ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` entry: int8, symmetric, per channel, weights only."""
    from compressed_tensors.config import CompressionFormat
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    fmt = CompressionFormat.pack_quantized.value
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
        format=fmt,
    )
    qc = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=sorted(ignore),
    )
    out = qc.model_dump(mode="json")
    out["quant_method"] = "compressed-tensors"
    return out


def _compress(w: torch.Tensor) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q, scale = bits.quantize_rows(w)
    return {
        "weight_packed": pack_to_int32(q, 8),
        "weight_scale": scale,
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }


def write_int8(dense_dir: str | Path, out_dir: str | Path, layers: list[str]) -> list[str]:
    """Write the compressed-tensors int8 checkpoint of ``dense_dir`` to ``out_dir``, quantizing
    the ``nn.Linear`` modules named in ``layers``; return the names of those quantized."""
    src, out = Path(dense_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    linears = linear_names(src)
    quant = [n for n in linears if n in set(layers)]
    targets = {f"{n}.weight": n for n in quant}
    weight_map: dict[str, str] = {}
    for shard, names in dense_layout(src).items():
        declared: dict[str, tuple[torch.dtype, int]] = {}
        from safetensors import safe_open

        with safe_open(str(src / shard), "pt") as fh:
            metadata = fh.metadata() or {"format": "pt"}
            for n in names:
                sl = fh.get_slice(n)
                dt = _dtype(sl.get_dtype())
                if n in targets:
                    mod = targets[n]
                    declared[f"{mod}.weight_packed"] = (torch.int32, 2)
                    declared[f"{mod}.weight_scale"] = (dt, 2)
                    declared[f"{mod}.weight_shape"] = (torch.int64, 1)
                else:
                    declared[n] = (dt, len(sl.get_shape()))
        writer = ShardWriter(out / shard, declared, metadata)
        order = writer.order()
        pending: dict[str, torch.Tensor] = {}
        for n, t in iter_tensors(src / shard, names):
            if n in targets:
                mod = targets[n]
                pending.update({f"{mod}.{k}": v for k, v in _compress(t).items()})
            else:
                pending[n] = t
            while order and order[0] in pending:
                writer.add(order[0], pending.pop(order.pop(0)))
        writer.close()
        weight_map.update(dict.fromkeys(declared, shard))
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name not in (INDEX, "config.json"):
            shutil.copy2(p, out / p.name)
    if (src / INDEX).exists():
        index = json.loads((src / INDEX).read_text(encoding="utf-8"))
        index["weight_map"] = dict(sorted(weight_map.items()))
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_config([n for n in linears if n not in set(quant)])
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return quant


def _dtype(name: str) -> torch.dtype:
    from core.artifacts.formats.shards import DTYPES

    return {v: k for k, v in DTYPES.items()}[name]
