"""Tune the reconstruction and ALPS defaults on calibration text only (issue 21).

Usage: python bench/tune_reconstruct.py [--blocks 15] [--out docs/bench/tune_reconstruct.json]

SmolLM2-135M, dense model. The Gram of every linear of ``--blocks`` is collected on the benchmark's
calibration windows (32 x 512 of WikiText-2 valid.txt, seed 0) and, separately, on held-out windows
of the same valid.txt (``--held`` windows, seed 1; overlaps with the calibration windows are
possible but rare). Each candidate solves on the calibration Gram; its score is the relative output
error ``||(W - V) X|| / ||W X||`` on the held-out Gram, averaged over layers. test.txt is never read.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SMOLLM2_FILE, machine, smollm2_dir


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


def candidates(level):
    from core.methods.reconstruct import admm_fixed, alps_solve, pcg_refine, support_projector

    proj = support_projector(level["sparsity"], level["nm"], None)
    out = {}
    for it in (0, 10, 20, 40):
        out[f"wanda+pcg{it}"] = lambda w, g, it=it: pcg_refine(w, g, ~proj(w.abs()), None, it, 1e-6)[0]
    out["wanda+admm9+pcg6"] = lambda w, g: admm_fixed(w, g, ~proj(w.abs()), None, 9, 0.1, 10, 3, 6, 1e-6)[0]
    for iters, cg in ((12, 20), (24, 20)):
        for r0, rm in ((0.03, 3.0), (0.1, 10.0), (0.3, 30.0)):
            key = f"alps{iters}+pcg{cg} rho {r0}->{rm}"
            out[key] = lambda w, g, a=iters, c=cg, r0=r0, rm=rm: alps_solve(
                w, g, proj, a, r0, rm, 3, c, 1e-6
            )[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, nargs="+", default=[15])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--held", type=int, default=8)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/tune_reconstruct.json"))
    args = ap.parse_args()

    import torch

    from core.methods.masks import nm_mask
    from core.methods.reconstruct import normalise
    from core.methods.sparsegpt import sparsegpt_prune
    from core.model import data
    from core.model.loading import load_model
    from core.spec import ModelSpec

    loaded = load_model(ModelSpec(source=str(smollm2_dir() / SMOLLM2_FILE), dtype="float32"))
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
    levels = {
        "60%": {"sparsity": 0.6, "nm": None},
        "70%": {"sparsity": 0.7, "nm": None},
        "2:4": {"sparsity": 0.5, "nm": (2, 4)},
    }
    del nm_mask
    scores: dict[str, dict[str, list[float]]] = {}
    secs: dict[str, dict[str, float]] = {}
    for lname, level in levels.items():
        cands = candidates(level)
        sc = scores.setdefault(lname, {})
        tt = secs.setdefault(lname, {})
        for n in names:
            w = mods[n].weight.detach().float()
            hd = gh[n]
            den = float(((w.double() @ hd) * w.double()).sum())

            def err(v, hd=hd, w=w, den=den):
                d = (w - v).double()
                return (float(((d @ hd) * d).sum()) / den) ** 0.5

            norm = normalise(gc[n].float(), args.damp)
            wn = norm.to_norm(w)
            for key, fn in cands.items():
                t = time.perf_counter()
                v = norm.from_norm(fn(wn, norm.gram))
                tt[key] = tt.get(key, 0.0) + time.perf_counter() - t
                sc.setdefault(key, []).append(err(v))
            ws = w.clone()
            t = time.perf_counter()
            sparsegpt_prune(ws, (2 / cal.numel() * gc[n]).float(), level["sparsity"], nm=level["nm"])
            tt["sparsegpt"] = tt.get("sparsegpt", 0.0) + time.perf_counter() - t
            sc.setdefault("sparsegpt", []).append(err(ws))
        means = {k: statistics.fmean(v) for k, v in sc.items()}
        print(json.dumps({lname: means}), file=sys.stderr, flush=True)
    result = {
        "benchmark": "tune-reconstruct",
        "layers": names,
        "score": "mean over layers of ||(W - V) X|| / ||W X|| on held-out valid.txt windows (seed 1)",
        "mean_error": {lv: {k: statistics.fmean(v) for k, v in sc.items()} for lv, sc in scores.items()},
        "seconds": secs,
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["mean_error"], indent=1))


if __name__ == "__main__":
    main()
