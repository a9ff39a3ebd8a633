"""Pure tensor functions of the compact formats: bit packing, sparse encodings, int8 rows.

"Zero" here means the all-zero bit pattern (+0.0): a tensor's mask marks every element whose
bits are not all zero, so -0.0 (and NaN, denormals, ...) are kept as values and restoration
is bit-exact.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

__all__ = [
    "bitmask_decode",
    "bitmask_encode",
    "bitmask_nbytes",
    "dequantize_rows",
    "nm_decode",
    "nm_encode",
    "nm_group_max",
    "nm_nbytes",
    "nonzero_bits",
    "pack_uint",
    "pattern_bits",
    "quantize_rows",
    "unpack_uint",
]

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def nonzero_bits(t: torch.Tensor) -> torch.Tensor:
    """Bool tensor: True where the element's bit pattern is not all zeros (-0.0 counts as nonzero)."""
    if t.dtype == torch.bool:
        return t.clone()
    return t.view(_INT_VIEW[t.element_size()]) != 0


def pack_uint(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative ints < 2**bits (bits <= 31), flattened, LSB first into a 1-D uint8
    tensor of ``ceil(numel * bits / 8)`` bytes."""
    v = values.reshape(-1).to(torch.int32)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((v.unsqueeze(1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (stream.to(torch.uint8).view(-1, 8) * weights).sum(1, dtype=torch.int32).to(torch.uint8)


def unpack_uint(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint`: ``count`` ints (int64) from ``packed``."""
    if packed.dtype != torch.uint8 or packed.numel() * 8 < count * bits:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {count} values of {bits} bits")
    shifts = torch.arange(8, dtype=torch.uint8)
    stream = ((packed.reshape(-1).unsqueeze(1) >> shifts) & 1).reshape(-1)[: count * bits]
    weights = 1 << torch.arange(bits, dtype=torch.int64)
    return (stream.view(count, bits).to(torch.int64) * weights).sum(1)


def bitmask_nbytes(numel: int, nnz: int, itemsize: int) -> int:
    """Bytes of the bitmask encoding: kept values plus one bit per element."""
    return nnz * itemsize + math.ceil(numel / 8)


def bitmask_encode(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values in row-major order, packed mask) of ``t``."""
    flat = t.reshape(-1)
    keep = nonzero_bits(flat)
    return flat[keep].contiguous(), pack_uint(keep, 1)


def bitmask_decode(values: torch.Tensor, mask: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """The dense tensor of ``shape`` from :func:`bitmask_encode`'s output (+0.0 elsewhere)."""
    numel = math.prod(shape)
    keep = unpack_uint(mask, 1, numel).bool()
    if int(keep.sum()) != values.numel():
        raise ValueError(f"mask keeps {int(keep.sum())} elements but {values.numel()} values are stored")
    out = torch.zeros(numel, dtype=values.dtype)
    out[keep] = values
    return out.view(shape)


@functools.lru_cache(maxsize=32)
def _patterns(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [C(m, n), n] of every n-subset of range(m) in lexicographic order, rank of
    each m-bit occupancy word [2**m] (-1 where not n bits set))."""
    combos = list(itertools.combinations(range(m), n))
    positions = torch.tensor(combos, dtype=torch.int64).view(len(combos), n)
    rank = torch.full((1 << m,), -1, dtype=torch.int64)
    words = (1 << positions).sum(1)
    rank[words] = torch.arange(len(combos))
    return positions, rank


def pattern_bits(n: int, m: int) -> int:
    """Fewest bits naming which ``n`` of ``m`` positions a group keeps: ceil(log2 C(m, n))."""
    return max(1, (math.comb(m, n) - 1).bit_length())


def nm_group_max(t: torch.Tensor, m: int) -> int:
    """Largest count of nonzero elements in any group of ``m`` consecutive elements of the last dim."""
    nz = nonzero_bits(t).reshape(-1, m)
    return int(nz.sum(1).max()) if nz.numel() else 0


def nm_nbytes(numel: int, n: int, m: int, itemsize: int) -> int:
    """Bytes of the N:M encoding: N values per group of M plus the group's pattern number."""
    groups = numel // m
    return groups * n * itemsize + math.ceil(groups * pattern_bits(n, m) / 8)


def nm_encode(t: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [..., last/m*n], packed pattern numbers) of a tensor whose every group of ``m``
    along the last dim has at most ``n`` nonzero elements. Each group's kept positions (in
    increasing order) are numbered by their rank among the C(m, n) subsets, packed in
    :func:`pattern_bits` bits. A group with fewer nonzeros also keeps its lowest zero
    positions, as stored +0.0 values, so every group has exactly ``n``."""
    groups = t.reshape(-1, m)
    nz = nonzero_bits(groups)
    if int(nz.sum(1).max()) > n:
        raise ValueError(f"tensor is not {n}:{m} sparse")
    pos = torch.arange(m, dtype=torch.int32)
    key = nz.to(torch.int32) * (2 * m) + (m - 1 - pos)  # nonzeros first, then lowest positions
    idx = key.topk(n, dim=1).indices.sort(dim=1).values
    values = groups.gather(1, idx).reshape(*t.shape[:-1], t.shape[-1] // m * n)
    _, rank = _patterns(n, m)
    numbers = rank[(1 << idx).sum(1)]
    return values.contiguous(), pack_uint(numbers, pattern_bits(n, m))


def nm_decode(values: torch.Tensor, patterns: torch.Tensor, shape: list[int], n: int, m: int) -> torch.Tensor:
    """The dense tensor of ``shape`` from :func:`nm_encode`'s output."""
    ngroups = math.prod(shape) // m
    positions, _ = _patterns(n, m)
    numbers = unpack_uint(patterns, pattern_bits(n, m), ngroups)
    if ngroups and int(numbers.max()) >= positions.shape[0]:
        raise ValueError(f"pattern number {int(numbers.max())} out of range for {n}:{m}")
    out = torch.zeros(ngroups, m, dtype=values.dtype)
    out.scatter_(1, positions[numbers], values.reshape(ngroups, n))
    return out.view(shape)


def quantize_rows(
    w: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row (output channel) int8: ``(q int8, scale [rows, 1])`` with
    ``w ≈ q * scale``. The scale is rounded to ``scale_dtype`` (default ``w.dtype``) before
    ``q = round(w / scale)``. Zeros map to exactly 0 and nothing else does (a weight below half
    a step becomes +-1), so the zeros of ``q`` are exactly those of ``w``; an all-zero row gets
    scale 1."""
    w32 = w.float().reshape(w.shape[0], -1)
    amax = w32.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(scale_dtype or w.dtype)
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))  # underflow in fp16
    q = torch.round(w32 / scale.float()).clamp_(-127, 127)
    q = torch.where((q == 0) & (w32 != 0), torch.sign(w32), q)  # no new zeros: same sparsity pattern
    return q.to(torch.int8).view(w.shape), scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per row, computed in float32 and cast to ``dtype``."""
    return (q.float().reshape(q.shape[0], -1) * scale.float().reshape(-1, 1)).to(dtype).view(q.shape)
