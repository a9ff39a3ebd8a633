"""Our Wanda and SparseGPT beside llm-compressor's, on SmolLM2-135M, one after the other.

Usage (llm-compressor lives in a scratch venv, never in this project's dependencies):

    python -m venv /tmp/llmc/venv
    /tmp/llmc/venv/bin/pip install torch==2.13.0 llmcompressor==0.14.0.1 transformers==5.17.0
    /work/tools/bench "peer" python bench/peer_llmcompressor.py --peer-python /tmp/llmc/venv/bin/python \
        --work /tmp/peer > docs/bench/peer_llmcompressor.json

Both sides start from the same float32 checkpoint (SmolLM2-135M-Instruct's GGUF dequantized
once and saved as safetensors), the same 32 x 512 calibration windows (WikiText-2 valid.txt,
seed 0, passed to llm-compressor as a pre-tokenized dataset, no shuffling) and unstructured 50%
on every decoder linear (lm_head dense). Each run is timed around the pruning call alone, model
already loaded: ``core.run.engine.prune`` here, ``llmcompressor.oneshot`` there (its default
sequential pipeline; its own calibration forwards included). Each side uses its defaults for
batching (ours: 2 windows per forward; llm-compressor: batch size 1). SparseGPT settings are
equal on both sides: block 128, dampening 0.01. Perplexity of both results is measured here on
the same evaluation windows so the times compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peer(work: Path, method: str) -> None:
    """Runs inside the scratch venv: llm-compressor's method on the saved checkpoint."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()
    cal = torch.load(work / "cal.pt")
    ds = Dataset.from_dict(
        {"input_ids": [r.tolist() for r in cal], "attention_mask": [[1] * cal.shape[1] for _ in cal]}
    )
    cls = {"wanda": WandaPruningModifier, "sparsegpt": SparseGPTModifier}[method]
    recipe = cls(sparsity=0.5, mask_structure="0:0", targets=["Linear"], ignore=["re:.*lm_head"])
    t = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        processor=tok,
        num_calibration_samples=int(cal.shape[0]),
        max_seq_length=int(cal.shape[1]),
        shuffle_calibration_samples=False,
    )
    prune_s = time.perf_counter() - t
    weights = {
        n: m.weight.detach().clone()
        for n, m in model.named_modules()
        if n.startswith("model.layers.") and isinstance(m, torch.nn.Linear)
    }
    torch.save(weights, work / f"peer-{method}.pt")
    import llmcompressor

    print(
        json.dumps(
            {
                "prune_s": prune_s,
                "version": llmcompressor.__version__,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/peer"))
    ap.add_argument("--peer-python", default="/tmp/llmc/venv/bin/python")
    ap.add_argument("--peer", choices=["wanda", "sparsegpt"], help=argparse.SUPPRESS)
    ap.add_argument("--eval-windows", type=int, default=32)
    args = ap.parse_args()
    if args.peer:
        peer(args.work, args.peer)
        return

    import torch
    from transformers import AutoModelForCausalLM

    from bench.common import SMOLLM2_FILE, machine, smollm2_dir
    from core.evaluation import evaluate
    from core.model import data, families
    from core.model.loading import load_model
    from core.run import engine
    from core.run.pipeline import _eval_batch
    from core.spec import ModelSpec, PruneSpec

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    loaded = load_model(ModelSpec(source=str(smollm2_dir() / SMOLLM2_FILE), dtype="float32"))
    tok = loaded.tokenizer
    if not (work / "model" / "config.json").exists():
        m = loaded.model
        m.hf_quantizer = None
        m.config.quantization_config = None
        if hasattr(m.config, "__dict__"):
            m.config.__dict__.pop("quantization_config", None)
        m.save_pretrained(work / "model")
        tok.save_pretrained(work / "model")
    del loaded
    cal, _ = data.calibration_windows("wikitext2", tok, 32, 512, 0)
    torch.save(cal, work / "cal.pt")
    eval_ids = data.tokenize(tok, data.load_text("wikitext2", "evaluation")[0])

    def fresh() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32).eval()

    def ppl(model: torch.nn.Module) -> float:
        batch = _eval_batch(512, int(model.config.vocab_size))
        return evaluate.perplexity(model, eval_ids, 512, args.eval_windows, batch)["ppl"]

    rows = []
    for method in ("wanda", "sparsegpt"):
        model = fresh()
        t = time.perf_counter()
        engine.prune(model, cal, PruneSpec(method=method, pattern="unstructured", sparsity=0.5))
        ours_s = time.perf_counter() - t
        ours_ppl = ppl(model)
        ours = {
            n: families.get_weight(m).detach().clone() for n, m in families.prunable_linears(model).items()
        }
        del model
        out = subprocess.run(
            [args.peer_python, __file__, "--peer", method, "--work", str(work)],
            check=True,
            capture_output=True,
            text=True,
        )
        info = json.loads(out.stdout.strip().splitlines()[-1])
        theirs = torch.load(work / f"peer-{method}.pt")
        model = fresh()
        with torch.no_grad():
            for n, m in families.prunable_linears(model).items():
                families.set_weight(m, theirs[n])
        peer_ppl = ppl(model)
        same = sum(torch.equal(ours[n] == 0, theirs[n] == 0) for n in ours)
        rows.append(
            {
                "method": method,
                "ours_prune_s": round(ours_s, 2),
                "llmcompressor_prune_s": round(info["prune_s"], 2),
                "llmcompressor_over_ours": round(info["prune_s"] / ours_s, 2),
                "ours_ppl": ours_ppl,
                "llmcompressor_ppl": peer_ppl,
                "identical_masks": f"{same}/{len(ours)}",
                "llmcompressor": {k: info[k] for k in ("version", "torch", "threads")},
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        del model
    print(
        json.dumps(
            {
                "benchmark": "peer-llmcompressor",
                "model": SMOLLM2_FILE,
                "calibration": "32x512 seed 0",
                "eval_windows": args.eval_windows,
                "machine": machine(),
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
