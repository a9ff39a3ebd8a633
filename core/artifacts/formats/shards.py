"""Streaming safetensors I/O: write a file one tensor at a time, read a directory's tensors.

:class:`ShardWriter` reserves room for the header (every name, dtype and rank are known up
front; only sizes are not), streams each tensor's bytes to disk as it comes, then writes the
header padded with spaces, which the safetensors format allows. Tensors must arrive in the
order the writer sorts them into (itemsize descending, then name), so every offset is aligned.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["DTYPES", "ShardWriter", "dense_layout", "iter_tensors", "tensor_bytes"]

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BIG = 10**19  # placeholder wider than any size or offset


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` (contiguous copy if needed)."""
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


class ShardWriter:
    """Write one safetensors file tensor by tensor: ``names`` maps each tensor to its dtype and
    rank; :meth:`order` is the order :meth:`add` must be called in."""

    def __init__(self, path: Path, names: dict[str, tuple[torch.dtype, int]], metadata: dict[str, str]):
        self.path = path
        self.names = names
        self.metadata = metadata
        self._order = sorted(names, key=lambda n: (-torch.empty(0, dtype=names[n][0]).element_size(), n))
        bound: dict[str, Any] = {"__metadata__": metadata}
        for n, (dt, rank) in names.items():
            bound[n] = {"dtype": DTYPES[dt], "shape": [_BIG] * rank, "data_offsets": [_BIG, _BIG]}
        self._reserved = math.ceil(len(json.dumps(bound, separators=(",", ":")).encode()) / 8) * 8
        self._fh = path.open("wb")
        self._fh.write(b"\0" * (8 + self._reserved))
        self._entries: dict[str, Any] = {}
        self._offset = 0

    def order(self) -> list[str]:
        """The tensor names in the order they must be added."""
        return list(self._order)

    def add(self, name: str, t: torch.Tensor) -> None:
        """Append ``name``'s data (must be the next name of :meth:`order`, with the declared dtype)."""
        expected = self._order[len(self._entries)]
        if name != expected or t.dtype != self.names[name][0] or t.dim() != self.names[name][1]:
            raise ValueError(f"ShardWriter: got {name} {t.dtype} rank {t.dim()}, expected {expected}")
        data = tensor_bytes(t)
        self._fh.write(data)
        self._entries[name] = {
            "dtype": DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + len(data)],
        }
        self._offset += len(data)

    def close(self) -> None:
        """Write the header and close the file."""
        if len(self._entries) != len(self._order):
            missing = [n for n in self._order if n not in self._entries]
            raise ValueError(f"ShardWriter: {len(missing)} tensors never written, e.g. {missing[0]}")
        header = {"__metadata__": self.metadata, **{n: self._entries[n] for n in self._order}}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (self._reserved - len(raw))
        self._fh.seek(0)
        self._fh.write(struct.pack("<Q", self._reserved))
        self._fh.write(raw)
        self._fh.close()


def dense_layout(model_dir: Path) -> dict[str, list[str]]:
    """``{shard file name: [tensor names]}`` of a Hugging Face safetensors directory."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        out: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            out.setdefault(shard, []).append(name)
        return {k: sorted(v) for k, v in sorted(out.items())}
    files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_dir}")
    from safetensors import safe_open

    layout = {}
    for f in files:
        with safe_open(str(model_dir / f), "pt") as fh:
            layout[f] = sorted(fh.keys())
    return layout


def iter_tensors(path: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from one safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        for n in names:
            yield n, fh.get_tensor(n)
