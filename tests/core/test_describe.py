"""``python -m core inspect``: what would be pruned, from the config alone, matching what prune does."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import cli
from core.model.describe import describe_model
from core.run import engine
from core.spec import ModelSpec, PruneSpec
from tests import tiny_models
from tests.tiny_models import REPO


def _zeros_in_blocks(model: torch.nn.Module, prefix: str) -> int:
    return sum(int((p == 0).sum()) for n, p in model.named_parameters() if n.startswith(prefix + "."))


@pytest.mark.parametrize("family", ["qwen2_moe", "llama"])
def test_counts_match_what_pruning_zeroes(family: str, tiny_model_dir) -> None:
    """Wanda 50% prunes exactly half of every row of every layer inspect calls pruned (even widths),
    and nothing else: the zeros after pruning equal half of ``params_pruned_layers``."""
    src = tiny_model_dir(family)
    desc = describe_model(ModelSpec(source=str(src)))
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    before = _zeros_in_blocks(model, desc["blocks_path"])
    engine.prune(model, torch.randint(0, tiny_models.VOCAB, (2, 32)), PruneSpec(method="wanda"))
    assert _zeros_in_blocks(model, desc["blocks_path"]) - before == desc["params_pruned_layers"] // 2
    assert desc["nblocks"] == len(model.get_submodule(desc["blocks_path"]))
    assert desc["params_total"] == sum(p.numel() for p in model.parameters())


def test_moe_text_lists_experts_and_dense_routers(tiny_model_dir, capsys) -> None:
    assert cli.main(["inspect", "--model", str(tiny_model_dir("qwen2_moe"))]) == 0
    out = capsys.readouterr().out
    assert "decoder blocks: 2 x Qwen2MoeDecoderLayer at model.layers" in out
    assert f"experts per MoE layer: {tiny_models.EXPERTS}" in out
    assert re.search(
        rf"mlp\.experts\.\*\.gate_up_proj +{tiny_models.EXPERTS} experts x \[64 x 64\] +pruned", out
    )
    assert "mlp.gate  " in out and "dense (router)" in out

    assert cli.main(["inspect", "--model", str(tiny_model_dir("qwen2_moe")), "--prune-routers"]) == 0
    assert "dense (router)" not in capsys.readouterr().out


def test_multimodal_leaves_vision_tower_dense(tiny_model_dir) -> None:
    desc = describe_model(ModelSpec(source=str(tiny_model_dir("gemma3"))))
    assert desc["blocks_path"] == "model.language_model.layers"
    assert "model.vision_tower" in desc["left_dense_modules"]
    assert all(".vision_tower." not in la["name"] for b in desc["blocks"] for la in b["layers"])


def test_ignore_moves_layers_to_dense(tiny_model_dir) -> None:
    src = str(tiny_model_dir("llama"))
    full = describe_model(ModelSpec(source=src))
    some = describe_model(ModelSpec(source=src), ignore=["*.mlp.down_proj"])
    down = 2 * tiny_models.HIDDEN * 2 * tiny_models.HIDDEN  # two blocks of [64, 128]
    assert full["params_pruned_layers"] - some["params_pruned_layers"] == down
    assert some["params_dense_in_blocks"] == down


def test_real_smollm2_gguf_reads_no_weights(smollm2_gguf: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "core", "inspect", "--model", str(smollm2_gguf)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "decoder blocks: 30 x LlamaDecoderLayer at model.layers" in res.stdout
    per_block = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576  # q, o; k, v; gate, up, down
    assert f"{30 * per_block:,} in layers to prune" in res.stdout
    assert "blocks 0-29: 7 weight matrices" in res.stdout


def test_bad_models_exit_2(tmp_path: Path, capsys) -> None:
    import transformers as tf

    assert cli.main(["inspect", "--model", str(tmp_path / "nope")]) == 2
    assert "model path not found" in capsys.readouterr().err
    bert = tmp_path / "bert"
    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64).save_pretrained(
        bert
    )
    tf.BertModel(tf.BertConfig.from_pretrained(bert)).save_pretrained(bert)
    assert cli.main(["inspect", "--model", str(bert)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "'bert'" in err[-1] and not any("Traceback" in x for x in err)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert cli.main(["inspect", "--model", str(bad)]) == 2
    assert "bad.gguf" in capsys.readouterr().err
