"""Pruning methods and the layer-statistics accumulator."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

from core.errors import InvalidInput
from core.methods import REGISTRY, Method, get_method
from core.methods.masks import check_nm, matrix_mask, row_mask
from core.methods.sparsegpt import sparsegpt_prune
from core.methods.stats import LayerStats, StatsAccumulator
from core.spec import METHODS, PruneSpec


def correlated_inputs(ntokens: int, in_f: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated features and very different per-feature scales."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(ntokens, in_f, generator=g)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    scale = torch.exp(torch.randn(in_f, generator=g))
    return (z @ mix) * scale


def stats_for(x: torch.Tensor, batches: int = 3) -> LayerStats:
    acc = StatsAccumulator(x.shape[-1], need_xnorm=True, need_hessian=True)
    for chunk in x.chunk(batches):
        acc.add(chunk)
    return acc.result()


def prune_copy(
    name: str, weight: torch.Tensor, stats: LayerStats, **spec: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a registered method on a copy; return (pruned weight, mask), zeroing as the engine does."""
    w = weight.clone()
    mask = REGISTRY[name].prune(w, stats, PruneSpec(method=name, **spec))  # type: ignore[arg-type]
    assert mask.dtype == torch.bool and mask.shape == weight.shape
    w[mask] = 0
    return w, mask


# ---------------------------------------------------------------- registry


def test_registry_matches_spec() -> None:
    assert set(REGISTRY) == set(METHODS)
    for name, method in REGISTRY.items():
        assert isinstance(method, Method)
        assert method.name == name
        assert method.needs <= {"xnorm", "hessian"}
        assert get_method(name) is method
    assert REGISTRY["wanda"].needs == {"xnorm"}
    assert REGISTRY["magnitude"].needs == frozenset()
    assert REGISTRY["sparsegpt"].needs == {"hessian"}


def test_get_method_unknown_names_supported() -> None:
    with pytest.raises(InvalidInput, match=r"magnitude.*sparsegpt.*wanda"):
        get_method("obc")


def test_missing_stats_is_a_clear_error() -> None:
    empty = LayerStats(xnorm_sq=None, hessian=None, ntokens=0)
    with pytest.raises(InvalidInput, match="xnorm"):
        REGISTRY["wanda"].prune(torch.rand(4, 8), empty, PruneSpec(method="wanda"))
    with pytest.raises(InvalidInput, match="Hessian"):
        REGISTRY["sparsegpt"].prune(torch.rand(4, 8), empty, PruneSpec(method="sparsegpt"))


# ---------------------------------------------------------------- stats


def test_accumulator_matches_direct_computation_over_batches() -> None:
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randn(2, 5, 12, generator=g),
        torch.randn(3, 12, generator=g),
        torch.randn(1, 7, 12, generator=g),
    ]
    acc = StatsAccumulator(12, need_xnorm=True, need_hessian=True)
    for b in batches:
        acc.add(b)
    acc.add(torch.empty(0, 12))  # no tokens: no effect
    res = acc.result()
    x = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert res.ntokens == 20
    assert res.xnorm_sq is not None and res.hessian is not None
    assert res.xnorm_sq.dtype == torch.float32 and res.hessian.dtype == torch.float32
    torch.testing.assert_close(res.xnorm_sq.double(), (x**2).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.hessian.double(), 2.0 / 20 * x.T @ x, rtol=1e-5, atol=1e-5)


def test_accumulator_only_collects_what_is_needed() -> None:
    acc = StatsAccumulator(4, need_xnorm=False, need_hessian=True)
    acc.add(torch.ones(3, 4))
    res = acc.result()
    assert res.xnorm_sq is None and res.hessian is not None
    acc = StatsAccumulator(4, need_xnorm=True, need_hessian=False)
    acc.add(torch.ones(3, 4))
    res = acc.result()
    assert res.hessian is None and res.xnorm_sq is not None
    with pytest.raises(ValueError):
        acc.add(torch.ones(3, 5))


def test_bf16_inputs_accumulate_in_fp32() -> None:
    acc = StatsAccumulator(8, need_xnorm=True, need_hessian=True)
    x = torch.ones(64, 8, dtype=torch.bfloat16) * 1.5
    for _ in range(100):  # 6400 tokens: a bf16 running sum would stall far below 14400
        acc.add(x)
    res = acc.result()
    assert res.xnorm_sq is not None and res.hessian is not None
    assert res.xnorm_sq.dtype == torch.float32 and res.hessian.dtype == torch.float32
    torch.testing.assert_close(res.xnorm_sq, torch.full((8,), 6400 * 2.25))
    torch.testing.assert_close(res.hessian, torch.full((8, 8), 2 * 2.25))


# ---------------------------------------------------------------- wanda / magnitude


def test_wanda_matches_reference_on_linear_with_known_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 6, bias=True)
    x = correlated_inputs(40, 16, seed=3).reshape(4, 10, 16)
    acc = StatsAccumulator(16, need_xnorm=True, need_hessian=False)
    handle = layer.register_forward_hook(lambda mod, inp, out: acc.add(inp[0]))
    with torch.no_grad():
        for sample in x:
            layer(sample.unsqueeze(0))
    handle.remove()
    stats = acc.result()

    weight = layer.weight.detach().clone()
    ref_scores = weight.abs() * torch.linalg.vector_norm(x.reshape(-1, 16), dim=0)[None, :]
    # Reference mask: per row, prune the 8 lowest (score, index) pairs.
    ref = torch.zeros(6, 16, dtype=torch.bool)
    for r in range(6):
        for _, j in sorted((float(s), j) for j, s in enumerate(ref_scores[r]))[:8]:
            ref[r, j] = True
    w, mask = prune_copy("wanda", weight, stats, sparsity=0.5)
    assert torch.equal(mask, ref)
    assert (mask.sum(1) == 8).all()
    assert torch.equal(w == 0, mask)


def test_wanda_uses_input_norms_not_just_magnitude() -> None:
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    stats = LayerStats(xnorm_sq=torch.tensor([100.0, 1.0, 1.0, 0.01]), hessian=None, ntokens=1)
    # scores: 10, 2, 3, 0.4 -> prune columns 3 and 1
    _, mask = prune_copy("wanda", weight, stats, sparsity=0.5)
    assert mask.tolist() == [[False, True, False, True]]
    _, mask = prune_copy("magnitude", weight, stats, sparsity=0.5)
    assert mask.tolist() == [[True, True, False, False]]


def test_wanda_nm_and_variant() -> None:
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(32, 128, generator=g)
    stats = stats_for(correlated_inputs(256, 128, seed=2))
    w, mask = prune_copy("wanda", weight, stats, pattern="2:4")
    assert check_nm(mask, 2, 4, exact=True) and check_nm(w, 2, 4)
    _, mask = prune_copy("wanda", weight, stats, sparsity=0.6, variant=True)
    assert abs(mask.float().mean().item() - 0.6) <= 0.001
    _, plain = prune_copy("wanda", weight, stats, sparsity=0.6)
    assert not torch.equal(mask, plain)


def test_magnitude_uses_one_threshold_per_matrix() -> None:
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(16, 64, generator=g) * torch.linspace(0.1, 2.0, 16).unsqueeze(1)
    stats = LayerStats(xnorm_sq=None, hessian=None, ntokens=0)
    _, mask = prune_copy("magnitude", weight, stats, sparsity=0.5)
    assert torch.equal(mask, matrix_mask(weight.abs(), 0.5))
    assert not torch.equal(mask, row_mask(weight.abs(), 0.5))  # rows with small weights lose more
    assert int(mask.sum()) == 512
    _, mask = prune_copy("magnitude", weight, stats, pattern="1:4")
    assert check_nm(mask, 1, 4, exact=True)


# ---------------------------------------------------------------- sparsegpt


def recon_error(w_dense: torch.Tensor, w_pruned: torch.Tensor, x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double() @ (w_dense - w_pruned).double().T).item()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_beats_masks_without_update(pattern: str) -> None:
    in_f, out_f = 128, 48
    x = correlated_inputs(1024, in_f, seed=5)
    stats = stats_for(x, batches=4)
    weight = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(6))
    w_sgpt, mask = prune_copy("sparsegpt", weight, stats, pattern=pattern, blocksize=32)
    w_mag, _ = prune_copy("magnitude", weight, stats, pattern=pattern)
    w_wanda, _ = prune_copy("wanda", weight, stats, pattern=pattern)
    e_sgpt, e_mag, e_wanda = (recon_error(weight, w, x) for w in (w_sgpt, w_mag, w_wanda))
    assert e_sgpt < e_wanda < e_mag
    assert e_sgpt < 0.95 * e_wanda
    assert torch.equal(w_sgpt == 0, mask)
    assert int(mask.sum()) == out_f * in_f // 2


@pytest.mark.parametrize(("pattern", "blocksize"), [("2:4", 128), ("2:4", 6), ("1:4", 16), ("4:8", 3)])
def test_sparsegpt_nm_exact_per_group(pattern: str, blocksize: int) -> None:
    x = correlated_inputs(256, 64, seed=7)
    stats = stats_for(x)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(8))
    spec = PruneSpec(method="sparsegpt", pattern=pattern)
    n, m = spec.nm  # type: ignore[misc]
    w, mask = prune_copy("sparsegpt", weight, stats, pattern=pattern, blocksize=blocksize)
    assert check_nm(mask, n, m, exact=True)
    assert check_nm(w, n, m)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
@pytest.mark.parametrize("blocksize", [7, 32, 128])
def test_sparsegpt_unstructured_exact_target(sparsity: float, blocksize: int) -> None:
    x = correlated_inputs(200, 96, seed=9)
    stats = stats_for(x)
    weight = torch.randn(20, 96, generator=torch.Generator().manual_seed(10))
    w, mask = prune_copy("sparsegpt", weight, stats, sparsity=sparsity, blocksize=blocksize)
    assert int(mask.sum()) == int(sparsity * 20 * 96)
    if sparsity == 0.0:
        torch.testing.assert_close(w, weight)


def test_sparsegpt_lazy_updates_match_eager_blocks_for_nm() -> None:
    # N:M choices depend only on already-updated weights, so any block size gives the same result.
    x = correlated_inputs(300, 48, seed=11)
    stats = stats_for(x)
    weight = torch.randn(10, 48, generator=torch.Generator().manual_seed(12))
    w_a, w_b = weight.clone(), weight.clone()
    assert stats.hessian is not None
    m_a = sparsegpt_prune(w_a, stats.hessian, 0.5, nm=(2, 4), blocksize=4)
    m_b = sparsegpt_prune(w_b, stats.hessian, 0.5, nm=(2, 4), blocksize=48)
    assert torch.equal(m_a, m_b)
    torch.testing.assert_close(w_a, w_b, rtol=1e-4, atol=1e-4)


def test_sparsegpt_dead_inputs_and_hessian_untouched() -> None:
    x = correlated_inputs(128, 32, seed=13)
    x[:, [3, 17]] = 0.0  # inputs that never fire
    stats = stats_for(x)
    assert stats.hessian is not None
    h_before = stats.hessian.clone()
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(14))
    w, mask = prune_copy("sparsegpt", weight, stats, sparsity=0.5)
    assert torch.equal(stats.hessian, h_before)
    assert (w[:, [3, 17]] == 0).all()
    assert torch.isfinite(w).all()
    assert int(mask.sum()) == 128


def test_sparsegpt_rank_deficient_hessian_is_handled() -> None:
    # Fewer tokens than features: H is singular; dampening keeps it positive definite.
    x = correlated_inputs(8, 64, seed=15)
    stats = stats_for(x, batches=2)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(16))
    w, mask = prune_copy("sparsegpt", weight, stats, pattern="2:4")
    assert torch.isfinite(w).all() and check_nm(mask, 2, 4, exact=True)


def test_sparsegpt_rejects_indivisible_nm() -> None:
    stats = stats_for(correlated_inputs(32, 10, seed=0))
    with pytest.raises(InvalidInput, match="multiple of 4"):
        REGISTRY["sparsegpt"].prune(torch.rand(4, 10), stats, PruneSpec(method="sparsegpt", pattern="2:4"))


def test_sparsegpt_dampening_retry_then_clear_error() -> None:
    weight = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    # Slightly indefinite: percdamp 0.01 is not enough, the 10x retry is.
    h = torch.diag(torch.tensor([1.0, -0.005]))
    w = weight.clone()
    mask = sparsegpt_prune(w, h, 0.5, percdamp=0.01)
    assert int(mask.sum()) == 2 and torch.isfinite(w).all()
    with pytest.raises(InvalidInput, match="percdamp"):
        sparsegpt_prune(weight.clone(), torch.diag(torch.tensor([1.0, -0.5])), 0.5, percdamp=0.01)
