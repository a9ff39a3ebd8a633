"""Model artifacts beyond the dense export (docs/formats.md).

:func:`export` turns the dense Hugging Face directory ``root/model`` into the formats that
``OutputSpec.formats`` names, each in its own directory under ``root``, and returns the
report's ``artifacts`` section (size of each, its ratio to the dense fp16 size, pack time,
perplexity of the quantized ones next to the pruned fp one).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DIRS", "dense_fp16_bytes", "dir_sizes", "export"]

DIRS: dict[str, str] = {
    "dense": "model",
    "compact": "compact",
    "int8": "int8",
    "compact-int8": "compact-int8",
}
"""Directory of each format under a run's output directory."""


def dense_fp16_bytes(model_dir: Path) -> int:
    """Bytes of the model's tensors stored as fp16 (floating tensors at 2 bytes an element)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            for n in fh.keys():
                sl = fh.get_slice(n)
                numel = 1
                for d in sl.get_shape():
                    numel *= d
                dt = sl.get_dtype()
                size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2}.get(dt, 1)
                total += numel * (2 if dt.startswith(("F", "BF")) else size)
    return total


def dir_sizes(path: Path) -> tuple[int, int]:
    """(bytes of every file, bytes of the safetensors files) under ``path``."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), sum(
        p.stat().st_size for p in files if p.suffix == ".safetensors"
    )


def export(
    root: Path,
    formats: list[str],
    pruned_layers: list[str],
    perplexity: Callable[[Any], float] | None = None,
    pruned_ppl: float | None = None,
) -> dict[str, Any]:
    """Write ``formats`` from ``root/model`` (the dense export, removed afterwards unless
    ``"dense"`` is among them) and return the ``artifacts`` report section.

    ``pruned_layers``: qualified names of the pruned linears (quantized by int8 and
    compact-int8). ``perplexity(model)``, when given, measures each quantized artifact loaded
    back from disk.
    """
    from core.artifacts.formats import compact, int8

    dense = root / "model"
    fp16 = dense_fp16_bytes(dense)
    linears = set(int8.linear_names(dense))
    quant_layers = [n for n in pruned_layers if n in linears]
    out: dict[str, Any] = {"dense_fp16_bytes": fp16, "formats": {}}
    for fmt in formats:
        d = root / DIRS[fmt]
        info: dict[str, Any] = {"dir": DIRS[fmt]}
        t = time.perf_counter()
        if fmt == "compact":
            compact.pack(dense, d)
        elif fmt == "compact-int8":
            compact.pack(dense, d, quantize={f"{n}.weight" for n in quant_layers})
        elif fmt == "int8":
            int8.write_int8(dense, d, quant_layers)
        if fmt != "dense":
            info["pack_s"] = round(time.perf_counter() - t, 3)
        total, weights = dir_sizes(d)
        info.update(bytes=total, weights_bytes=weights, ratio_to_dense_fp16=round(weights / fp16, 4))
        if fmt in ("int8", "compact-int8"):
            info["quantized_layers"] = len(quant_layers)
            if perplexity is not None:
                info["ppl"] = perplexity(_load(fmt, d))
                info["pruned_fp_ppl"] = pruned_ppl
        out["formats"][fmt] = info
    if "dense" not in formats:
        shutil.rmtree(dense)
    return out


def _load(fmt: str, d: Path) -> Any:
    if fmt == "compact-int8":
        from core.artifacts.formats.compact import load_model

        return load_model(d)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d).eval()
