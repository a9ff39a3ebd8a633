"""Block-by-block perplexity (core.evaluation.block_eval) equals the whole-model forward, on every family."""

from __future__ import annotations

import pytest
import torch

from core.evaluation import block_eval, evaluate
from core.run import engine
from core.spec import PruneSpec
from tests import tiny_models

SEQLEN, BATCH = 32, 3


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def stream(n: int = 400, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, tiny_models.VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(a)


@pytest.mark.parametrize("family", tiny_models.MATRIX)
def test_equals_whole_model_forward(family: str) -> None:
    """Dense and Wanda-2:4-pruned (so the blocks differ from random init), 12 windows in batches of 3
    (the last one partial)."""
    model = tiny_models.build(family)
    ids = stream()
    for _ in range(2):
        whole = evaluate.perplexity(model, ids, SEQLEN, None, BATCH)
        blocks = block_eval.perplexity(model, ids, SEQLEN, None, BATCH)
        assert rel(whole["nll"], blocks["nll"]) <= 1e-5 and rel(whole["ppl"], blocks["ppl"]) <= 1e-5
        assert {k: v for k, v in blocks.items() if k != "placement"} == {
            **whole,
            "nll": blocks["nll"],
            "ppl": blocks["ppl"],
        }
        cal = torch.randint(0, tiny_models.VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
        engine.prune(model, cal, PruneSpec(method="wanda", pattern="2:4"))


def test_spilled_hidden_states_and_one_block_models_and_progress() -> None:
    model = tiny_models.build("qwen3", layers=1)
    ids = stream()
    whole = evaluate.perplexity(model, ids, SEQLEN, 5, 2)
    steps: list[tuple[int, int]] = []
    res = block_eval.perplexity(model, ids, SEQLEN, 5, 2, lambda d, t: steps.append((d, t)),
                                max_device_memory=1, max_host_memory=1)  # fmt: skip
    assert res["placement"]["activations"] == "disk"
    assert res["windows"] == 5 and rel(whole["nll"], res["nll"]) <= 1e-5
    assert steps == [(0, 2), (1, 2), (2, 2)]


def test_cancel_between_blocks() -> None:
    from core.errors import Cancelled

    calls = []

    def cancel() -> bool:
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(Cancelled):
        block_eval.perplexity(tiny_models.build("llama"), stream(), SEQLEN, None, 4, should_cancel=cancel)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe"])
def test_onloaded_on_cuda_equals_resident_on_cuda(family: str) -> None:
    ids = stream()
    resident = tiny_models.build(family).to("cuda")
    a = evaluate.perplexity(resident, ids, SEQLEN, None, BATCH)
    host = tiny_models.build(family)
    b = block_eval.perplexity(host, ids, SEQLEN, None, BATCH, device="cuda", max_device_memory=1)
    assert b["placement"]["weights"] == "host" and rel(a["nll"], b["nll"]) <= 1e-5
    assert all(p.device.type == "cpu" for p in host.parameters())
