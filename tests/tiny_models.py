"""Tiny random models of each supported family, built from configs (no hub access).

Shared by the engine, worker and end-to-end tests. A small byte-level BPE tokenizer is
trained on a slice of WikiText-2 so that exported directories are complete.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
WIKITEXT = DATA_DIR / "wikitext-2"

FAMILIES = ("llama", "opt", "gpt_neox", "bloom", "gpt2")
VOCAB = 512


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


def config(family: str, layers: int = 2, hidden: int = 64):
    """A tiny config of the given family (hidden size and MLP divisible by 8 for N:M)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    if family == "opt":
        return tf.OPTConfig(
            hidden_size=hidden,
            ffn_dim=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=hidden,
            **common,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    if family == "bloom":
        return tf.BloomConfig(hidden_size=hidden, n_layer=layers, n_head=4, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    raise ValueError(family)


def build(family: str, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A randomly initialised tiny model of `family` in eval mode, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, layers, hidden))
    return model.eval()


def save(family: str, out: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write a tiny model plus tokenizer as a Hugging Face directory and return it."""
    out = Path(out)
    build(family, seed, layers, hidden).save_pretrained(out)
    tokenizer().save_pretrained(out)
    return out
