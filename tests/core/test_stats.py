"""Shared-input statistics are bit-identical to accumulating every layer separately."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.methods import stats
from core.methods.stats import LayerStats, SharedInputs, StatsAccumulator
from core.run import engine
from core.spec import PruneSpec
from tests import tiny_models


def assert_same(a: LayerStats, b: LayerStats) -> None:
    assert a.ntokens == b.ntokens
    for x, y in ((a.xnorm_sq, b.xnorm_sq), (a.hessian, b.hessian)):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shared_partials_equal_separate_accumulation(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    shared = SharedInputs()
    accs = [StatsAccumulator(16, True, True) for _ in range(3)]
    refs = [StatsAccumulator(16, True, True) for _ in range(3)]
    hooks = [shared.hook(a) for a in accs]
    for t in (5, 7, 0, 3):
        x = torch.randn(2, t, 16, generator=g).to(dtype)
        for hook, ref in zip(hooks, refs, strict=True):
            hook(None, (x,), None)
            ref.add(x)
        shared.clear()
    assert shared.computed == 4 and shared.shared == 8
    for a, r in zip(accs, refs, strict=True):
        assert_same(a.result(), r.result())


def test_in_place_change_or_other_tensor_is_not_shared() -> None:
    shared = SharedInputs()
    a, b, c = (StatsAccumulator(4, True, False) for _ in range(3))
    x = torch.ones(3, 4)
    shared.hook(a)(None, (x,), None)
    x.mul_(2)  # same object, new version: must be recomputed
    shared.hook(b)(None, (x,), None)
    shared.hook(c)(None, (x.clone(),), None)
    assert shared.computed == 3 and shared.shared == 0
    assert torch.equal(a.result().xnorm_sq, torch.full((4,), 3.0))
    assert torch.equal(b.result().xnorm_sq, torch.full((4,), 12.0))
    wider = StatsAccumulator(8, True, False)
    with pytest.raises(ValueError, match="does not match"):
        wider.add_partial(a.partial(x))


class _NeverShared(SharedInputs):
    def partial_for(self, x: torch.Tensor, acc: StatsAccumulator) -> stats.InputPartial:
        self.computed += 1
        return acc.partial(x)


@pytest.mark.parametrize(("family", "method"), [("llama", "wanda"), ("opt", "wanda"), ("llama", "sparsegpt")])
def test_engine_shared_path_identical_to_separate(family: str, method: str, monkeypatch) -> None:
    ids = torch.randint(0, tiny_models.VOCAB, (6, 24), generator=torch.Generator().manual_seed(1))
    spec = PruneSpec(method=method, pattern="2:4", batch_size=4)
    dense = tiny_models.build(family)
    a, b = copy.deepcopy(dense), copy.deepcopy(dense)

    made: list[SharedInputs] = []
    real = stats.SharedInputs

    def counting() -> SharedInputs:
        made.append(real())
        return made[-1]

    monkeypatch.setattr(stats, "SharedInputs", counting)
    ra = engine.prune(a, ids, spec)
    assert sum(s.shared for s in made) > 0, "q/k/v (and gate/up) should share their input"
    monkeypatch.setattr(stats, "SharedInputs", _NeverShared)
    rb = engine.prune(b, ids, spec)
    assert ra.layers == rb.layers
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb), na
    assert any(isinstance(m, nn.Linear) and (m.weight == 0).any() for m in a.modules())
