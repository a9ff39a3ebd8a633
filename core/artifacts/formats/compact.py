"""The compact sparse format (ours; docs/formats.md): pack, verify, unpack, load.

A compact directory holds ``compact.json`` (format name, version, every tensor's encoding,
dtype and shape, the dense shard layout, sha256 and size of every other file, and the sha256
of the header itself), one ``compact-XXXXX-of-YYYYY.safetensors`` per dense shard, and the
dense directory's other files (config, tokenizer) as they are. Each tensor is stored in the
smallest of three encodings, decided from its data:

- ``dense``: the tensor as is (``NAME``);
- ``bitmask``: the elements whose bits are not all zero, row-major (``NAME::values``), and one
  bit per element, LSB first (``NAME::mask``);
- ``nm``: every group of M consecutive elements of the last dimension keeps exactly N values
  (``NAME::values``, shape ``[..., last / M * N]``) and the number of its kept-position
  pattern among the C(M, N) possible, in ``ceil(log2 C(M, N))`` bits (``NAME::idx``; 3 bits a
  group for 2:4).

With ``quantize`` (compact-int8), the listed tensors' values are int8, symmetric per output
row (``NAME::scale``, one per row, in the tensor's dtype); the mask or indices are unchanged.
Packing and unpacking hold one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from core.artifacts.digest import sha256_file
from core.artifacts.formats import bits
from core.artifacts.formats.shards import DTYPES, ShardWriter, dense_layout, iter_tensors
from core.errors import CorruptArtifact

__all__ = ["FORMAT", "HEADER", "VERSION", "load_model", "pack", "read_header", "unpack", "verify"]

FORMAT = "prune-service-compact"
VERSION = 1
HEADER = "compact.json"
INDEX = "model.safetensors.index.json"
DENSE_INDEX = "dense.safetensors.index.json"  # the dense index, kept for unpack
NM_CANDIDATES = (4, 8, 16)
_BY_NAME = {v: k for k, v in DTYPES.items()}


def _header_digest(header: dict[str, Any]) -> str:
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def choose(t: torch.Tensor, quantized: bool = False) -> dict[str, Any]:
    """The encoding of ``t`` that takes the fewest bytes: ``{"encoding", ["n", "m"]}``."""
    if not t.is_floating_point() or t.numel() == 0 or t.dim() == 0:
        return {"encoding": "dense"}
    item = 1 if quantized else t.element_size()
    numel = t.numel()
    best: dict[str, Any] = {"encoding": "dense"}
    best_size = numel * item
    nnz = int(bits.nonzero_bits(t).sum())
    size = bits.bitmask_nbytes(numel, nnz, item)
    if size < best_size:
        best, best_size = {"encoding": "bitmask"}, size
    for m in NM_CANDIDATES:
        if t.shape[-1] % m:
            continue
        n = max(1, bits.nm_group_max(t, m))
        size = bits.nm_nbytes(numel, n, m, item)
        if n < m and size < best_size:
            best, best_size = {"encoding": "nm", "n": n, "m": m}, size
    return best


def _stored(name: str, entry: dict[str, Any], dtype: torch.dtype) -> dict[str, tuple[torch.dtype, int]]:
    """Names, dtypes and ranks of the stored tensors of one entry."""
    vdt = torch.int8 if entry.get("quant") else dtype
    rank = len(entry["shape"])
    enc = entry["encoding"]
    out: dict[str, tuple[torch.dtype, int]] = {}
    if enc == "dense":
        out[name if not entry.get("quant") else f"{name}::values"] = (vdt, rank)
    elif enc == "bitmask":
        out[f"{name}::values"] = (vdt, 1)
        out[f"{name}::mask"] = (torch.uint8, 1)
    else:
        out[f"{name}::values"] = (vdt, rank)
        out[f"{name}::idx"] = (torch.uint8, 1)
    if entry.get("quant"):
        out[f"{name}::scale"] = (dtype, 1)
    return out


def _encode(name: str, t: torch.Tensor, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    scale = None
    if entry.get("quant"):
        q, scale = bits.quantize_rows(t)
        t = q
    enc = entry["encoding"]
    out: dict[str, torch.Tensor] = {}
    if enc == "dense":
        out[name if scale is None else f"{name}::values"] = t
    elif enc == "bitmask":
        out[f"{name}::values"], out[f"{name}::mask"] = bits.bitmask_encode(t)
    else:
        out[f"{name}::values"], out[f"{name}::idx"] = bits.nm_encode(t, entry["n"], entry["m"])
    if scale is not None:
        out[f"{name}::scale"] = scale.reshape(-1)
    return out


def pack(dense_dir: str | Path, out_dir: str | Path, quantize: set[str] | None = None) -> dict[str, Any]:
    """Pack the Hugging Face directory ``dense_dir`` into the compact directory ``out_dir``.

    ``quantize``: names of 2-D tensors (pruned linear weights) stored as int8 (compact-int8);
    the result then unpacks to the dequantized model, not to ``dense_dir``. Returns the header.
    """
    src, out = Path(dense_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=False)
    quantize = quantize or set()
    layout = dense_layout(src)
    nshards = len(layout)
    tensors: dict[str, Any] = {}
    shards: dict[str, Any] = {}
    for i, (shard, names) in enumerate(layout.items(), 1):
        cfile = f"compact-{i:05d}-of-{nshards:05d}.safetensors"
        from safetensors import safe_open

        with safe_open(str(src / shard), "pt") as fh:
            shards[shard] = {"metadata": fh.metadata() or {}, "tensors": names}
        entries = {}
        for name, t in iter_tensors(src / shard, names):  # pass 1: choose encodings from the data
            q = name in quantize and t.dim() == 2 and t.is_floating_point()
            entry = {"file": cfile, "dtype": DTYPES[t.dtype], "shape": list(t.shape), **choose(t, q)}
            if q:
                entry["quant"] = "int8-row-symmetric"
            entries[name] = entry
        declared: dict[str, tuple[torch.dtype, int]] = {}
        owner: dict[str, str] = {}
        for name, entry in entries.items():
            for sname, spec in _stored(name, entry, _BY_NAME[entry["dtype"]]).items():
                declared[sname], owner[sname] = spec, name
        writer = ShardWriter(out / cfile, declared, {"format": FORMAT})
        order = writer.order()
        pending: dict[str, torch.Tensor] = {}
        for name, t in iter_tensors(src / shard, names):  # pass 2: encode and stream out
            pending.update(_encode(name, t, entries[name]))
            while order and order[0] in pending:
                writer.add(order[0], pending.pop(order.pop(0)))
        while order:
            writer.add(order[0], pending.pop(order.pop(0)))
        writer.close()
        tensors.update(entries)
    for p in sorted(src.iterdir()):
        if p.is_file() and p.suffix != ".safetensors" and p.name != INDEX:
            shutil.copy2(p, out / p.name)
    if (src / INDEX).exists():
        shutil.copy2(src / INDEX, out / DENSE_INDEX)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "quantized": bool(quantize),
        "dense_shards": shards,
        "tensors": tensors,
        "files": {
            p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(out.iterdir())
            if p.is_file()
        },
    }
    header["header_sha256"] = _header_digest(header)
    (out / HEADER).write_text(json.dumps(header, indent=1) + "\n", encoding="utf-8")
    return header


def read_header(compact_dir: str | Path) -> dict[str, Any]:
    """Parse and check ``compact.json`` (format, version, its own checksum); raise CorruptArtifact."""
    path = Path(compact_dir) / HEADER
    if not path.is_file():
        raise CorruptArtifact(f"{compact_dir} is not a compact directory: {HEADER} is missing")
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptArtifact(f"{path} is not valid JSON (truncated or corrupted): {e}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptArtifact(f"{path} is not a {FORMAT} header")
    if header.get("version") != VERSION:
        raise CorruptArtifact(
            f"{path}: format version {header.get('version')!r} is not supported (want {VERSION})"
        )
    if header.get("header_sha256") != _header_digest(header):
        raise CorruptArtifact(f"{path}: header checksum mismatch (the header was modified or corrupted)")
    return header


def verify(compact_dir: str | Path) -> dict[str, Any]:
    """Check the header and the size and sha256 of every file it lists; return the header."""
    root = Path(compact_dir)
    header = read_header(root)
    for name, info in header["files"].items():
        p = root / name
        if not p.is_file():
            raise CorruptArtifact(f"{root}: file {name} listed in {HEADER} is missing")
        if p.stat().st_size != info["size"]:
            raise CorruptArtifact(
                f"{p}: size {p.stat().st_size} != {info['size']} in {HEADER} (truncated or corrupted)"
            )
        if sha256_file(p) != info["sha256"]:
            raise CorruptArtifact(f"{p}: sha256 mismatch with {HEADER} (corrupted)")
    return header


class _Reader:
    """Open compact shards, decoding one dense tensor at a time."""

    def __init__(self, root: Path, header: dict[str, Any]) -> None:
        from safetensors import safe_open

        self.header = header
        self.handles = {
            f: safe_open(str(root / f), "pt") for f in {e["file"] for e in header["tensors"].values()}
        }

    def tensor(self, name: str) -> torch.Tensor:
        e = self.header["tensors"][name]
        fh = self.handles[e["file"]]
        shape, dtype, enc = e["shape"], _BY_NAME[e["dtype"]], e["encoding"]
        try:
            quant = bool(e.get("quant"))
            if enc == "dense":
                t = fh.get_tensor(f"{name}::values" if quant else name)
                if list(t.shape) != shape:
                    raise ValueError(f"shape {list(t.shape)} != {shape}")
            elif enc == "bitmask":
                t = bits.bitmask_decode(
                    fh.get_tensor(f"{name}::values"), fh.get_tensor(f"{name}::mask"), shape
                )
            elif enc == "nm":
                vals = fh.get_tensor(f"{name}::values")
                need = math.prod(shape) // e["m"] * e["n"]
                if vals.numel() != need:
                    raise ValueError(f"{vals.numel()} values stored, {need} expected")
                t = bits.nm_decode(vals, fh.get_tensor(f"{name}::idx"), shape, e["n"], e["m"])
            else:
                raise ValueError(f"unknown encoding {enc!r}")
            if quant:
                t = bits.dequantize_rows(t, fh.get_tensor(f"{name}::scale"), dtype)
        except (ValueError, RuntimeError, KeyError, IndexError) as exc:
            raise CorruptArtifact(f"tensor {name} in {e['file']} cannot be decoded: {exc}") from None
        if t.dtype != dtype:
            raise CorruptArtifact(f"tensor {name}: stored dtype {t.dtype} != {e['dtype']} in {HEADER}")
        return t


def unpack(compact_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Restore the Hugging Face directory ``out_dir`` (tensor by tensor identical to the dense
    export that was packed; the dequantized model for compact-int8). Verifies checksums first;
    returns the header."""
    root, out = Path(compact_dir), Path(out_dir)
    header = verify(root)
    reader = _Reader(root, header)
    out.mkdir(parents=True, exist_ok=True)
    for shard, info in header["dense_shards"].items():
        names = {
            n: (_BY_NAME[header["tensors"][n]["dtype"]], len(header["tensors"][n]["shape"]))
            for n in info["tensors"]
        }
        writer = ShardWriter(out / shard, names, info["metadata"])
        for n in writer.order():
            writer.add(n, reader.tensor(n))
        writer.close()
    for name in header["files"]:
        if not name.endswith(".safetensors"):
            shutil.copy2(root / name, out / (INDEX if name == DENSE_INDEX else name))
    return header


def load_model(compact_dir: str | Path, dtype: torch.dtype | None = None) -> Any:
    """The model of a compact directory, ready to run (``AutoModelForCausalLM``, eval mode)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="compact-load-") as tmp:
        unpack(compact_dir, Path(tmp) / "model")
        model = AutoModelForCausalLM.from_pretrained(Path(tmp) / "model", dtype=dtype or "auto")
        model.eval()  # memory-mapped weights stay valid after the files are unlinked (POSIX)
    return model
