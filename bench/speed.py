"""Speed: the engine's Wanda against THE BASELINE (bench/baseline_wanda.py), and Wanda's
metric-and-mask time against SparseGPT's, on SmolLM2-135M in one process.

Usage: python bench/speed.py [--out docs/bench/speed.json] [--nsamples 32] [--seqlen 512]

Every run starts from a fresh deep copy of the same dense model (loaded once from the GGUF and
dequantised to fp32) and uses the same calibration windows (WikiText-2 valid.txt, seed 0).
Masks are compared layer by layer on the pruned weights' zero patterns.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.baseline_wanda import prune_wanda_baseline
from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir, spec_flags
from core.model import data, families
from core.model.loading import load_model
from core.run import engine
from core.spec import ModelSpec, PruneSpec


def zero_patterns(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: families.get_weight(m) == 0 for n, m in families.prunable_linears(model).items()}


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    differing = {n: int((a[n] != b[n]).sum()) for n in a if not torch.equal(a[n], b[n])}
    return {
        "identical": not differing and set(a) == set(b),
        "layers_compared": len(a),
        "layers_differing": len(differing),
        "entries_differing": sum(differing.values()),
    }


def timed(fn, *args, **kwargs) -> tuple[object, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def profile_engine(dense: torch.nn.Module, cal: torch.Tensor, spec: PruneSpec, top: int = 12) -> list[dict]:
    """cProfile of one engine run: the functions with the most own time."""
    model = copy.deepcopy(dense)
    prof = cProfile.Profile()
    prof.runcall(engine.prune, model, cal, spec)
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {"function": f"{Path(file).name}:{line}({fn})", "calls": nc, "tottime_s": tt, "cumtime_s": ct}
        )
    rows.sort(key=lambda r: -r["tottime_s"])
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows[:top]]


def save(path: Path, result: dict) -> None:
    """Write the results so far (the run is long; partial results survive an interruption)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/speed.json"))
    spec_flags(ap, {"calibration.nsamples": 32, "calibration.seqlen": 512, "prune.batch_size": None})
    ap.add_argument(
        "--sweep",
        default="1,2,4,8",
        help="engine batch sizes to time on the 2:4 headline calibration ('' to skip)",
    )
    ap.add_argument(
        "--other-nsamples",
        type=int,
        default=None,
        help="samples for the unstructured comparison and the SparseGPT mask-time runs "
        "(default: --nsamples; the 2:4 headline always uses --nsamples)",
    )
    ap.add_argument("--profile-nsamples", type=int, default=4, help="0 to skip the cProfile run")
    args = ap.parse_args()
    args.other_nsamples = args.other_nsamples or args.nsamples

    t0 = time.perf_counter()
    loaded = load_model(ModelSpec(source=str(smollm2_dir()), gguf_file=SMOLLM2_FILE, dtype="float32"))
    dense, tok = loaded.model.eval(), loaded.tokenizer
    load_s = time.perf_counter() - t0
    cal, source = data.calibration_windows(
        "wikitext2", tok, args.nsamples, args.seqlen, seed=0, data_dir=data_dir()
    )
    result: dict = {
        "machine": machine(),
        "model": f"SmolLM2-135M ({SMOLLM2_FILE}, dequantised to fp32)",
        "calibration": {"source": source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "engine_batch_size": PruneSpec(method="wanda", batch_size=args.batch_size).batch_for(
            args.seqlen, "cpu"
        ),
        "load_s": round(load_s, 2),
        "wanda": {},
    }
    for pattern in ("2:4", "unstructured"):
        spec = PruneSpec(method="wanda", pattern=pattern, batch_size=args.batch_size)
        nm = spec.nm or (0, 0)
        pcal = cal if pattern == "2:4" else cal[: args.other_nsamples]
        base = copy.deepcopy(dense)
        _, base_s = timed(prune_wanda_baseline, base, pcal, spec.target_sparsity, nm[0], nm[1])
        base_masks = zero_patterns(base)
        del base
        eng = copy.deepcopy(dense)
        rep, eng_s = timed(engine.prune, eng, pcal, spec)
        eng_masks = zero_patterns(eng)
        del eng
        result["wanda"][pattern] = {
            "nsamples": int(pcal.shape[0]),
            "baseline_s": round(base_s, 2),
            "engine_s": round(eng_s, 2),
            "speedup": round(base_s / eng_s, 2),
            "engine_mask_s": round(rep.mask_s, 3),
            "masks": compare(eng_masks, base_masks),
        }
        print(pattern, result["wanda"][pattern], file=sys.stderr, flush=True)
        save(args.out, result)
        del base_masks, eng_masks

    # The engine's speed against its batch size (what the CPU default is chosen from).
    sweep = {}
    for bs in [int(b) for b in args.sweep.split(",") if b.strip()]:
        spec = PruneSpec(method="wanda", pattern="2:4", batch_size=bs)
        sweep[str(bs)] = round(timed(engine.prune, copy.deepcopy(dense), cal, spec)[1], 2)
    if sweep:
        result["batch_size_sweep"] = {"pattern": "2:4", "nsamples": int(cal.shape[0]), "engine_s": sweep}
        print(result["batch_size_sweep"], file=sys.stderr, flush=True)
        save(args.out, result)

    # Wanda vs SparseGPT: metric-and-mask time (the engine's mask_s: method.prune over all layers).
    sg_cal = cal[: args.other_nsamples]
    mask_cmp = {}
    for method in ("wanda", "sparsegpt"):
        spec = PruneSpec(method=method, pattern="unstructured", batch_size=args.batch_size)
        rep, total = timed(engine.prune, copy.deepcopy(dense), sg_cal, spec)
        mask_cmp[method] = {"mask_s": round(rep.mask_s, 3), "prune_s": round(total, 2)}
    mask_cmp["sparsegpt_over_wanda_mask_time"] = round(
        mask_cmp["sparsegpt"]["mask_s"] / mask_cmp["wanda"]["mask_s"], 1
    )
    mask_cmp["calibration"] = {"nsamples": int(sg_cal.shape[0]), "seqlen": args.seqlen}
    mask_cmp["pattern"] = "unstructured 50%"
    result["mask_time"] = mask_cmp
    print(mask_cmp, file=sys.stderr, flush=True)
    save(args.out, result)

    if args.profile_nsamples:
        spec = PruneSpec(method="wanda", pattern="2:4", batch_size=args.batch_size)
        result["engine_profile"] = {
            "calibration": {"nsamples": args.profile_nsamples, "seqlen": args.seqlen, "pattern": "2:4"},
            "top_own_time": profile_engine(dense, cal[: args.profile_nsamples], spec),
        }
    result["total_s"] = round(time.perf_counter() - t0, 1)
    save(args.out, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
