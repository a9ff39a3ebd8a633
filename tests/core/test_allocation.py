"""OWL allocation: outlier ratios, block sparsities, exact budgets, and the engine's OWL pass."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.methods.allocation import layer_budgets, outlier_ratio, owl_sparsities
from core.model import families
from core.run import engine
from core.spec import PruneSpec
from tests.tiny_models import build


def test_outlier_ratio_counts_entries_above_m_times_mean() -> None:
    s = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 91.0])  # mean 10
    assert outlier_ratio([s[:5], s[5:]], 5.0) == pytest.approx(0.1)
    assert outlier_ratio([s], 9.0) == pytest.approx(0.1)  # 91 > 90
    assert outlier_ratio([s], 9.2) == 0.0  # 91 < 92
    assert outlier_ratio([s], 0.05) == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    ratios=st.lists(st.floats(0, 1), min_size=1, max_size=12),
    target=st.floats(0.1, 0.8),
    lam=st.floats(0.0, 0.1),
    seed=st.integers(0, 1000),
)
def test_owl_sparsities_in_band_and_weighted_mean_is_target(
    ratios: list[float], target: float, lam: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    numels = [int(x) for x in torch.randint(100, 5000, (len(ratios),), generator=g)]
    sp = owl_sparsities(ratios, numels, target, lam)
    assert all(target - lam - 1e-12 <= s <= target + lam + 1e-12 for s in sp)
    mean = sum(s * n for s, n in zip(sp, numels, strict=True)) / sum(numels)
    assert mean == pytest.approx(target, abs=1e-9)
    # More outliers -> pruned no more.
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    for a, b in itertools.pairwise(order):
        if ratios[a] < ratios[b]:
            assert sp[a] >= sp[b] - 1e-12
    budgets = layer_budgets(sp, numels, target)
    assert sum(budgets) == round(target * sum(numels))
    assert all(abs(k - s * n) <= 1 for k, s, n in zip(budgets, sp, numels, strict=True))


def test_owl_on_tiny_model_counts_weights_exactly() -> None:
    model = build("llama", layers=4)
    cal = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    spec = PruneSpec(method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=2.0)
    info = engine.prune(model, cal, spec)
    owl = info.owl
    assert len(owl["block_sparsity"]) == 4
    assert all(0.5 - 1e-9 <= s <= 0.7 + 1e-9 for s in owl["block_sparsity"])
    assert len(set(round(s, 6) for s in owl["block_sparsity"])) > 1  # really non-uniform
    linears = families.prunable_linears(model)
    zeros = sum(int((families.get_weight(m) == 0).sum()) for m in linears.values())
    total = sum(families.get_weight(m).numel() for m in linears.values())
    # Within one weight per pruned layer (in fact exact, up to weights that were zero already).
    assert abs(zeros - 0.6 * total) <= len(linears)
    recs = info.layer_records
    assert sum(r["budget"] for r in recs.values()) == round(0.6 * total)
    assert all(r["allocation"] == "owl" and r["recon_error"] is not None for r in recs.values())


@pytest.mark.parametrize("method", ["wanda", "magnitude", "sparsegpt", "ria"])
def test_owl_composes_with_every_method(method: str) -> None:
    model = build("llama", layers=3)
    cal = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(2))
    pruned = copy.deepcopy(model)
    info = engine.prune(pruned, cal, PruneSpec(method=method, allocation="owl", owl_m=2.0))
    recs = info.layer_records
    numel = {n: families.get_weight(m).numel() for n, m in families.prunable_linears(pruned).items()}
    assert sum(r["budget"] for r in recs.values()) == round(0.5 * sum(numel.values()))
    for name, r in recs.items():
        assert r["method"] == method
        assert r["sparsity"] == r["budget"] / numel[name]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_owl_allocates_fused_experts_per_expert(family: str) -> None:
    """Fused 3-D experts count in OWL: every expert matrix gets a budget at its block's sparsity."""
    model = build(family, seed=2, layers=3)
    cal = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(3))
    spec = PruneSpec(method="wanda", sparsity=0.6, allocation="owl", owl_lambda=0.1, owl_m=2.0)
    info = engine.prune(model, cal, spec)
    targets = families.prunable_targets(model).values()
    experts = {t.name: t for t in targets if t.fused}
    assert experts, "the tiny model keeps its experts in fused 3-D parameters"
    recs = info.layer_records
    assert set(experts) <= set(recs) and all("budget" in recs[n] for n in experts)
    assert sum(r["budget"] for r in recs.values()) == round(0.6 * sum(t.numel for t in targets))
    sp = info.owl["block_sparsity"]
    assert len(set(round(s, 6) for s in sp)) > 1
    for name, t in experts.items():
        block = int(name.split(".layers.")[1].split(".")[0])
        # Cumulative rounding: each matrix within one weight of its block's OWL sparsity.
        assert abs(recs[name]["budget"] - sp[block] * t.numel) <= 1
        zeros = int((t.get_weight() == 0).sum())
        assert zeros == recs[name]["budget"]
