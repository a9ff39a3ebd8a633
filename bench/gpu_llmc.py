"""llm-compressor's ``oneshot`` Wanda 2:4 on the 8B-shape model of bench/gpu.py (a child process).

Prints one JSON line: ``prune_s`` around ``oneshot`` alone (model already built on the device),
the library's version and peak device memory. Its tokenizer is a word-level one built here (the
dataset is already tokenised; llm-compressor only asks for a processor).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.gpu_passes import build


def tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", required=True)
    ap.add_argument("--ncal", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    shape = json.loads(args.shape)
    t0 = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    g = torch.Generator().manual_seed(0)
    cal = torch.randint(0, shape["vocab"], (args.ncal, args.seqlen), generator=g)
    ds = Dataset.from_dict({"input_ids": cal.tolist(), "attention_mask": [[1] * args.seqlen] * args.ncal})
    print(f"imported in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    model = build(shape, args.device)
    cfg_dir = Path(tempfile.mkdtemp())  # oneshot re-reads the config from model.config.name_or_path
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = str(cfg_dir)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    recipe = WandaPruningModifier(
        sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"]
    )
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        processor=tokenizer(shape["vocab"]),
        num_calibration_samples=args.ncal,
        max_seq_length=args.seqlen,
        shuffle_calibration_samples=False,
    )
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    prune_s = time.perf_counter() - t
    import llmcompressor

    zeros = sum(
        int((m.weight == 0).sum())
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    total = sum(
        m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    print(
        json.dumps(
            {
                "prune_s": prune_s,
                "version": llmcompressor.__version__,
                "sparsity": zeros / total,
                "peak_gib": peak,
            }
        )
    )


if __name__ == "__main__":
    main()
