"""Bit packing and the sparse encodings on random data."""

from __future__ import annotations

import math

import pytest
import torch

from core.artifacts.formats import bits


@pytest.mark.parametrize("nbits", [1, 2, 3, 7, 14])
def test_pack_unpack_uint(nbits: int) -> None:
    g = torch.Generator().manual_seed(nbits)
    v = torch.randint(0, 1 << nbits, (1001,), generator=g)
    packed = bits.pack_uint(v, nbits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(1001 * nbits / 8)
    assert torch.equal(bits.unpack_uint(packed, nbits, 1001), v)


@pytest.mark.parametrize(("n", "m", "want"), [(2, 4, 3), (1, 4, 2), (4, 8, 7), (8, 16, 14), (1, 2, 1)])
def test_pattern_bits_are_fewest(n: int, m: int, want: int) -> None:
    assert bits.pattern_bits(n, m) == want


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 8), (5, 16)])
def test_nm_round_trip_with_short_groups(n: int, m: int) -> None:
    g = torch.Generator().manual_seed(m * 10 + n)
    w = torch.randn(6, m * 5, generator=g)
    scores = torch.rand(6, 5, m, generator=g)
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(2, scores.topk(n, 2).indices, True)
    keep[0, 0] = False  # an all-zero group
    keep[1, 1, :] = False
    keep[1, 1, 0] = True  # a group with fewer than n nonzeros
    w = torch.where(keep.reshape(6, -1), w, 0.0)  # +0.0 (w * keep would leave -0.0)
    w[2, keep.reshape(6, -1)[2].nonzero()[0, 0]] = -0.0
    values, pat = bits.nm_encode(w, n, m)
    assert values.shape == (6, 5 * n)
    back = bits.nm_decode(values, pat, list(w.shape), n, m)
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))


def test_nm_encode_refuses_denser_groups() -> None:
    with pytest.raises(ValueError, match="not 2:4"):
        bits.nm_encode(torch.ones(2, 8), 2, 4)


def test_bitmask_round_trip_and_count_check() -> None:
    w = torch.randn(5, 7, dtype=torch.bfloat16)
    w[w.abs() < 0.7] = 0
    w[0, 0] = -0.0
    values, mask = bits.bitmask_encode(w)
    back = bits.bitmask_decode(values, mask, [5, 7])
    assert torch.equal(back.view(torch.int16), w.view(torch.int16))
    with pytest.raises(ValueError, match="values are stored"):
        bits.bitmask_decode(values[:-1], mask, [5, 7])


def test_quantize_rows_keeps_exactly_the_zeros() -> None:
    w = torch.randn(8, 32)
    w[:, ::3] = 0
    w[0, 1] = 1e-6  # far below half a step: must not become zero
    w[7] = 0
    q, scale = bits.quantize_rows(w)
    assert torch.equal(q == 0, w == 0) and q.abs().max() <= 127
    deq = bits.dequantize_rows(q, scale, torch.float32)
    assert ((deq - w).abs() <= scale).all()
    assert torch.equal(deq[7], torch.zeros(32))
