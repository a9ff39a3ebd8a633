"""A 4-variant sweep through the real service (Redis, uvicorn API, Celery workers: `scripts.stack.Stack`)
fanned out over one worker and over two (prefork, concurrency 1, one torch thread each), and the same
sweep run serially (``PRUNE_SWEEP_FANOUT=0``) on one worker, side by side in one run.

The model is a random LLaMA-shaped checkpoint (``--layers`` x ``--hidden``, built by the test
helper ``tests.tiny_models``), calibrated on wikitext-2 valid.txt and evaluated on test.txt. The
wall time is measured from ``POST /v1/jobs`` to the job reading ``succeeded``; each configuration
gets a fresh stack (empty baseline cache, so every worker measures the dense model itself).

    python -m bench.sweep_fanout [--layers 8 --hidden 512 --nsamples 16 --seqlen 128]

Prints JSON (and writes it with ``--out``); docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import data_dir, machine
from scripts.stack import Stack
from tests import tiny_models

SPARSITIES = [0.4, 0.5, 0.6, 0.7]


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run_config(
    home: Path, model: Path, workers: int, fanout: bool, args: argparse.Namespace
) -> dict[str, Any]:
    """One fresh stack with `workers` workers; the sweep's wall time and its summary."""
    env = {
        "PRUNE_DATA_DIR": str(data_dir()),
        "PRUNE_MODEL_ROOTS": str(model.parent),
        "PRUNE_SWEEP_FANOUT": "1" if fanout else "0",
        "OMP_NUM_THREADS": "1",  # one thread per worker: N workers use N cores
        "MKL_NUM_THREADS": "1",
    }
    body = {
        "model": {"source": str(model)},
        "prune": {"method": "wanda"},
        "calibration": {"source": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen},
        "evaluation": {"max_windows": args.windows, "generations": 0},
        "sweep": {"sparsities": SPARSITIES},
        "outputs": {"model": True},
    }
    with Stack(home, env=env) as stack:
        stack.start_redis()
        stack.start_api()
        for i in range(workers):
            stack.start_worker(f"w{i + 1}")
        with httpx.Client(base_url=stack.api_url, timeout=60) as http:
            t0 = time.perf_counter()
            r = http.post("/v1/jobs", json=body)
            r.raise_for_status()
            job_id = r.json()["id"]
            while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                time.sleep(0.2)
            wall = time.perf_counter() - t0
    if job["status"] != "succeeded":
        raise SystemExit(f"sweep {job['status']}: {job['error']}")
    s = job["summary"]
    return {
        "workers": workers,
        "fanout": fanout,
        "wall_s": round(wall, 2),
        "variants": [{k: v[k] for k in ("label", "sparsity", "pruned_ppl")} for v in s["variants"]],
        "durations": {k: round(v, 2) for k, v in s["durations"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        root = Path(tmp)
        model = tiny_models.save("llama", root / "models" / "llama", layers=args.layers, hidden=args.hidden)
        before = _uptime()
        runs = [
            run_config(root / "serial", model, 1, False, args),
            run_config(root / "one", model, 1, True, args),
            run_config(root / "two", model, 2, True, args),
        ]
    serial, one, two = runs
    same = [v["pruned_ppl"] for v in serial["variants"]] == [v["pruned_ppl"] for v in two["variants"]]
    result = {
        "bench": "sweep_fanout",
        "machine": machine(),
        "uptime_before": before,
        "uptime_after": _uptime(),
        "model": {"family": "llama", "layers": args.layers, "hidden": args.hidden, "weights": "random"},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
        "sparsities": SPARSITIES,
        "runs": runs,
        "two_over_one_worker": round(two["wall_s"] / one["wall_s"], 3),
        "two_over_serial": round(two["wall_s"] / serial["wall_s"], 3),
        "one_over_serial": round(one["wall_s"] / serial["wall_s"], 3),
        "same_perplexities_as_serial": same,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
