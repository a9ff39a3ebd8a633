"""Block checkpoints: an interrupted prune continued from its resume directory equals a clean run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import Cancelled
from core.run import engine, streaming
from core.spec import PruneSpec
from tests import tiny_models

NSAMPLES, SEQLEN = 6, 24


def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_models.VOCAB, (NSAMPLES, SEQLEN), generator=g)


def cancel_at_block(k: int):
    """should_cancel that turns True when block ``k`` (0-based) is about to start."""
    calls = iter(range(10_000))
    return lambda: next(calls) == k + 1  # call 0: before the loop; call i + 1: before block i


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


@pytest.mark.parametrize(
    ("method", "pattern", "k"),
    [("wanda", "unstructured", 2), ("sparsegpt", "2:4", 1), ("magnitude", "2:4", 2), ("wanda", "2:4", 0)],
)
def test_resumed_run_is_bit_identical(method: str, pattern: str, k: int, tmp_path: Path) -> None:
    spec = PruneSpec(method=method, pattern=pattern, batch_size=2)
    clean = tiny_models.build("llama", layers=4)
    ref = engine.prune(clean, calib(), spec)

    first = tiny_models.build("llama", layers=4)
    with pytest.raises(Cancelled):
        engine.prune(first, calib(), spec, should_cancel=cancel_at_block(k), resume_dir=tmp_path / "r")
    state_file = tmp_path / "r" / "state.json"
    assert (json.loads(state_file.read_text())["done"] if state_file.exists() else 0) == k

    again = tiny_models.build("llama", layers=4)  # a fresh dense model, as after a worker restart
    res = engine.prune(again, calib(), spec, resume_dir=tmp_path / "r")
    assert res.resumed_from_block == (k or None)
    assert res.layers == ref.layers
    assert_same(again, clean)


def test_stale_resume_dir_is_ignored(tmp_path: Path) -> None:
    spec = PruneSpec(method="wanda", batch_size=2)
    first = tiny_models.build("llama", layers=3)
    with pytest.raises(Cancelled):
        engine.prune(first, calib(), spec, should_cancel=cancel_at_block(2), resume_dir=tmp_path / "r")
    other = PruneSpec(method="wanda", pattern="2:4", batch_size=2)  # another job's spec
    model = tiny_models.build("llama", layers=3)
    res = engine.prune(model, calib(), other, resume_dir=tmp_path / "r")
    assert res.resumed_from_block is None
    clean = tiny_models.build("llama", layers=3)
    engine.prune(clean, calib(), other)
    assert_same(model, clean)
    # a different calibration is another job too
    assert json.loads((tmp_path / "r" / "state.json").read_text())["done"] == 3
    m2 = tiny_models.build("llama", layers=3)
    res2 = engine.prune(m2, calib()[:4], other, resume_dir=tmp_path / "r")
    assert res2.resumed_from_block is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_streaming_resume_is_bit_identical(family: str, tmp_path: Path) -> None:
    """Weights on disk: the block checkpoints are links to the output shards (no second copy of the
    weights), and the resumed run's output equals a clean run's, tensor for tensor."""
    from safetensors.torch import load_file

    src = tiny_models.save(family, tmp_path / "src", layers=4)
    spec = PruneSpec(method="wanda", pattern="2:4", batch_size=2)
    streaming.prune_streaming(src, tmp_path / "clean", calib(), spec)
    with pytest.raises(Cancelled):
        streaming.prune_streaming(
            src, tmp_path / "cut", calib(), spec, should_cancel=cancel_at_block(2), resume_dir=tmp_path / "r"
        )
    assert not (tmp_path / "cut").exists()
    done = json.loads((tmp_path / "r" / "state.json").read_text())["done"]
    kept = sorted(p.name for p in (tmp_path / "r").glob("block-*"))
    assert done >= 1 and kept == [f"block-{i:05d}.safetensors" for i in range(done)]  # shards, no copies
    res = streaming.prune_streaming(src, tmp_path / "cut", calib(), spec, resume_dir=tmp_path / "r")
    assert res.resumed_from_block is not None and res.resumed_from_block >= 1

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted((d / "model").glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(tmp_path / "clean"), tensors(tmp_path / "cut")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
