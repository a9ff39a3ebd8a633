"""RIA masks against a slow reference; the N:M channel permutation."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from core.methods import REGISTRY
from core.methods.masks import check_nm
from core.methods.ria import channel_permutation
from core.methods.stats import LayerStats
from core.spec import PruneSpec


def ref_ria_mask(w: torch.Tensor, xnorm_sq: torch.Tensor, alpha: float, sparsity: float | None, nm=None):
    """Loops over entries: the paper's score, then the lowest k of the matrix / of each group."""
    out_f, in_f = w.shape
    a = w.abs().tolist()
    rows = [sum(r) for r in a]
    cols = [sum(a[i][j] for i in range(out_f)) for j in range(in_f)]
    act = [float(v) ** 0.5 for v in xnorm_sq]
    score = [
        [(a[i][j] / rows[i] + a[i][j] / cols[j]) * act[j] ** alpha for j in range(in_f)] for i in range(out_f)
    ]
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if nm is None:
        k = int(sparsity * out_f * in_f)
        flat = sorted((score[i][j], i * in_f + j) for i in range(out_f) for j in range(in_f))
        for _, idx in flat[:k]:
            mask[idx // in_f, idx % in_f] = True
    else:
        n, m = nm
        for i in range(out_f):
            for g in range(0, in_f, m):
                grp = sorted((score[i][j], j) for j in range(g, g + m))
                for _, j in grp[: m - n]:
                    mask[i, j] = True
    return mask


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    alpha=st.sampled_from([0.0, 0.5, 1.0]),
    pattern=st.sampled_from(["unstructured", "2:4", "4:8"]),
    sparsity=st.sampled_from([0.3, 0.5, 0.7]),
)
def test_ria_equals_slow_reference(seed: int, alpha: float, pattern: str, sparsity: float) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 16, generator=g, dtype=torch.float64).float()
    xn = torch.rand(16, generator=g) * 10 + 0.1
    kw = {"sparsity": sparsity} if pattern == "unstructured" else {}
    spec = PruneSpec(method="ria", pattern=pattern, ria_alpha=alpha, **kw)
    mask = REGISTRY["ria"].prune(w.clone(), LayerStats(xnorm_sq=xn, hessian=None, ntokens=1), spec)
    ref = ref_ria_mask(w, xn, alpha, sparsity, spec.nm)
    assert torch.equal(mask, ref)


def test_ria_permutation_is_nm_over_permuted_groups() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    xn = torch.exp(torch.randn(64, generator=g) * 2)
    spec = PruneSpec(method="ria", pattern="2:4", ria_permute=True)
    mask, perm = REGISTRY["ria"].prune_grouped(w, LayerStats(xnorm_sq=xn, hessian=None, ntokens=1), spec)
    assert perm is not None and sorted(perm.tolist()) == list(range(64))
    assert check_nm(mask[:, perm], 2, 4, exact=True)
    assert int(mask.sum()) == 32 * 32
    # The dealt order puts one column of each score quartile in every group.
    p = channel_permutation(torch.arange(64.0).repeat(4, 1), 4)
    for grp in p.reshape(-1, 4).tolist():
        assert sorted(c // 16 for c in grp) == [0, 1, 2, 3]
