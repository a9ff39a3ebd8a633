"""compressed-tensors int8 checkpoints load with plain from_pretrained, zeros where the pruned model's are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.artifacts.formats import compact, int8
from tests.core.formats.conftest import DENSE_LAYER


@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_int8_loads_with_from_pretrained_and_keeps_zeros(pruned_dir, tmp_path: Path, pattern: str) -> None:
    from transformers import AutoModelForCausalLM

    dense = pruned_dir(pattern)
    ref = AutoModelForCausalLM.from_pretrained(dense).eval()
    layers = [n for n, m in ref.named_modules() if n.endswith("proj") and n != DENSE_LAYER]
    quantized = int8.write_int8(dense, tmp_path / "int8", layers)
    assert sorted(quantized) == sorted(layers)
    qc = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert sorted(qc["ignore"]) == sorted(["lm_head", DENSE_LAYER])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()  # no code of ours involved
    ids = torch.randint(0, 500, (2, 16))
    with torch.no_grad():
        out, want = model(ids).logits, ref(ids).logits
    assert (out - want).abs().max() < 0.05 * want.abs().max()
    got = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        if name.removesuffix(".weight") in layers:
            assert torch.equal(got[name] == 0, p == 0), name  # zeros exactly where the pruned model's are
            assert not torch.equal(got[name], p), name  # and it is quantized
        elif name in got:
            assert torch.equal(got[name], p), name


def test_int8_and_compact_int8_dequantize_alike(pruned_dir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    dense = pruned_dir("2:4")
    layers = [f"model.layers.{i}.mlp.up_proj" for i in range(2)]
    int8.write_int8(dense, tmp_path / "int8", layers)
    compact.pack(dense, tmp_path / "ci", quantize={f"{n}.weight" for n in layers})
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "int8").eval()
    b = compact.load_model(tmp_path / "ci")
    with torch.no_grad():
        a(torch.zeros(1, 2, dtype=torch.long))  # compressed-tensors decompresses on the first forward
    for n in layers:
        wa, wb = a.get_submodule(n).weight, b.get_submodule(n).weight
        assert torch.allclose(wa, wb, rtol=1e-6, atol=1e-8) and torch.equal(wa == 0, wb == 0)


def test_int8_keeps_the_checkpoint_dtype(pruned_dir, tmp_path: Path) -> None:
    from safetensors import safe_open

    dense = pruned_dir("2:4", torch.bfloat16)
    int8.write_int8(dense, tmp_path / "int8", ["model.layers.1.mlp.down_proj"])
    with safe_open(str(tmp_path / "int8" / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.1.mlp.down_proj.weight_packed").dtype == torch.int32
        assert fh.get_tensor("model.layers.1.mlp.down_proj.weight_scale").dtype == torch.bfloat16
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert "model.layers.1.mlp.down_proj.weight" not in fh.keys()
