"""Placement of weights and activations, and block onloading (core.model.placement, core.model.weights).

On the CPU every placement is checked bit for bit against the resident run (activations on the
device, in host memory, spilled); the onloading itself (weights on the host, blocks copied to the
GPU) runs in the tests marked ``cuda``, skipped without a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from core.model import families, placement
from core.model.weights import Onload
from core.run import engine
from core.spec import PruneSpec
from tests import tiny_models

GiB = 2**30


def calib(n: int = 6, seqlen: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_models.VOCAB, (n, seqlen), generator=g)


def test_plan_everything_fits_on_the_device() -> None:
    p = placement.plan(
        "cuda",
        weights=16 * GiB,
        block=1 * GiB,
        activations=1 * GiB,
        work=1 * GiB,
        device_budget=80 * GiB,
        host_budget=100 * GiB,
    )
    assert (p.weights, p.activations, p.onload, p.pinned) == ("device", "device", False, False)
    assert p.sizes["device_budget"] == 80 * GiB and len(p.reasons) == 2


def test_plan_onloads_from_host_when_the_device_is_small() -> None:
    p = placement.plan(
        "cuda",
        weights=140 * GiB,
        block=4 * GiB,
        activations=2 * GiB,
        work=2 * GiB,
        device_budget=80 * GiB,
        host_budget=200 * GiB,
    )
    assert (p.weights, p.activations, p.onload, p.pinned) == ("host", "device", True, True)
    p = placement.plan(
        "cuda",
        weights=140 * GiB,
        block=4 * GiB,
        activations=40 * GiB,
        work=2 * GiB,
        device_budget=80 * GiB,
        host_budget=300 * GiB,
    )
    assert (p.weights, p.activations) == ("host", "host")
    p = placement.plan(
        "cuda",
        weights=140 * GiB,
        block=4 * GiB,
        activations=40 * GiB,
        work=2 * GiB,
        device_budget=80 * GiB,
        host_budget=150 * GiB,
        weights_on_disk=True,
    )
    assert (p.weights, p.activations) == ("host", "disk")
    p = placement.plan(
        "cuda",
        weights=140 * GiB,
        block=4 * GiB,
        activations=1 * GiB,
        work=2 * GiB,
        device_budget=80 * GiB,
        host_budget=100 * GiB,
        weights_on_disk=True,
    )
    assert (p.weights, p.activations) == ("disk", "device")


def test_plan_on_the_cpu_has_no_separate_host() -> None:
    p = placement.plan(
        "cpu",
        weights=10 * GiB,
        block=1 * GiB,
        activations=3 * GiB,
        work=1 * GiB,
        device_budget=20 * GiB,
        host_budget=14 * GiB,
    )
    assert (p.weights, p.activations, p.pinned) == ("device", "disk", False)
    assert p.sizes["device_budget"] == p.sizes["host_budget"] == 14 * GiB
    p = placement.plan(
        "cpu",
        weights=30 * GiB,
        block=1 * GiB,
        activations=1 * GiB,
        work=1 * GiB,
        device_budget=20 * GiB,
        host_budget=20 * GiB,
        weights_on_disk=True,
    )
    assert (p.weights, p.activations) == ("disk", "device")


def test_budgets_come_from_the_spec_then_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNE_MAX_DEVICE_MEMORY", "123")
    monkeypatch.setenv("PRUNE_MAX_HOST_MEMORY", "456")
    assert placement.budgets("cpu", None, None) == (123, 456)
    assert placement.budgets("cpu", 7, None) == (7, 456)
    monkeypatch.delenv("PRUNE_MAX_DEVICE_MEMORY")
    dev, host = placement.budgets("cpu", None, 9)
    assert host == 9 and dev > 0


def test_cuda_batch_is_halved_until_its_working_set_fits() -> None:
    """On CUDA the default batch (16384 tokens) shrinks to what the device budget holds beside the
    weights and activations; arithmetic only, so it runs without a GPU."""
    model = tiny_models.build("llama")
    blocks = families.get_blocks(model)
    shape, cuda = (64, 2048), torch.device("cuda")
    want = PruneSpec(method="wanda").batch_for(shape[1], "cuda")
    assert want == 8

    def run(device_budget: int, fit: bool = True, batch: int = want) -> placement.Placement:
        limits = (device_budget, 1000 * GiB)
        return placement.plan_run(model, blocks, shape, batch, cuda, "device", False, limits, fit=fit)

    assert run(1000 * GiB).batch_size == 8  # everything fits: the wish stands
    use4 = run(1000 * GiB, fit=False, batch=4).sizes["device_use"]
    assert run(1000 * GiB, fit=False, batch=8).sizes["device_use"] > use4
    four = run(use4)  # 8 would push the activations to the host; 4 keeps them on the device
    assert (four.batch_size, four.activations) == (4, "device")
    assert four.sizes["device_use"] <= four.sizes["device_budget"]
    assert "calibration batch 4 (asked 8)" in four.reasons[-1]
    tiny = run(1)  # nothing fits: one sample per forward
    assert tiny.batch_size == 1 and tiny.activations == "host"
    assert run(1, fit=False).batch_size == 8  # a batch_size the spec sets is kept as given


def _prune(model: torch.nn.Module, spec: PruneSpec, **kw: object) -> engine.PruneResult:
    return engine.run_blocks(model, calib(), spec, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "spec", [PruneSpec(method="wanda", sparsity=0.5), PruneSpec(method="sparsegpt", sparsity=0.5)]
)
def test_activations_spilled_by_a_tiny_budget_prune_bit_identically(spec: PruneSpec) -> None:
    ref = tiny_models.build("llama")
    res_ref = _prune(ref, spec)
    assert res_ref.placement is not None and res_ref.placement["activations"] == "device"
    model = tiny_models.build("llama")
    res = _prune(model, spec, max_device_memory=1, max_host_memory=1)
    assert res.placement is not None
    assert (res.placement["weights"], res.placement["activations"]) == ("device", "disk")
    assert any("spilled" in r for r in res.placement["reasons"])
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    assert res.layers == res_ref.layers


def test_hidden_store_host_and_spill_hand_back_the_same_tensors(tmp_path) -> None:
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    for store in (
        engine.HiddenStore(None, xs),
        engine.HiddenStore(None, xs, device=torch.device("cpu"), host=True),
        engine.HiddenStore(tmp_path, xs, device=torch.device("cpu")),
    ):
        assert len(store) == 3 and all(torch.equal(a, b) for a, b in zip(store, xs, strict=True))
        store.replace(1, xs[0] * 2)
        assert torch.equal(store[1], xs[0] * 2)
    assert engine.HiddenStore(tmp_path, xs).nbytes() == 0


def test_onload_source_restores_host_tensors_on_the_cpu() -> None:
    """An Onload source on the CPU moves nothing and prunes as the resident run (the GPU case is
    test_onloaded_run_on_cuda_equals_resident below)."""
    spec = PruneSpec(method="wanda", pattern="2:4")
    ref, model = tiny_models.build("qwen3"), tiny_models.build("qwen3")
    _prune(ref, spec)
    blocks = families.get_blocks(model)
    res = _prune(model, spec, source=Onload(model, blocks, "cpu"))
    assert res.placement is not None and res.placement["weights"] == "host"
    for a, b in zip(ref.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe", "gpt2"])
@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "wanda-owl"])
def test_onloaded_run_on_cuda_equals_resident(family: str, method: str) -> None:
    """Weights on the host, each block copied to the GPU: the same masks and weights as the whole
    model on the GPU; the host model's tensors stay on the host."""
    owl = method == "wanda-owl"
    spec = PruneSpec(method="wanda" if owl else method, sparsity=0.5, allocation="owl" if owl else "uniform")
    resident = tiny_models.build(family).to("cuda")
    engine.run_blocks(resident, calib(), spec)
    host = tiny_models.build(family)
    res = engine.run_blocks(host, calib(), spec, device="cuda", max_device_memory=1)
    assert res.placement is not None and res.placement["weights"] == "host"
    assert res.placement["activations"] == "host"
    assert all(p.device.type == "cpu" for p in host.parameters())
    for (n, a), b in zip(resident.state_dict().items(), host.state_dict().values(), strict=True):
        assert torch.equal(a.cpu(), b), n


@pytest.mark.cuda
@cuda
def test_bf16_weights_statistics_in_float32_on_cuda() -> None:
    spec = PruneSpec(method="wanda", pattern="2:4")
    model = copy.deepcopy(tiny_models.build("llama")).to(torch.bfloat16)
    res = engine.run_blocks(model, calib(), spec, device="cuda")
    assert res.placement is not None and res.placement["weights"] == "host"
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert min(res.layers.values()) == 0.5
