"""The report's reconstruction error: the input sample it is measured on, and its value."""

from __future__ import annotations

import copy

import torch

from core.methods.recon import sample_error
from core.methods.stats import StatsAccumulator
from core.model import families
from core.run import engine
from core.spec import PruneSpec
from tests.tiny_models import build


def explicit_error(dense: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    """``||W X - W' X|| / ||W X||`` over the rows of ``x`` ``[k, in]``, in fp64."""
    d, p, x = dense.double(), pruned.double(), x.double()
    return float(torch.linalg.norm(x @ (d - p).T) / torch.linalg.norm(x @ d.T))


def test_sample_error_equals_the_explicit_output_error() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)
    pruned = w.masked_fill(torch.rand(24, 40, generator=g) < 0.5, 0)
    x = torch.randn(64, 40, generator=g)
    assert abs(sample_error(w, pruned, x) - explicit_error(w, pruned, x)) < 1e-6
    assert sample_error(w, w, x) == 0.0
    assert sample_error(torch.zeros(3, 40), torch.zeros(3, 40), x) == 0.0


def test_sample_is_every_kth_token_across_uneven_batches() -> None:
    """Global token t is kept iff t = every // 2 (mod every), until ``sample_tokens`` are kept."""
    tokens = torch.arange(100, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # row t holds t
    acc = StatsAccumulator(4, True, False, sample_tokens=9, sample_every=10)
    for chunk in tokens.split([7, 30, 1, 2, 45, 15]):
        acc.add(chunk)
    st = acc.result()
    assert st.sample is not None
    assert st.sample[:, 0].tolist() == [5.0 + 10 * i for i in range(9)]
    assert st.ntokens == 100


def test_engine_records_the_error_on_the_spread_sample_of_the_models_own_inputs() -> None:
    """Block 0's q_proj: the record equals the error computed from the dense model's own forward."""
    model = build("llama", seed=3)
    cal = torch.randint(0, 200, (4, 32), generator=torch.Generator().manual_seed(1))
    dense = copy.deepcopy(model)
    name, q = next((n, m) for n, m in families.prunable_linears(dense).items() if "0.self_attn.q_proj" in n)
    seen: list[torch.Tensor] = []
    h = q.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().flatten(0, -2)))
    with torch.no_grad():
        dense(input_ids=cal)
    h.remove()
    x = torch.cat(seen)  # [128, in], token order = calibration order
    spec = PruneSpec(method="wanda", pattern="2:4", recon_tokens=16)
    res = engine.prune(model, cal, spec)
    rec = res.layer_records[name]
    assert rec["recon_tokens"] == 16
    every = 128 // 16
    pruned = families.get_weight(families.prunable_linears(model)[name])
    expected = explicit_error(q.weight.detach(), pruned, x[every // 2 :: every][:16])
    assert abs(rec["recon_error"] - expected) < 1e-5
