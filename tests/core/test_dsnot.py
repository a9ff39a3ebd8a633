"""DSnoT refinement: exact per-row sparsity and N:M, never a larger reconstruction error."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.methods.dsnot import dsnot_refine, keep_better_rows
from core.methods.masks import check_nm, nm_mask, row_mask
from core.methods.recon import relative_error, row_errors
from core.methods.wanda import wanda_scores
from core.model import families
from core.run import engine
from core.spec import PruneSpec
from tests.tiny_models import build


def layer_problem(seed: int, out_f: int = 24, in_f: int = 32, ntok: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ntok, in_f, generator=g) * torch.exp(torch.randn(in_f, generator=g)) + torch.randn(
        in_f, generator=g
    )
    w = torch.randn(out_f, in_f, generator=g)
    return w, x


def test_relative_error_matches_explicit_outputs() -> None:
    w, x = layer_problem(0)
    w2 = w.masked_fill(row_mask(w.abs(), 0.5), 0)
    explicit = torch.linalg.norm(x @ w.T - x @ w2.T) / torch.linalg.norm(x @ w.T)
    assert abs(relative_error(w, w2, x.T @ x) - float(explicit)) < 1e-5
    assert torch.allclose(row_errors(w - w2, x.T @ x), ((x @ (w - w2).T) ** 2).sum(0).double(), rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    nm=st.sampled_from([None, (2, 4), (4, 8)]),
    sparsity=st.sampled_from([0.5, 0.7]),
)
def test_dsnot_keeps_counts_and_never_increases_error(
    seed: int, nm: tuple[int, int] | None, sparsity: float
) -> None:
    w, x = layer_problem(seed)
    xnorm = (x**2).sum(0)
    scores = wanda_scores(w, xnorm)
    initial = nm_mask(scores, *nm) if nm else row_mask(scores, sparsity)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    res = dsnot_refine(w, initial, mean, var, xnorm, nm=nm, iters=30, threshold=0.0)
    assert torch.equal(res.mask.sum(1), initial.sum(1))
    if nm:
        assert check_nm(res.mask, *nm, exact=True)
    gram = x.T @ x
    final = keep_better_rows(w, w, initial, res.mask, gram)
    assert torch.equal(final.sum(1), initial.sum(1))
    if nm:
        assert check_nm(final, *nm, exact=True)
    before = relative_error(w, w.masked_fill(initial, 0), gram)
    after = relative_error(w, w.masked_fill(final, 0), gram)
    assert after <= before + 1e-9


def test_dsnot_reduces_the_expected_error_it_targets() -> None:
    w, x = layer_problem(3, out_f=64, in_f=64, ntok=512)
    xnorm = (x**2).sum(0)
    initial = row_mask(wanda_scores(w, xnorm), 0.5)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    res = dsnot_refine(w, initial, mean, var, xnorm, iters=50, threshold=0.0)
    assert res.swaps > 0
    e0 = ((w * mean) * initial).sum(1).abs().sum()
    e1 = ((w * mean) * res.mask).sum(1).abs().sum()
    assert e1 < e0


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), pattern=st.sampled_from(["unstructured", "2:4"]))
def test_dsnot_in_the_engine_on_a_tiny_model(seed: int, pattern: str) -> None:
    model = build("llama", seed=seed % 7)
    cal = torch.randint(0, 200, (3, 32), generator=torch.Generator().manual_seed(seed))
    plain, refined = copy.deepcopy(model), copy.deepcopy(model)
    base = engine.prune(plain, cal, PruneSpec(method="wanda", pattern=pattern))
    spec = PruneSpec(method="wanda", pattern=pattern, refine="dsnot", dsnot_threshold=0.0, dsnot_iters=20)
    info = engine.prune(refined, cal, spec)
    nm = spec.nm
    a = families.prunable_linears(plain)
    for name, mod in families.prunable_linears(refined).items():
        w1, w0 = families.get_weight(mod), families.get_weight(a[name])
        assert torch.equal((w1 == 0).sum(1), (w0 == 0).sum(1))  # same per-row sparsity
        if nm:
            assert check_nm(w1, *nm)
        rec, rec0 = info.layer_records[name], base.layer_records[name]
        assert rec["refine"] == "dsnot" and rec0["refine"] == "none"
    # Block 0 sees identical inputs in both runs, so its layers' errors compare directly.
    for name, rec in info.layer_records.items():
        if ".0." in name:
            assert rec["recon_error"] <= base.layer_records[name]["recon_error"] + 1e-6
