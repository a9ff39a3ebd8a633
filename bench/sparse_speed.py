"""2:4 speed on CUDA: semi-structured sparse linears vs dense fp16, per layer and end to end.

Loads a model in fp16 on the GPU (default: the real SmolLM2-135M GGUF; ``--model`` takes a
Hugging Face directory, e.g. a 2:4 job's ``model/``), prunes every decoder linear 2:4 by
magnitude unless it already is 2:4 (speed does not depend on which weights are kept),
converts each weight with ``torch.sparse.to_sparse_semi_structured`` and times, with CUDA
events (median of ``--iters``):

- each distinct linear shape at several token counts (dense ``F.linear`` vs sparse);
- prefill (one forward over ``batch x --prompt`` tokens) and decode (``--new`` greedy tokens
  with the KV cache) of the whole model at each batch size, dense vs sparse.

Without CUDA it prints ``{"cuda": false, ...}`` and exits 0. On a GPU host (docs/formats.md)::

    HF_HUB_OFFLINE=1 python bench/sparse_speed.py --out docs/bench/sparse_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def _timed(fn: Any, iters: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` runs (CUDA events)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _prune_24(model: Any) -> list[str]:
    """Make every decoder linear 2:4 (magnitude, unless already 2:4); return their names."""
    import torch

    from core.methods import masks
    from core.model import families

    names = []
    with torch.no_grad():
        for name, mod in families.prunable_linears(model).items():
            if not isinstance(mod, torch.nn.Linear):
                continue
            w = mod.weight
            if not masks.check_nm(w, 2, 4):
                masks.apply_mask(w, masks.nm_mask(w.abs().float(), 2, 4))
            names.append(name)
    return names


def _to_sparse(model: Any, names: list[str]) -> dict[str, str]:
    """Swap each named linear's weight for its semi-structured sparse form; {name: error} of the
    ones the kernels refuse (kept dense)."""
    import torch
    from torch.sparse import to_sparse_semi_structured

    refused = {}
    for name in names:
        mod = model.get_submodule(name)
        try:
            mod.weight = torch.nn.Parameter(
                to_sparse_semi_structured(mod.weight.detach()), requires_grad=False
            )
        except Exception as e:  # shape/dtype the kernel does not support
            refused[name] = f"{type(e).__name__}: {e}"
    return refused


def _linear_rows(model: Any, names: list[str], tokens: list[int], iters: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from torch.sparse import to_sparse_semi_structured

    rows = []
    shapes = sorted({tuple(model.get_submodule(n).weight.shape) for n in names})
    for out_f, in_f in shapes:
        w = next(
            model.get_submodule(n).weight.detach()
            for n in names
            if tuple(model.get_submodule(n).weight.shape) == (out_f, in_f)
        )
        try:
            ws = to_sparse_semi_structured(w)
        except Exception as e:
            rows.append({"shape": [out_f, in_f], "error": f"{type(e).__name__}: {e}"})
            continue
        for t in tokens:
            x = torch.randn(t, in_f, dtype=w.dtype, device=w.device)
            dense = _timed(lambda x=x, w=w: F.linear(x, w), iters)
            try:
                sparse = _timed(lambda x=x, ws=ws: F.linear(x, ws), iters)
                err = (F.linear(x, ws) - F.linear(x, w)).abs().max().item()
            except Exception as e:
                rows.append({"shape": [out_f, in_f], "tokens": t, "error": f"{type(e).__name__}: {e}"})
                continue
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "tokens": t,
                    "dense_ms": round(dense, 4),
                    "sparse_ms": round(sparse, 4),
                    "speedup": round(dense / sparse, 3),
                    "max_abs_diff": err,
                }
            )
    return rows


def _e2e(model: Any, batch: int, prompt: int, new: int, iters: int, vocab: int) -> dict[str, float]:
    import torch

    ids = torch.randint(0, vocab, (batch, prompt), device="cuda")
    with torch.no_grad():
        prefill = _timed(lambda: model(ids, use_cache=False), iters)
        gen = _timed(
            lambda: model.generate(
                ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            ),
            max(1, iters // 3),
            warmup=1,
        )
    return {"prefill_ms": round(prefill, 3), "decode_ms_per_token": round(max(gen - prefill, 0.0) / new, 4)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="Hugging Face directory or .gguf (default: SmolLM2-135M GGUF)")
    ap.add_argument("--tokens", default="16,128,512,2048", help="token counts of the linear benchmark")
    ap.add_argument("--batches", default="1,8,32", help="batch sizes end to end")
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    import torch

    result: dict[str, Any] = {"bench": "sparse_speed", "cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["skipped"] = (
            "no CUDA device: torch.sparse.to_sparse_semi_structured runs on NVIDIA GPUs (sm80+); "
            "run this script on a GPU host (docs/formats.md)"
        )
        print(json.dumps(result))
        return

    from bench.common import SMOLLM2_FILE, machine, smollm2_dir
    from core.model.loading import load_model
    from core.spec import ModelSpec

    source = args.model or str(smollm2_dir() / SMOLLM2_FILE)
    model = load_model(ModelSpec(source=source, dtype="float16", device="cuda")).model
    model.eval()
    names = _prune_24(model)
    vocab = int(model.config.vocab_size)
    tokens = [int(x) for x in args.tokens.split(",")]
    batches = [int(x) for x in args.batches.split(",")]

    result["linear"] = _linear_rows(model, names, tokens, args.iters)
    e2e: dict[str, Any] = {"dense": {}, "sparse": {}}
    for b in batches:
        e2e["dense"][b] = _e2e(model, b, args.prompt, args.new, args.iters, vocab)
    with torch.no_grad():
        probe = torch.randint(0, vocab, (1, 64), device="cuda")
        ref = model(probe).logits.float()
    refused = _to_sparse(model, names)
    with torch.no_grad():
        diff = (model(probe).logits.float() - ref).abs().max().item()
    for b in batches:
        try:
            e2e["sparse"][b] = _e2e(model, b, args.prompt, args.new, args.iters, vocab)
        except Exception as e:
            e2e["sparse"][b] = {"error": f"{type(e).__name__}: {e}"}
    speed = {}
    for b in batches:
        d, s = e2e["dense"][b], e2e["sparse"][b]
        if "error" not in s:
            speed[b] = {
                "prefill": round(d["prefill_ms"] / s["prefill_ms"], 3),
                "decode": round(d["decode_ms_per_token"] / max(s["decode_ms_per_token"], 1e-9), 3),
            }
    result.update(
        model=source,
        linears=len(names),
        refused=refused,
        logits_max_abs_diff=diff,
        prompt=args.prompt,
        new_tokens=args.new,
        end_to_end=e2e,
        end_to_end_speedup=speed,
        machine=machine(),
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
