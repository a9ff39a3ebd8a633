"""OWL's dense first pass runs every block with that block's own arguments.

The scores behind each block's outlier ratio (``|W| ||X||`` of its linears) must be those of a
plain dense forward of the whole model, with hooks on the block's linears. On a model with
sliding-window and full-attention layers and a calibration longer than the window, feeding every
block block 0's arguments (its sliding-window mask) gives other scores: the test checks both.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from core.run import engine, owl_pass
from core.spec import PruneSpec
from tests import oracle, tiny_models

FAMILY, LAYERS, N, SEQLEN, BATCH = "qwen3", 4, 4, 48, 2


@torch.no_grad()
def dense_scores(model: nn.Module, ids: torch.Tensor) -> list[list[torch.Tensor]]:
    """Per block, per linear (module order): ``|W| * sqrt(sum x^2)`` from whole-model forwards."""
    _prefix, blocks = oracle.decoder_blocks(model)
    linears = [[m for _n, m in b.named_modules() if isinstance(m, nn.Linear)] for b in blocks]
    sq = {id(m): torch.zeros(m.in_features, dtype=torch.float64) for ms in linears for m in ms}

    def hook(m: nn.Module, inp: tuple) -> None:
        x = inp[0].reshape(-1, inp[0].shape[-1]).double()
        sq[id(m)] += (x * x).sum(0)

    handles = [m.register_forward_pre_hook(hook) for ms in linears for m in ms]
    try:
        for s in range(0, ids.shape[0], BATCH):
            model(input_ids=ids[s : s + BATCH], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [[m.weight.abs() * sq[id(m)].float().sqrt() for m in ms] for ms in linears]


@pytest.fixture
def recorded(monkeypatch) -> list[list[torch.Tensor]]:
    """The scores each block's outlier ratio is computed from (the real function still runs)."""
    seen: list[list[torch.Tensor]] = []
    real = owl_pass.outlier_ratio

    def spy(scores, m):  # type: ignore[no-untyped-def]
        seen.append([s.clone() for s in scores])
        return real(scores, m)

    monkeypatch.setattr(owl_pass, "outlier_ratio", spy)
    return seen


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a, b, strict=True)
    )


def test_first_pass_scores_are_the_dense_models(recorded: list[list[torch.Tensor]]) -> None:
    model = tiny_models.build(FAMILY, layers=LAYERS)
    assert SEQLEN > tiny_models.WINDOW
    ids = torch.randint(1, tiny_models.VOCAB, (N, SEQLEN), generator=torch.Generator().manual_seed(4))
    want = dense_scores(model, ids)
    res = engine.prune(
        copy.deepcopy(model), ids, PruneSpec(method="wanda", allocation="owl", batch_size=BATCH)
    )
    assert res.owl is not None and len(recorded) == LAYERS
    assert all(_close(got, w) for got, w in zip(recorded, want, strict=True))

    # The broken variant (block 0's arguments for every block) really differs on this model.
    recorded.clear()
    blocks = oracle.decoder_blocks(model)[1]
    cap = engine.capture(model, blocks, ids, BATCH)
    owl_pass.owl_budgets(
        blocks, "model.layers", cap.hidden, [cap.args[0]] * LAYERS, PruneSpec(allocation="owl")
    )
    assert _close(recorded[0], want[0])
    assert not all(_close(got, w) for got, w in zip(recorded[1:], want[1:], strict=True))
