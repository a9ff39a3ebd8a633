"""Streaming pruning equals in-memory pruning, bit for bit, for every family of the matrix.

Each tiny model is saved as sharded safetensors (shards of 60 kB, so blocks straddle files),
then pruned in memory (loaded whole, :func:`core.run.engine.prune`, ``save_pretrained``) and by
streaming (:func:`core.run.streaming.prune_streaming`); every tensor of the two outputs must be
``torch.equal``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.run import engine, streaming
from core.spec import PruneSpec
from tests import tiny_models
from tests.core.test_arch_matrix import BATCH, KNOWN_FAILING, calib, single_thread  # noqa: F401

SHARD = "60KB"


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def load(family: str, src: Path):
    import transformers

    auto = getattr(transformers, tiny_models.matrix()[family].auto)
    return auto.from_pretrained(src, dtype=torch.float32).eval()


@pytest.mark.parametrize("family", tiny_models.MATRIX)
def test_streaming_equals_in_memory(family: str, tmp_path: Path) -> None:
    src = tiny_models.save(family, tmp_path / "src", max_shard_size=SHARD)
    assert len(list(src.glob("*.safetensors"))) > 1, "the checkpoint should be sharded"
    pattern = "2:4" if tiny_models.MATRIX.index(family) % 2 else "unstructured"
    spec = PruneSpec(method="wanda", pattern=pattern, batch_size=BATCH)
    ids = calib()

    model = load(family, src)
    engine.prune(model, ids, spec)
    model.save_pretrained(tmp_path / "mem", max_shard_size=SHARD)
    streaming.prune_streaming(src, tmp_path / "out", ids, spec)

    mem, out = tensors(tmp_path / "mem"), tensors(tmp_path / "out" / "model")
    assert set(out) == set(mem)
    differ = [n for n in mem if not torch.equal(out[n], mem[n])]
    assert not differ, differ
    dense = tensors(src)
    assert any(not torch.equal(mem[n], dense[n]) for n in mem if n in dense), "nothing was pruned"
