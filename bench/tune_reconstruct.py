"""Tune the reconstruction and ALPS defaults on calibration text only (issue 21).

Usage: python bench/tune_reconstruct.py [--model smollm2|gemma3] [--blocks 15] [--levels 60% 70% 2:4]
       [--solvers] [--out docs/bench/tune_reconstruct.json]

SmolLM2-135M or Gemma 3 270M, dense model. The Gram of every linear of ``--blocks`` is collected on
the benchmark's calibration windows (32 x 512 of WikiText-2 valid.txt, seed 0) and, separately, on
held-out windows of the same valid.txt (``--held`` windows, seed 1; overlaps with the calibration windows are
possible but rare). Each candidate solves on the calibration Gram; its score is the relative output
error ``||(W - V) X|| / ||W X||`` on the held-out Gram, averaged over layers. test.txt is never read.
``--solvers`` compares ALPS's cost variants instead (ADMM iterations, number of penalty values,
``SOLVER_GRID``), with seconds per candidate: run it with ``OMP_NUM_THREADS=1`` alone on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import emit_json, machine


def grams(model, windows, names):
    """``{name: sum_t x_t x_t^T}`` (fp64) over ``windows`` for the linears called ``names``."""
    import torch

    mods = dict(model.named_modules())
    acc = {n: None for n in names}

    def hook(name):
        def fn(_m, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            g = x.T @ x
            acc[name] = g if acc[name] is None else acc[name] + g

        return fn

    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(0, windows.shape[0], 2):
            model(windows[i : i + 2])
    for h in hs:
        h.remove()
    return acc


SOLVER_GRID = ((12, 4), (12, 6), (12, 12), (16, 8), (16, 16), (20, 10))
"""``--solvers``: (ADMM iterations, penalty values) of each ALPS candidate."""


def candidates(level, solvers: bool = False):
    """``{name: fn(w, g) -> v}``; ``solvers`` selects the ALPS cost variants (``SOLVER_GRID``)."""
    from core.methods.reconstruct import admm_fixed, alps_solve, pcg_refine, support_projector

    proj = support_projector(level["sparsity"], level["nm"], None)
    out = {}

    def alps(iters, values, cg=10, r0=0.1, rm=10.0):
        return lambda w, g: alps_solve(w, g, proj, iters, r0, rm, values, cg, 1e-4)[0]

    if solvers:
        out["wanda+pcg10"] = lambda w, g: pcg_refine(w, g, ~proj(w.abs()), None, 10, 1e-4)[0]
        for iters, values in SOLVER_GRID:
            out[f"alps{iters} rho x{values}"] = alps(iters, values)
        return out
    for it in (0, 10, 20, 40):
        out[f"wanda+pcg{it}"] = lambda w, g, it=it: pcg_refine(w, g, ~proj(w.abs()), None, it, 1e-6)[0]
    out["wanda+admm9+pcg6"] = lambda w, g: admm_fixed(w, g, ~proj(w.abs()), None, 9, 0.1, 10, 3, 6, 1e-6)[0]
    for iters, cg in ((12, 20), (24, 20)):
        for r0, rm in ((0.03, 3.0), (0.1, 10.0), (0.3, 30.0)):
            key = f"alps{iters}+pcg{cg} rho {r0}->{rm}"
            out[key] = lambda w, g, a=iters, c=cg, r0=r0, rm=rm: alps_solve(
                w, g, proj, a, r0, rm, (a - 1) // 3 + 1, c, 1e-6
            )[0]
    return out


LEVELS = {
    "50%": {"sparsity": 0.5, "nm": None},
    "60%": {"sparsity": 0.6, "nm": None},
    "70%": {"sparsity": 0.7, "nm": None},
    "2:4": {"sparsity": 0.5, "nm": (2, 4)},
}


def score_level(level, names, weights, gc, gh, ntok, args) -> tuple[dict, dict]:
    """Per candidate: held-out errors (one per layer) and seconds."""
    import torch

    from core.methods.reconstruct import normalise
    from core.methods.sparsegpt import sparsegpt_prune

    cands = candidates(level, args.solvers)
    sc: dict[str, list[float]] = {}
    tt: dict[str, float] = {}
    for n in names:
        w, hd = weights[n], gh[n]
        den = float(((w.double() @ hd) * w.double()).sum())

        def err(v: torch.Tensor, hd=hd, w=w, den=den) -> float:
            d = (w - v).double()
            return (float(((d @ hd) * d).sum()) / den) ** 0.5

        norm = normalise(gc[n].float(), args.damp)
        wn = norm.to_norm(w)
        for key, fn in cands.items():
            t = time.perf_counter()
            v = fn(wn, norm.gram)
            tt[key] = tt.get(key, 0.0) + time.perf_counter() - t
            sc.setdefault(key, []).append(err(norm.from_norm(v)))
        ws = w.clone()
        t = time.perf_counter()
        sparsegpt_prune(ws, (2 / ntok * gc[n]).float(), level["sparsity"], nm=level["nm"])
        tt["sparsegpt"] = tt.get("sparsegpt", 0.0) + time.perf_counter() - t
        sc.setdefault("sparsegpt", []).append(err(ws))
    return sc, tt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--blocks", type=int, nargs="+", default=[15])
    ap.add_argument("--levels", nargs="+", default=["60%", "70%", "2:4"], choices=list(LEVELS))
    ap.add_argument("--solvers", action="store_true", help="compare ALPS cost variants (SOLVER_GRID)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--held", type=int, default=8)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/tune_reconstruct.json"))
    args = ap.parse_args()

    import torch

    from bench.quality import model_path
    from core.model import data
    from core.model.loading import load_model
    from core.spec import ModelSpec

    loaded = load_model(ModelSpec(source=model_path(args.model), dtype="float32"))
    model, tok = loaded.model, loaded.tokenizer
    cal, _ = data.calibration_windows("wikitext2", tok, args.nsamples, 512, 0)
    held, _ = data.calibration_windows("wikitext2", tok, args.held, 512, 1)
    mods = dict(model.named_modules())
    names = [
        n
        for n, m in mods.items()
        if isinstance(m, torch.nn.Linear) and any(f"layers.{b}." in n for b in args.blocks)
    ]
    gc, gh = grams(model, cal, names), grams(model, held, names)
    weights = {n: mods[n].weight.detach().float() for n in names}
    errors, secs = {}, {}
    for lname in args.levels:
        sc, secs[lname] = score_level(LEVELS[lname], names, weights, gc, gh, cal.numel(), args)
        errors[lname] = {k: statistics.fmean(v) for k, v in sc.items()}
        print(json.dumps({lname: errors[lname], "s": secs[lname]}), file=sys.stderr, flush=True)
    result = {
        "benchmark": "tune-reconstruct",
        "model": args.model,
        "layers": names,
        "score": "mean over layers of ||(W - V) X|| / ||W X|| on held-out valid.txt windows (seed 1)",
        "mean_error": errors,
        "seconds": secs,
        "solver_grid": SOLVER_GRID if args.solvers else None,
        "machine": machine(),
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
