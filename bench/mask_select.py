"""The primitives of a row-wise mask on SmolLM2's layer shapes, one thread: sort, torch's and
NumPy's k-th value, the mask functions, and zeroing by ``masked_fill`` against a product.

Usage: OMP_NUM_THREADS=1 python bench/mask_select.py [--out docs/bench/mask_select.json]

Scores are ``|randn|`` (seed 0), k = half a row; best of 7 per entry, milliseconds; the JSON names
the machine. Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from bench.common import emit_json, machine
from core.methods.masks import row_mask

SHAPES = ((1536, 576), (576, 1536), (576, 576))


def _best_ms(fn, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return round(best * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        s = torch.randn(*shape, generator=g).abs()
        k = shape[1] // 2
        mask = row_mask(s, 0.5)
        keep = (~mask).float()
        rows.append({
            "shape": list(shape),
            "torch_sort_ms": _best_ms(lambda s=s: torch.sort(s, dim=-1, stable=True)),
            "torch_kthvalue_ms": _best_ms(lambda s=s, k=k: torch.kthvalue(s, k, dim=-1, keepdim=True)),
            "numpy_partition_ms": _best_ms(lambda s=s, k=k: np.partition(s.numpy(), k - 1, axis=-1)),
            "row_mask_ms": _best_ms(lambda s=s: row_mask(s, 0.5)),
            "masked_fill_ms": _best_ms(lambda s=s, m=mask: s.masked_fill(m, 0)),
            "product_ms": _best_ms(lambda s=s, kf=keep: s * kf),
        })  # fmt: skip
    result = {"machine": machine(), "torch_threads": torch.get_num_threads(), "rows": rows}
    emit_json(result, args.out)


if __name__ == "__main__":
    main()
