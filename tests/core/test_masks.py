"""core.methods.masks against slow, obviously-correct references, plus property tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import InvalidInput
from core.methods.masks import apply_mask, check_nm, matrix_mask, nm_mask, row_mask, variant_mask

# ---------------------------------------------------------------- slow references


def ref_lowest(values: list[float], k: int) -> set[int]:
    """Indices of the k lowest values; ties broken by lower index (explicit (score, index) tuples)."""
    ranked = sorted((v, i) for i, v in enumerate(values))
    return {i for _, i in ranked[:k]}


def ref_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    out_f, in_f = scores.shape
    k = int(sparsity * in_f)
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        for j in ref_lowest(scores[r].tolist(), k):
            mask[r, j] = True
    return mask


def ref_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    out_f, in_f = scores.shape
    k = int(sparsity * out_f * in_f)
    mask = torch.zeros(out_f * in_f, dtype=torch.bool)
    for j in ref_lowest(scores.reshape(-1).tolist(), k):
        mask[j] = True
    return mask.reshape(out_f, in_f)


def ref_nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out_f, in_f = scores.shape
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    for r in range(out_f):
        for g in range(0, in_f, m):
            for j in ref_lowest(scores[r, g : g + m].tolist(), m - n):
                mask[r, g + j] = True
    return mask


def tied_scores(out_f: int, in_f: int, seed: int, levels: int = 3) -> torch.Tensor:
    """Scores drawn from a few distinct values, so ties are everywhere."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (out_f, in_f), generator=g).float() * 0.5


# ---------------------------------------------------------------- exact references


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7, 0.99])
@pytest.mark.parametrize("tied", [False, True])
def test_row_mask_matches_reference(seed: int, sparsity: float, tied: bool) -> None:
    scores = (
        tied_scores(7, 24, seed)
        if tied
        else torch.randn(7, 24, generator=torch.Generator().manual_seed(seed))
    )
    mask = row_mask(scores, sparsity)
    assert mask.dtype == torch.bool
    assert torch.equal(mask, ref_row_mask(scores, sparsity))
    assert (mask.sum(dim=1) == int(sparsity * 24)).all()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("tied", [False, True])
def test_matrix_mask_matches_reference(seed: int, sparsity: float, tied: bool) -> None:
    scores = (
        tied_scores(6, 20, seed) if tied else torch.rand(6, 20, generator=torch.Generator().manual_seed(seed))
    )
    mask = matrix_mask(scores, sparsity)
    assert torch.equal(mask, ref_matrix_mask(scores, sparsity))
    assert int(mask.sum()) == int(sparsity * 120)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2), (5, 8)])
@pytest.mark.parametrize("tied", [False, True])
def test_nm_mask_matches_reference(seed: int, n: int, m: int, tied: bool) -> None:
    in_f = 4 * m
    scores = (
        tied_scores(5, in_f, seed)
        if tied
        else torch.rand(5, in_f, generator=torch.Generator().manual_seed(seed))
    )
    mask = nm_mask(scores, n, m)
    assert torch.equal(mask, ref_nm_mask(scores, n, m))
    assert (mask.reshape(5, -1, m).sum(dim=-1) == m - n).all()
    assert check_nm(mask, n, m, exact=True)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    m=st.integers(2, 8),
    levels=st.sampled_from([1, 2, 3, 1000]),
    specials=st.booleans(),
)
def test_small_group_ranking_equals_the_stable_sort(seed: int, m: int, levels: int, specials: bool) -> None:
    """The N:M fast path (pairwise ranks) picks what the stable sort picks (ties, -0.0, inf included)."""
    from core.methods.masks import _lowest_k_small

    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (7, 6, m), generator=g).float() - levels // 2
    if specials:
        scores[0, 0] = -0.0
        scores[1, :, 0] = float("inf")
        scores[2, :, -1] = float("-inf")
    for k in range(1, m):
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        expected = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(_lowest_k_small(scores, k), expected)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(9, 300),
    levels=st.sampled_from([1, 2, 3, 1000, 0]),
    specials=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_selection_equals_the_stable_sort(
    seed: int, width: int, levels: int, specials: bool, dtype: torch.dtype
) -> None:
    """The wide-row path (k-th value, then ties in index order) picks what the stable sort picks:
    NumPy's selection (fp16/32/64) and ``torch.kthvalue`` (bf16) alike."""
    from core.methods.masks import _lowest_k_select

    g = torch.Generator().manual_seed(seed)
    if levels:
        scores = torch.randint(0, levels, (5, width), generator=g).float() - levels // 2
    else:
        scores = torch.randn(5, width, generator=g)
    if specials:
        scores[0, ::3] = -0.0
        scores[1, :4] = float("inf")
        scores[2, -4:] = float("-inf")
    scores = scores.to(dtype)
    for k in sorted({1, width // 3, width // 2, width - 1}):
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
        expected = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(_lowest_k_select(scores, k), expected)


def test_tie_rule_prunes_lower_index_first() -> None:
    scores = torch.ones(2, 8)
    assert row_mask(scores, 0.5)[0].tolist() == [True] * 4 + [False] * 4
    assert matrix_mask(scores, 0.25).reshape(-1).nonzero().flatten().tolist() == [0, 1, 2, 3]
    assert nm_mask(scores, 2, 4)[0].tolist() == [True, True, False, False] * 2


def test_nm_rejects_indivisible_input() -> None:
    with pytest.raises(InvalidInput, match="multiple of 4"):
        nm_mask(torch.rand(3, 10), 2, 4)
    with pytest.raises(InvalidInput):
        nm_mask(torch.rand(3, 8), 4, 4)


def test_invalid_sparsity_and_shape() -> None:
    with pytest.raises(InvalidInput):
        row_mask(torch.rand(3, 8), 1.0)
    with pytest.raises(InvalidInput):
        matrix_mask(torch.rand(3, 8), -0.1)
    with pytest.raises(InvalidInput):
        row_mask(torch.rand(8), 0.5)


def test_apply_mask_and_check_nm_on_weights() -> None:
    w = torch.arange(1, 17, dtype=torch.float32).reshape(2, 8)
    mask = nm_mask(w.abs(), 2, 4)
    assert not check_nm(w, 2, 4)
    out = apply_mask(w, mask)
    assert out is w
    assert torch.equal(w == 0, mask)
    assert check_nm(w, 2, 4) and check_nm(w, 2, 4, exact=True)
    assert check_nm(w, 3, 4) and not check_nm(w, 3, 4, exact=True)
    assert not check_nm(w, 1, 4)
    assert not check_nm(torch.zeros(2, 6), 2, 4)  # indivisible: never a valid N:M weight


# ---------------------------------------------------------------- property tests


@st.composite
def nm_case(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    out_f = draw(st.integers(1, 16))
    in_f = m * draw(st.integers(1, 64 // m))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([2, 3, 1000]))
    return tied_scores(out_f, in_f, seed, levels), n, m


@st.composite
def row_case(draw: st.DrawFn) -> tuple[torch.Tensor, float]:
    out_f = draw(st.integers(1, 16))
    in_f = draw(st.integers(1, 64))
    seed = draw(st.integers(0, 2**31 - 1))
    levels = draw(st.sampled_from([2, 3, 1000]))
    sparsity = draw(st.floats(0.0, 1.0, exclude_max=True, allow_nan=False))
    return tied_scores(out_f, in_f, seed, levels), sparsity


@settings(max_examples=150, deadline=None)
@given(nm_case())
def test_nm_properties(case: tuple[torch.Tensor, int, int]) -> None:
    scores, n, m = case
    mask = nm_mask(scores, n, m)
    out_f, in_f = scores.shape
    g_scores = scores.reshape(out_f, in_f // m, m)
    g_mask = mask.reshape(out_f, in_f // m, m)
    assert (g_mask.sum(dim=-1) == m - n).all()
    max_pruned = g_scores.masked_fill(~g_mask, float("-inf")).amax(dim=-1)
    min_kept = g_scores.masked_fill(g_mask, float("inf")).amin(dim=-1)
    assert (max_pruned <= min_kept).all()
    assert torch.equal(mask, nm_mask(scores.clone(), n, m))


@settings(max_examples=150, deadline=None)
@given(row_case())
def test_row_mask_properties(case: tuple[torch.Tensor, float]) -> None:
    scores, sparsity = case
    mask = row_mask(scores, sparsity)
    assert (mask.sum(dim=1) == int(sparsity * scores.shape[1])).all()
    max_pruned = scores.masked_fill(~mask, float("-inf")).amax(dim=1)
    min_kept = scores.masked_fill(mask, float("inf")).amin(dim=1)
    assert (max_pruned <= min_kept).all()
    assert torch.equal(mask, row_mask(scores.clone(), sparsity))


@settings(max_examples=150, deadline=None)
@given(row_case())
def test_matrix_mask_properties(case: tuple[torch.Tensor, float]) -> None:
    scores, sparsity = case
    mask = matrix_mask(scores, sparsity)
    assert int(mask.sum()) == int(sparsity * scores.numel())
    if mask.any() and (~mask).any():
        assert scores[mask].max() <= scores[~mask].min()
    assert torch.equal(mask, matrix_mask(scores.clone(), sparsity))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.2, 0.5, 0.6, 0.7, 0.8]))
def test_variant_hits_target_within_tolerance(seed: int, sparsity: float) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(64, 256, generator=g).abs() * torch.rand(256, generator=g).add(0.1)
    mask = variant_mask(scores, sparsity)
    assert abs(mask.float().mean().item() - sparsity) <= 0.001
    # Within each row the pruned entries are the lowest ones (a prefix of the sorted row).
    max_pruned = scores.masked_fill(~mask, float("-inf")).amax(dim=1)
    min_kept = scores.masked_fill(mask, float("inf")).amin(dim=1)
    assert (max_pruned <= min_kept).all()
    assert torch.equal(mask, variant_mask(scores, sparsity))


def test_variant_rows_differ_and_zero_sparsity() -> None:
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(0.1, 3.0, 64).unsqueeze(1)
    scores = torch.rand(64, 256, generator=g) ** scale
    mask = variant_mask(scores, 0.5)
    assert abs(mask.float().mean().item() - 0.5) <= 0.001
    assert mask.sum(dim=1).unique().numel() > 1  # not the uniform per-row budget
    assert not variant_mask(scores, 0.0).any()


def test_selection_takes_strided_and_grad_tensors() -> None:
    """A transposed view and a tensor that requires grad give the stable sort's mask too."""
    from core.methods.masks import _lowest_k_select

    base = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    for scores in (base.T, base.clone().requires_grad_(True)):
        order = torch.sort(scores.detach(), dim=-1, stable=True).indices[..., :11]
        expected = torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)
        assert torch.equal(_lowest_k_select(scores, 11), expected)
