"""Scale: streaming pruning of a checkpoint much larger than the memory it is allowed to use.

Usage: python bench/scale.py [--out docs/bench/scale.json] [--workdir /tmp] [--layers 20]

1. A child process writes a randomly initialised LLaMA-shaped model (hidden 2048, MLP 5632,
   vocab 32000, fp32, untied head) as sharded safetensors, one block at a time, so that it never
   holds the model in memory.
2. Another child runs ``core.run.streaming.prune_streaming`` (Wanda 2:4) on it; its whole-process
   peak RSS comes from ``os.wait4``'s ``ru_maxrss``. Target: peak RSS <= 0.35 x checkpoint size.
   Calibration is random token ids (seed 0): the tokenizer and the text do not matter for memory
   or time, only the number of tokens does.
3. A third child checks on tiny sharded models (llama, opt) that streaming and the in-memory
   engine + ``save_pretrained`` give identical tensors.

The multi-GB files are deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, run_child

TARGET_RATIO = 0.35


SHAPES = {
    "small": (2048, 5632, 16),
    "7b": (4096, 11008, 32),
}
"""``--shape``: (hidden, MLP, heads) of the LLaMA-shaped checkpoint; ``7b`` is LLaMA-7B's."""


def llama_config(layers: int, shape: str = "small"):
    from transformers import LlamaConfig

    hidden, mlp, heads = SHAPES[shape]
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def make_checkpoint(out: Path, layers: int, shape: str = "small") -> dict:
    """Write the random model shard by shard (one shard per block, one per non-block tensor)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = llama_config(layers, shape)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for i, names in enumerate(groups.values()):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in names:
            if n.endswith("norm.weight"):
                tensors[n] = torch.ones(shapes[n])
            else:
                tensors[n] = torch.randn(shapes[n], generator=gen).mul_(0.02)
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.dtype = "float32"
    config.save_pretrained(out)
    return {"bytes": total, "shards": len(groups), "params": total // 4}


def stream(model_dir: Path, out: Path, nsamples: int, seqlen: int, pattern: str) -> dict:
    import torch

    from core.run.streaming import prune_streaming
    from core.spec import PruneSpec

    cal = torch.randint(0, 32000, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    rep = prune_streaming(model_dir, out, cal, PruneSpec(method="wanda", pattern=pattern)).model_dump(
        mode="json"
    )
    rep.pop("layers", None)
    rep["sparsity"].pop("layers", None)
    return rep


def idle() -> dict:
    """The same imports as a streaming child, nothing else: the fixed cost in RSS."""
    import transformers  # noqa: F401

    import core.run.streaming  # noqa: F401

    return {}


def same_masks(workdir: Path) -> dict:
    """Streaming vs in-memory engine + save_pretrained on tiny sharded models: every tensor equal."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from core.run import engine
    from core.run.streaming import prune_streaming
    from core.spec import PruneSpec
    from tests import tiny_models

    def tensors(d: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    cal = torch.randint(0, tiny_models.VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    results = []
    for family in ("llama", "opt"):
        src = workdir / f"tiny-{family}"
        tiny_models.build(family, layers=4).save_pretrained(src, max_shard_size="100KB")
        for pattern in ("unstructured", "2:4"):
            spec = PruneSpec(method="wanda", pattern=pattern, batch_size=4)
            out = workdir / f"tiny-{family}-{pattern.replace(':', '-')}"
            rep = prune_streaming(src, out / "stream", cal, spec).model_dump(mode="json")
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            ref = engine.prune(model, cal, spec)
            model.save_pretrained(out / "mem")
            a, b = tensors(out / "stream" / "model"), tensors(out / "mem")
            equal = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
            results.append(
                {
                    "family": family,
                    "pattern": pattern,
                    "tensors": len(b),
                    "all_tensors_equal": equal,
                    "layer_sparsity_equal": rep["layers"] == ref.layers,
                }
            )
    return {"identical": all(r["all_tensors_equal"] for r in results), "runs": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/scale.json"))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument(
        "--service",
        action="store_true",
        help="run the job through the service (Redis, API, Celery worker) with `prunectl submit --wait`: "
        "dense and pruned perplexity, the worker's peak RSS, the wall time split (see service_run)",
    )
    ap.add_argument(
        "--direct",
        action="store_true",
        help="with --service: call core.run.pipeline.run (the worker's call) in a child process instead of "
        "queueing the job (the worker's block checkpoints would need a third copy of the model on disk)",
    )
    ap.add_argument(
        "--child", choices=["make", "stream", "idle", "check", "pipeline"], help=argparse.SUPPRESS
    )
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child == "make":
        print(json.dumps(make_checkpoint(args.dir, args.layers, args.shape)))
        return
    if args.child == "pipeline":
        from bench.scale_service import pipeline_child

        print(json.dumps(pipeline_child(args.dir, args.nsamples, args.seqlen, args.pattern)))
        return
    if args.service:
        from bench.scale_service import service_run

        service_run(args, SHAPES[args.shape])
        return
    if args.child == "stream":
        print(
            json.dumps(stream(args.dir / "ckpt", args.dir / "out", args.nsamples, args.seqlen, args.pattern))
        )
        return
    if args.child == "idle":
        print(json.dumps(idle()))
        return
    if args.child == "check":
        print(json.dumps(same_masks(args.dir)))
        return

    me = str(Path(__file__).resolve())
    work = Path(tempfile.mkdtemp(prefix="prune-scale-", dir=args.workdir))
    try:
        made, make_s, make_rss = run_child(
            [me, "--child", "make", "--dir", str(work / "ckpt"), "--layers", str(args.layers)]
        )
        ckpt_bytes = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
        print(f"checkpoint: {ckpt_bytes / 2**30:.2f} GiB in {make_s:.0f}s", file=sys.stderr, flush=True)
        _, _, idle_rss = run_child([me, "--child", "idle"])
        cmd = [me, "--child", "stream", "--dir", str(work), "--nsamples", str(args.nsamples)]
        cmd += ["--seqlen", str(args.seqlen), "--pattern", args.pattern]
        rep, wall, peak_mib = run_child(cmd)
        out_bytes = sum(p.stat().st_size for p in (work / "out" / "model").glob("*.safetensors"))
        shutil.rmtree(work / "ckpt")
        shutil.rmtree(work / "out")
        check, _, _ = run_child([me, "--child", "check", "--dir", str(work)])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    blocks = rep["timings"]["blocks_s"]
    peak_bytes = peak_mib * 2**20
    result = {
        "machine": machine(),
        "model": {
            "shape": "LLaMA, hidden 2048, MLP 5632, 16 heads, vocab 32000, untied head, random init",
            "layers": args.layers,
            "params": made["params"],
            "dtype": "float32",
            "shards": made["shards"],
        },
        "checkpoint_bytes": ckpt_bytes,
        "checkpoint_gib": round(ckpt_bytes / 2**30, 3),
        "make_checkpoint_s": round(make_s, 1),
        "make_checkpoint_peak_rss_mib": round(make_rss, 1),
        "prune": {
            "method": "wanda",
            "pattern": args.pattern,
            "calibration": f"{args.nsamples} x {args.seqlen} random token ids (seed 0)",
            "spilled_activations": rep["spilled"],
            "overall_sparsity": rep["sparsity"]["overall"],
            "output_bytes": out_bytes,
        },
        "peak_rss_mib": round(peak_mib, 1),
        "peak_rss_ratio": round(peak_bytes / ckpt_bytes, 4),
        "target_ratio": TARGET_RATIO,
        "meets_target": peak_bytes <= TARGET_RATIO * ckpt_bytes,
        "idle_child_rss_mib": round(idle_rss, 1),
        "wall_s": round(wall, 1),
        "timings": {
            "capture_s": round(rep["timings"]["capture_s"], 2),
            "block_s_mean": round(sum(blocks) / len(blocks), 2),
            "block_s_min": round(min(blocks), 2),
            "block_s_max": round(max(blocks), 2),
            "mask_s": round(rep["mask_s"], 2),
            "export_s": round(rep["timings"]["export_s"], 2),
            "total_s": round(rep["timings"]["total_s"], 1),
        },
        "same_masks_check": check,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
