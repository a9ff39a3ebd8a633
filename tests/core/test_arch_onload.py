"""A run forced off the device equals the resident run, for every family of the matrix.

For each tiny model and each of Wanda 50%, Wanda 2:4 and SparseGPT 50%:

* **resident**: the model loaded whole, :func:`core.run.engine.prune` with everything in memory;
* **forced**: weights read block by block from sharded safetensors (:func:`core.run.streaming.
  prune_streaming`) and calibration activations spilled to disk (``spill=True``) — on the CPU the
  furthest a run can be pushed from its compute device.

Every output tensor must be ``torch.equal``, and the perplexity of the forced output computed block
by block from disk (:mod:`core.evaluation.block_eval` over
:class:`core.run.streaming.CheckpointSource`) must equal
the whole-model forward of the resident model (relative 1e-5). The GPU counterpart (weights in host
memory, each block onloaded to CUDA) is ``tests/core/test_placement.py::test_onloaded_run_on_cuda_*``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.evaluation import block_eval, evaluate
from core.run import engine, streaming
from core.spec import PruneSpec
from tests import tiny_models
from tests.core.test_arch_matrix import BATCH, calib, single_thread  # noqa: F401
from tests.core.test_arch_streaming import SHARD, load, tensors

SPECS = {
    "wanda-50": PruneSpec(method="wanda", sparsity=0.5, batch_size=BATCH),
    "wanda-2:4": PruneSpec(method="wanda", pattern="2:4", batch_size=BATCH),
    "sparsegpt-50": PruneSpec(method="sparsegpt", sparsity=0.5, batch_size=BATCH),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("family", tiny_models.MATRIX)
def test_forced_off_device_equals_resident(family: str, name: str, tmp_path: Path) -> None:
    spec = SPECS[name]
    src = tiny_models.save(family, tmp_path / "src", max_shard_size=SHARD)
    ids = calib()
    model = load(family, src)
    engine.prune(model, ids, spec)
    model.save_pretrained(tmp_path / "mem", max_shard_size=SHARD)
    res = streaming.prune_streaming(src, tmp_path / "out", ids, spec, spill=True)
    assert res.spilled and res.placement is not None and res.placement["activations"] == "disk"
    assert res.placement["weights"] == "disk"

    mem, out = tensors(tmp_path / "mem"), tensors(tmp_path / "out" / "model")
    assert set(out) == set(mem)
    assert not [n for n in mem if not torch.equal(out[n], mem[n])]

    text = torch.randint(0, tiny_models.VOCAB, (200,), generator=torch.Generator().manual_seed(3))
    whole = evaluate.perplexity(model, text, 48, None, 2)
    _cfg, skel = streaming.skeleton(tmp_path / "out" / "model", torch.float32)
    source = streaming.CheckpointSource(skel, tmp_path / "out" / "model", torch.float32)
    blocks = block_eval.perplexity(skel, text, 48, None, 2, device="cpu", source=source)
    assert abs(blocks["nll"] - whole["nll"]) <= 1e-5 * abs(whole["nll"])
