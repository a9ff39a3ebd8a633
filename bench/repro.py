"""Reproducibility of the README demo job (SmolLM2-135M, wanda 2:4) under kernel/thread settings.

Usage: python bench/repro.py --label NAME [--python PY] [--env K=V ...] [--out docs/bench/repro.jsonl]

Runs `PY -m core prune` with the demo settings (calibration: 32 x 512 tokens of WikiText-2;
evaluation: 40 windows of 512) in a child whose environment gets the --env settings (e.g.
ATEN_CPU_CAPABILITY=default, OMP_NUM_THREADS=1, MKL_CBWR=COMPATIBLE), then prints (and appends to
--out) one JSON line: the sha256 of every model file from manifest.json, the perplexities, the
host facts the child's report recorded (CPU, SIMD flags, ATen capability, BLAS, threads), timings.
`--python` runs another interpreter (a fresh virtual environment) on this checkout's code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SMOLLM2_FILE, data_dir, machine, smollm2_dir

DEMO = [
    "--method", "wanda", "--pattern", "2:4", "--calibration", "wikitext2", "--nsamples", "32",
    "--seqlen", "512", "--eval-data", "wikitext2", "--eval-seqlen", "512", "--eval-windows", "40",
    "--dtype", "float32", "--quiet",
]  # fmt: skip
"""The demo job of scripts/stack.py (`demo_request`) as `python -m core prune` flags."""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True)
    p.add_argument("--python", default=sys.executable, help="interpreter of the run (a venv's python)")
    p.add_argument("--env", action="append", default=[], help="K=V for the child (repeatable)")
    p.add_argument("--out", type=Path, help="append the JSON line here")
    args = p.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.env)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PRUNE_DATA_DIR": str(data_dir())}
    env.update(extra)
    with tempfile.TemporaryDirectory(prefix="repro-") as tmp:
        out = Path(tmp) / "out"
        cmd = [args.python, "-m", "core", "prune", "--model", str(smollm2_dir() / SMOLLM2_FILE), *DEMO]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--out", str(out)], env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stderr[-3000:])
            return 1
        report = json.loads((out / "report.json").read_text())
        files = json.loads((out / "manifest.json").read_text())["files"]
        model = {k: v["sha256"] for k, v in sorted(files.items()) if k.startswith("model/")}
        combined = hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()
    ev = report["evaluation"]
    row = {
        "label": args.label,
        "python": args.python,
        "env": extra,
        "model_files_sha256": model,
        "model_digest": combined,
        "weights_sha256": model.get("model/model.safetensors"),
        "dense_ppl": ev.get("dense_ppl"),
        "pruned_ppl": ev.get("pruned_ppl"),
        "sparsity": report["sparsity"]["overall"],
        "versions": report["versions"],
        "wall_s": round(wall, 1),
        "bench_machine": machine(),
    }
    line = json.dumps(row)
    print(line)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
