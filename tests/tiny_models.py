"""Tiny random models of every decoder-only family in the architecture matrix, built from configs.

Shared by the engine, worker and end-to-end tests (no hub access). Every model has 2 decoder
blocks (3 where noted), hidden size 64, 4 attention heads of 16, MLP width 128 and a 512-token
vocabulary, so that every prunable input dimension is a multiple of 4 (2:4 patterns apply).
Mixed-attention families get a sliding window of :data:`WINDOW` tokens, shorter than the
calibration used by the matrix tests, and alternating ``layer_types``, so that their blocks
really receive different attention masks (and, for Gemma 3, different rotary embeddings).
Mixture-of-experts families get :data:`EXPERTS` experts (top-2) of width 32.

A small byte-level BPE tokenizer is trained on a slice of WikiText-2 so that exported
directories are complete. ``python -m tests.tiny_models --markdown`` prints the supported
families table of docs/core.md from :data:`MATRIX`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
WIKITEXT = DATA_DIR / "wikitext-2"

FAMILIES = ("llama", "opt", "gpt_neox", "bloom", "gpt2")
"""The original five families (used by the older engine/streaming tests)."""
VOCAB = 512
HIDDEN = 64
WINDOW = 16
"""Sliding window of the mixed-attention families (calibration in the matrix is longer)."""
EXPERTS = 4


@dataclass(frozen=True)
class Tiny:
    """One entry of the architecture matrix."""

    name: str
    """``config.model_type`` (for a multimodal wrapper: the wrapper's)."""
    make: Callable[[int, int], Any]
    """``make(layers, hidden) -> config``."""
    kind: str = "dense"
    """``dense``, ``moe`` (fused 3-D expert parameters) or ``multimodal`` (vision tower + text decoder)."""
    mixed: bool = False
    """Blocks receive different attention masks (sliding-window and full layers)."""
    layers: int = 2
    auto: str = "AutoModelForCausalLM"
    """The transformers auto class that builds (and loads) it."""
    note: str = ""


def _common() -> dict[str, Any]:
    return dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _attn(hidden: int) -> dict[str, Any]:
    return dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def _mixed(layers: int) -> list[str]:
    """Alternating layer types, sliding first (so block 1 differs from block 0)."""
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]


def _moe(hidden: int) -> dict[str, Any]:
    return dict(num_experts_per_tok=2, moe_intermediate_size=hidden // 2)


def _configs() -> dict[str, Tiny]:
    import transformers as tf

    def llama(n: int, h: int) -> Any:
        return tf.LlamaConfig(**_attn(h), num_hidden_layers=n, **_common())

    def mistral(n: int, h: int) -> Any:
        return tf.MistralConfig(**_attn(h), num_hidden_layers=n, sliding_window=WINDOW, **_common())

    def mixtral(n: int, h: int) -> Any:
        kw = _attn(h) | dict(intermediate_size=h // 2)
        return tf.MixtralConfig(
            **kw, num_hidden_layers=n, num_local_experts=EXPERTS, num_experts_per_tok=2, **_common()
        )

    def qwen2(n: int, h: int) -> Any:
        return tf.Qwen2Config(**_attn(h), num_hidden_layers=n, **_common())

    def qwen2_moe(n: int, h: int) -> Any:
        return tf.Qwen2MoeConfig(
            **_attn(h),
            num_hidden_layers=n,
            num_experts=EXPERTS,
            **_moe(h),
            shared_expert_intermediate_size=h,
            **_common(),
        )

    def qwen3(n: int, h: int) -> Any:
        return tf.Qwen3Config(
            **_attn(h),
            head_dim=h // 4,
            num_hidden_layers=n,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=n,
            layer_types=_mixed(n),
            **_common(),
        )

    def qwen3_moe(n: int, h: int) -> Any:
        return tf.Qwen3MoeConfig(
            **_attn(h), head_dim=h // 4, num_hidden_layers=n, num_experts=EXPERTS, **_moe(h), **_common()
        )

    def gemma(n: int, h: int) -> Any:
        return tf.GemmaConfig(**_attn(h), head_dim=h // 4, num_hidden_layers=n, **_common())

    def gemma2(n: int, h: int) -> Any:
        return tf.Gemma2Config(
            **_attn(h),
            head_dim=h // 4,
            query_pre_attn_scalar=h // 4,
            num_hidden_layers=n,
            sliding_window=WINDOW,
            layer_types=_mixed(n),
            **_common(),
        )

    def gemma3_text(n: int, h: int) -> Any:
        return tf.Gemma3TextConfig(
            **_attn(h),
            head_dim=h // 4,
            query_pre_attn_scalar=h // 4,
            num_hidden_layers=n,
            sliding_window=WINDOW,
            layer_types=_mixed(n),
            **_common(),
        )

    def phi(n: int, h: int) -> Any:
        return tf.PhiConfig(**_attn(h), num_hidden_layers=n, **_common())

    def phi3(n: int, h: int) -> Any:
        return tf.Phi3Config(**_attn(h), num_hidden_layers=n, **_common())

    def falcon(n: int, h: int) -> Any:
        return tf.FalconConfig(
            hidden_size=h,
            num_hidden_layers=n,
            num_attention_heads=4,
            ffn_hidden_size=h * 2,
            max_position_embeddings=256,
            **_common(),
        )

    def gpt_neox(n: int, h: int) -> Any:
        kw = _attn(h)
        kw.pop("num_key_value_heads")
        return tf.GPTNeoXConfig(**kw, num_hidden_layers=n, **_common())

    def gptj(n: int, h: int) -> Any:
        return tf.GPTJConfig(
            n_embd=h, n_layer=n, n_head=4, rotary_dim=8, n_inner=h * 2, n_positions=256, **_common()
        )

    def gpt_bigcode(n: int, h: int) -> Any:
        return tf.GPTBigCodeConfig(n_embd=h, n_layer=n, n_head=4, n_inner=h * 2, n_positions=256, **_common())

    def gpt2(n: int, h: int) -> Any:
        return tf.GPT2Config(n_embd=h, n_layer=n, n_head=4, n_positions=256, **_common())

    def opt(n: int, h: int) -> Any:
        return tf.OPTConfig(
            hidden_size=h,
            ffn_dim=h * 2,
            num_hidden_layers=n,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=h,
            **_common(),
        )

    def bloom(n: int, h: int) -> Any:
        return tf.BloomConfig(hidden_size=h, n_layer=n, n_head=4, **_common())

    def olmo(n: int, h: int) -> Any:
        return tf.OlmoConfig(**_attn(h), num_hidden_layers=n, **_common())

    def olmo2(n: int, h: int) -> Any:
        return tf.Olmo2Config(**_attn(h), num_hidden_layers=n, **_common())

    def olmoe(n: int, h: int) -> Any:
        kw = _attn(h) | dict(intermediate_size=h // 2)
        return tf.OlmoeConfig(
            **kw, num_hidden_layers=n, num_experts=EXPERTS, num_experts_per_tok=2, **_common()
        )

    def granite(n: int, h: int) -> Any:
        return tf.GraniteConfig(**_attn(h), num_hidden_layers=n, **_common())

    def granitemoe(n: int, h: int) -> Any:
        kw = _attn(h) | dict(intermediate_size=h // 2)
        return tf.GraniteMoeConfig(
            **kw, num_hidden_layers=n, num_local_experts=EXPERTS, num_experts_per_tok=2, **_common()
        )

    def stablelm(n: int, h: int) -> Any:
        return tf.StableLmConfig(**_attn(h), num_hidden_layers=n, **_common())

    def starcoder2(n: int, h: int) -> Any:
        return tf.Starcoder2Config(**_attn(h), num_hidden_layers=n, sliding_window=WINDOW, **_common())

    def cohere(n: int, h: int) -> Any:
        return tf.CohereConfig(**_attn(h), num_hidden_layers=n, **_common())

    def cohere2(n: int, h: int) -> Any:
        return tf.Cohere2Config(
            **_attn(h), num_hidden_layers=n, sliding_window=WINDOW, layer_types=_mixed(n), **_common()
        )

    def smollm3(n: int, h: int) -> Any:
        return tf.SmolLM3Config(
            **_attn(h),
            num_hidden_layers=n,
            no_rope_layers=[1 if i % 2 == 0 else 0 for i in range(n)],
            **_common(),
        )

    def gpt_oss(n: int, h: int) -> Any:
        kw = _attn(h) | dict(intermediate_size=h // 2)
        return tf.GptOssConfig(
            **kw,
            head_dim=h // 4,
            num_hidden_layers=n,
            num_local_experts=EXPERTS,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
            layer_types=_mixed(n),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **_common(),
        )

    # Multimodal wrappers: image special tokens above the tokenizer's vocabulary, never in text.
    mm_vocab = dict(vocab_size=VOCAB + 8)

    def gemma3(n: int, h: int) -> Any:
        text = gemma3_text(n, h).to_dict() | mm_vocab
        vision = dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        )
        return tf.Gemma3Config(
            text_config=text,
            vision_config=vision,
            mm_tokens_per_image=4,
            boi_token_index=VOCAB,
            eoi_token_index=VOCAB + 1,
            image_token_index=VOCAB + 2,
        )

    def llava(n: int, h: int) -> Any:
        vision = dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
            projection_dim=32,
        )
        text = llama(n, h).to_dict() | mm_vocab
        return tf.LlavaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB + 2)

    entries = [
        Tiny("llama", llama),
        Tiny("mistral", mistral, note=f"sliding window {WINDOW} on every layer"),
        Tiny("mixtral", mixtral, kind="moe"),
        Tiny("qwen2", qwen2),
        Tiny("qwen2_moe", qwen2_moe, kind="moe", note="shared expert pruned, its gate dense"),
        Tiny("qwen3", qwen3, mixed=True),
        Tiny("qwen3_moe", qwen3_moe, kind="moe"),
        Tiny("gemma", gemma),
        Tiny("gemma2", gemma2, mixed=True),
        Tiny("gemma3_text", gemma3_text, mixed=True, note="local and global rotary embeddings differ"),
        Tiny("phi", phi),
        Tiny("phi3", phi3, note="fused qkv_proj and gate_up_proj linears"),
        Tiny("falcon", falcon, note="multi-query, parallel attention"),
        Tiny("gpt_neox", gpt_neox),
        Tiny("gptj", gptj),
        Tiny("gpt_bigcode", gpt_bigcode),
        Tiny("gpt2", gpt2, note="Conv1D layers (weights stored transposed)"),
        Tiny("opt", opt),
        Tiny("bloom", bloom, note="ALiBi"),
        Tiny("olmo", olmo),
        Tiny("olmo2", olmo2),
        Tiny("olmoe", olmoe, kind="moe"),
        Tiny("granite", granite),
        Tiny("granitemoe", granitemoe, kind="moe"),
        Tiny("stablelm", stablelm),
        Tiny("starcoder2", starcoder2, note=f"sliding window {WINDOW} on every layer"),
        Tiny("cohere", cohere),
        Tiny("cohere2", cohere2, mixed=True, note="rotary on sliding layers only"),
        Tiny("smollm3", smollm3, note="no rotary on every other layer"),
        Tiny("gpt_oss", gpt_oss, kind="moe", mixed=True, note="experts transposed, interleaved, with biases"),
        Tiny("gemma3", gemma3, kind="multimodal", note="SigLIP vision tower and projector stay dense"),
        Tiny(
            "llava",
            llava,
            kind="multimodal",
            auto="AutoModelForImageTextToText",
            note="CLIP vision tower and projector stay dense",
        ),
    ]
    return {t.name: t for t in entries}


@lru_cache(maxsize=1)
def matrix() -> dict[str, Tiny]:
    """Every entry of the architecture matrix, by name."""
    return _configs()


MATRIX: tuple[str, ...] = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3_text", "phi", "phi3", "falcon", "gpt_neox", "gptj", "gpt_bigcode", "gpt2", "opt", "bloom",
    "olmo", "olmo2", "olmoe", "granite", "granitemoe", "stablelm", "starcoder2", "cohere", "cohere2",
    "smollm3", "gpt_oss", "gemma3", "llava",
)  # fmt: skip
"""Names of the matrix entries, in table order (a test checks it matches :func:`matrix`)."""


@lru_cache(maxsize=1)
def tokenizer():
    """A 512-token byte-level BPE tokenizer trained on the first 200 kB of valid.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def config(family: str, layers: int | None = None, hidden: int = HIDDEN):
    """A tiny config of matrix entry ``family`` (every prunable input width divisible by 4)."""
    entry = matrix().get(family)
    if entry is None:
        raise ValueError(f"no tiny model for {family!r}; known: {', '.join(MATRIX)}")
    return entry.make(layers or entry.layers, hidden)


def build(family: str, seed: int = 0, layers: int | None = None, hidden: int = HIDDEN):
    """A randomly initialised tiny model of ``family`` in eval mode, fp32."""
    import torch
    import transformers

    entry = matrix().get(family)
    cfg = config(family, layers, hidden)
    torch.manual_seed(seed)
    auto = getattr(transformers, entry.auto if entry else "AutoModelForCausalLM")
    model = auto.from_config(cfg, dtype=torch.float32)
    return model.eval()


def save(
    family: str, out: Path, seed: int = 0, layers: int | None = None, hidden: int = HIDDEN, **kw: Any
) -> Path:
    """Write a tiny model plus tokenizer as a Hugging Face directory and return it.

    Extra keyword arguments go to ``save_pretrained`` (e.g. ``max_shard_size="100KB"``).
    """
    out = Path(out)
    build(family, seed, layers, hidden).save_pretrained(out, **kw)
    tokenizer().save_pretrained(out)
    return out


def _gguf_permute(w: Any, heads: int) -> Any:
    """llama.cpp's row order of a query/key projection (transformers undoes it when loading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def save_gguf(
    out: Path, seed: int = 0, layers: int = 2, hidden: int = HIDDEN, quantized: bool = True
) -> Path:
    """Write the tiny llama (:func:`build`) and its tokenizer as a GGUF file and return its path.

    The projection matrices are stored as ``Q8_0`` blocks when ``quantized`` (so that loading really
    dequantizes), every other tensor as F32; the tokenizer is the BPE of :func:`tokenizer` as a
    ``gpt2`` GGUF vocabulary. ``transformers.from_pretrained(out.parent, gguf_file=out.name)`` loads it.
    """
    import gguf
    import numpy as np

    model = build("llama", seed, layers, hidden)
    cfg = model.config
    out = Path(out)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantized else gguf.LlamaFileType.ALL_F32)
    tok = tokenizer()
    state = tok.backend_tokenizer.model.__getstate__()
    import json

    bpe = json.loads(state)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            if cfg.tie_word_embeddings:
                continue
            gname = "output.weight"
        else:
            m = name.removeprefix("model.layers.").split(".", 1)
            gname = f"blk.{m[0]}.{names[m[1].removesuffix('.weight')]}.weight"
        if gname.endswith("attn_q.weight"):
            a = _gguf_permute(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = _gguf_permute(a, cfg.num_key_value_heads)
        if quantized and a.ndim == 2 and gname.startswith("blk."):
            w.add_tensor(
                gname,
                gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                raw_dtype=gguf.GGMLQuantizationType.Q8_0,
            )
        else:
            w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the supported families table")
    args = parser.parse_args(argv)
    if args.markdown:
        from tests.families_table import markdown

        print(markdown(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
