"""Per-layer solver time: SparseGPT against ALPS on SmolLM2-135M's and Gemma 3 270M's linear shapes.

Usage: OMP_NUM_THREADS=1 python bench/alps_layer.py [--out docs/bench/alps_layer.json]

Each shape gets a random weight and the Hessian of 4096 random input tokens with uneven column
scales (seed 0; synthetic inputs). Rows: SparseGPT 50%; ALPS with the current defaults; ALPS with
16 iterations and the projection by a stable sort (the first version's projection, run by today's
loop). Best of 3 per row; the JSON names the machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import emit_json, machine
from core.methods.alps import alps_prune
from core.methods.reconstruct import alps_solve, normalise
from core.methods.sparsegpt import sparsegpt_prune
from core.spec import PruneSpec

SHAPES = ((1536, 576), (576, 1536), (576, 576), (2048, 640), (640, 2048), (1024, 640), (640, 1024))
"""SmolLM2: gate/up, down, q/o; Gemma 3: gate/up, down, q, o."""


def _sorted_projector(sparsity: float):
    def project(scores: torch.Tensor) -> torch.Tensor:
        k = int(sparsity * scores.shape[1])
        order = torch.sort(scores, dim=-1, stable=True).indices[:, :k]
        return torch.zeros(scores.shape, dtype=torch.bool).scatter_(-1, order, True)

    return project


def _first_alps(w: torch.Tensor, h: torch.Tensor, spec: PruneSpec) -> None:
    norm = normalise(h, spec.percdamp)
    alps_solve(norm.to_norm(w), norm.gram, _sorted_projector(0.5), iters=16, cg_iters=10)


def _best(fn, w: torch.Tensor, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        ww = w.clone()
        t = time.perf_counter()
        fn(ww)
        times.append(time.perf_counter() - t)
    return round(min(times), 4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = PruneSpec(method="alps", sparsity=0.5)
    rows = []
    for out_f, in_f in SHAPES:
        x = torch.randn(4096, in_f) * torch.rand(in_f) * 3
        h = 2 / 4096 * x.T @ x
        w = torch.randn(out_f, in_f)
        sgpt = _best(lambda ww, h=h: sparsegpt_prune(ww, h, 0.5), w)
        alps = _best(lambda ww, h=h: alps_prune(ww, h, spec), w)
        first = _best(lambda ww, h=h: _first_alps(ww, h, spec), w)
        rows.append({
            "shape": [out_f, in_f], "sparsegpt_s": sgpt, "alps_s": alps, "alps_first_s": first,
            "alps_x_sparsegpt": round(alps / sgpt, 2), "alps_first_x_sparsegpt": round(first / sgpt, 2),
        })  # fmt: skip
    result = {
        "machine": machine(),
        "alps_iters": spec.alps_iters,
        "alps_rho_values": spec.alps_rho_values,
        "rows": rows,
    }
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
