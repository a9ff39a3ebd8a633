"""Streaming pruning gives exactly the in-memory engine's result, from sharded checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from core.errors import Cancelled, InvalidInput
from core.progress import Progress
from core.result import PruneResult
from core.run import engine, streaming
from core.spec import PruneSpec
from tests import tiny_models

NSAMPLES, SEQLEN = 6, 24


def calib() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, tiny_models.VOCAB, (NSAMPLES, SEQLEN), generator=g)


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models saved as sharded safetensors (several shards each) with a tokenizer."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for family in ("llama", "opt", "gpt2", "gpt_neox"):
        d = root / family
        tiny_models.build(family, layers=3).save_pretrained(d, max_shard_size="100KB")
        tiny_models.tokenizer().save_pretrained(d)
        assert (d / "model.safetensors.index.json").is_file()
        out[family] = d
    return out


def in_memory(src: Path, out: Path, spec: PruneSpec) -> PruneResult:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    report = engine.prune(model, calib(), spec)
    model.save_pretrained(out, max_shard_size="100KB")
    return report


@pytest.mark.parametrize(
    ("family", "pattern", "method"),
    [
        ("llama", "unstructured", "wanda"),
        ("llama", "2:4", "wanda"),
        ("opt", "2:4", "wanda"),
        ("gpt2", "2:4", "wanda"),
        ("gpt_neox", "unstructured", "wanda"),
        ("llama", "unstructured", "magnitude"),
    ],
)
def test_streaming_matches_in_memory(
    sources: dict[str, Path], tmp_path: Path, family: str, pattern: str, method: str
) -> None:
    spec = PruneSpec(method=method, pattern=pattern, batch_size=4)
    ref = in_memory(sources[family], tmp_path / "mem", spec)
    events: list[Progress] = []
    rep = streaming.prune_streaming(
        sources[family], tmp_path / "out", calib(), spec, on_progress=events.append
    )

    assert rep.layers == ref.layers
    a, b = tensors(tmp_path / "out" / "model"), tensors(tmp_path / "mem")
    assert set(a) == set(b)
    for name in b:
        assert torch.equal(a[name], b[name]), name

    index = json.loads((tmp_path / "out" / "model" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in a.values())
    assert json.loads((tmp_path / "out" / "report.json").read_text())["layers"] == ref.layers
    assert [e.block for e in events if e.stage == "pruning"] == list(range(1, rep.nblocks + 1))
    assert len(rep.timings["blocks_s"]) == rep.nblocks


def test_streamed_output_reloads_and_spills(sources: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = PruneSpec(method="wanda", pattern="2:4", batch_size=2)
    rep_mem = streaming.prune_streaming(sources["opt"], tmp_path / "a", calib(), spec, spill=False)
    rep = streaming.prune_streaming(
        sources["opt"], tmp_path / "b", calib(), spec, spill=True, spill_dir=tmp_path / "spill"
    )
    assert rep.spilled and not rep_mem.spilled
    assert list((tmp_path / "spill").iterdir()) == []  # spill files removed
    a, b = tensors(tmp_path / "a" / "model"), tensors(tmp_path / "b" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model")
    AutoTokenizer.from_pretrained(tmp_path / "b" / "model")
    fc1 = model.model.decoder.layers[0].fc1.weight
    assert (fc1 == 0).float().mean().item() == pytest.approx(0.5)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    with torch.no_grad():
        logits = model(input_ids=calib()[:1]).logits
    assert torch.isfinite(logits).all()


def test_cancel_leaves_nothing(sources: dict[str, Path], tmp_path: Path) -> None:
    calls = iter([False, False, True])
    with pytest.raises(Cancelled):
        streaming.prune_streaming(
            sources["llama"], tmp_path / "out", calib(), PruneSpec(), should_cancel=lambda: next(calls, True)
        )
    assert list(tmp_path.iterdir()) == []


def test_nm_refused_before_any_work(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="multiple of M=7"):
        streaming.prune_streaming(sources["llama"], tmp_path / "out", calib(), PruneSpec(pattern="3:7"))
    assert not (tmp_path / "out").exists()


def test_should_stream(sources: dict[str, Path], tmp_path: Path) -> None:
    size = streaming.checkpoint_bytes(sources["llama"])
    assert size == sum(p.stat().st_size for p in sources["llama"].glob("*.safetensors"))
    assert streaming.should_stream(sources["llama"], available_memory=size * 2)  # 50% > 40%
    assert not streaming.should_stream(sources["llama"], available_memory=size * 3)  # 33%
    assert not streaming.should_stream(tmp_path, available_memory=1)  # no safetensors
