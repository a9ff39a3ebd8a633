"""Reproducibility of the README demo job (SmolLM2-135M, wanda 2:4) across installs, kernels, threads.

    python bench/repro.py venv DIR                      # a fresh venv pinned by constraints.txt
    python bench/repro.py run --label NAME [--python DIR/bin/python] [--env K=V ...] [--out F.jsonl]
    python bench/repro.py compare F.jsonl [--reference LABEL] [--md]

`venv` creates DIR with `python -m venv` (no system site-packages) and installs the engine's
dependencies with `pip install -c constraints.txt` (torch==2.13.0 CPU and the rest from the local
wheels/registry), then prints its `pip freeze` and that list's sha256.

`run` runs `PY -m core prune` with the demo settings (calibration: 32 x 512 tokens of WikiText-2;
evaluation: --eval-windows windows of 512, 40 as in the demo; the dense baseline cache off) in a
child whose environment gets the --env settings (e.g. ATEN_CPU_CAPABILITY=default,
OMP_NUM_THREADS=1), then prints (and appends to --out) one JSON line: the sha256 of every model
file from manifest.json, the perplexities, the host facts the child's report recorded (CPU, SIMD
flags, ATen capability, BLAS, threads), the child's package versions and the load average.

`run --threads 1,2,4` runs the demo once per thread count: each child calls
torch.set_num_threads(N) before the engine (torch caps an OMP_NUM_THREADS above the CPU count),
with OMP_NUM_THREADS and MKL_NUM_THREADS set to N; the row's `versions.host.torch_threads` shows
what torch used. It appends one row per run (label LABEL-tN) and prints (and writes to --summary)
a comparison with the first count's run: identical model files or not, and per run the tensors
that differ, how many weights flipped between kept and pruned, the largest absolute difference
and the perplexity deltas.

`compare` prints, per run, whether its model files are bit-identical to the reference run's and how
far its perplexities are from the reference's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, SMOLLM2_FILE, data_dir, machine, smollm2_dir, spec_flags

DEMO = [
    "--method", "wanda", "--pattern", "2:4", "--calibration", "wikitext2", "--nsamples", "32",
    "--seqlen", "512", "--eval-source", "wikitext2", "--eval-seqlen", "512",
    "--dtype", "float32", "--quiet",
]  # fmt: skip
"""The demo job of scripts/stack.py (`demo_request`) as `python -m core prune` flags."""
ENGINE_REQUIREMENTS = ["torch==2.13.0", ".[engine]"]
"""What a repro venv installs (with constraints.txt): torch first (the CPU wheel), then the engine."""


def freeze(python: str) -> list[str]:
    """`pip freeze` of an interpreter (the project itself left out)."""
    out = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    return sorted(line for line in out.splitlines() if line and not line.startswith(("-e ", "prune-service")))


def make_venv(target: Path) -> dict[str, Any]:
    """A fresh venv at `target` with the engine's dependencies pinned by constraints.txt."""
    if target.exists():
        raise SystemExit(f"{target} exists: give a new directory")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    python = str(target / "bin" / "python")
    pin = ["-c", str(REPO / "constraints.txt")]
    for req in ENGINE_REQUIREMENTS:
        cmd = [python, "-m", "pip", "install", "-q", *pin, req]
        subprocess.run(cmd, cwd=REPO, check=True)
    pins = freeze(python)
    return {
        "venv": str(target),
        "python": python,
        "install_s": round(time.perf_counter() - t0, 1),
        "packages": len(pins),
        "freeze_sha256": hashlib.sha256("\n".join(pins).encode()).hexdigest(),
        "freeze": pins,
    }


def run_demo(
    label: str,
    python: str,
    extra: dict[str, str],
    eval_windows: int,
    dense_eval: bool = True,
    keep: Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One demo run in a child interpreter; the JSON row described in the module docstring. `keep`:
    a directory the run's `model/` is copied to (for a tensor comparison); `threads`: the child
    calls `torch.set_num_threads(threads)` before the engine starts."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "PRUNE_DATA_DIR": str(data_dir())}
    env["PRUNE_BASELINE_CACHE"] = "off"  # measure the dense perplexity in every run
    env.update(extra)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="repro-") as tmp:
        out = Path(tmp) / "out"
        entry = ["-m", "core"] if threads is None else ["-c", SET_THREADS, str(threads)]
        cmd = [python, *entry, "prune", "--model", str(smollm2_dir() / SMOLLM2_FILE), *DEMO]
        cmd += ["--eval-windows", str(eval_windows), "--out", str(out)]
        cmd += [] if dense_eval else ["--no-dense-baseline"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"run {label} failed:\n{proc.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
        files = json.loads((out / "manifest.json").read_text())["files"]
        if keep is not None:
            shutil.copytree(out / "model", keep)
    model = {k: v["sha256"] for k, v in sorted(files.items()) if k.startswith("model/")}
    pins = freeze(python)
    ev = report["evaluation"]
    return {
        "label": label,
        "python": python,
        "env": extra,
        "set_num_threads": threads,
        "model_files_sha256": model,
        "model_digest": hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest(),
        "dense_ppl": ev.get("dense_ppl"),
        "pruned_ppl": ev.get("pruned_ppl"),
        "eval_windows": ev.get("windows"),
        "sparsity": report["sparsity"]["overall"],
        "versions": report["versions"],
        "freeze_sha256": hashlib.sha256("\n".join(pins).encode()).hexdigest(),
        "wall_s": round(wall, 1),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "bench_machine": machine(),
    }


SET_THREADS = (
    "import runpy, sys, torch; torch.set_num_threads(int(sys.argv.pop(1))); "
    "sys.argv[0] = 'core'; runpy.run_module('core', run_name='__main__', alter_sys=True)"
)
"""`python -c` entry of a thread-count run: `python -m core` after `torch.set_num_threads(N)` (torch
caps an OMP_NUM_THREADS above the CPU count at the CPU count; set_num_threads is not capped)."""


def thread_env(threads: int) -> dict[str, str]:
    """The child's thread environment (OpenMP and MKL pools; torch's own is set by SET_THREADS)."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def tensor_diff(ref: Path, other: Path) -> dict[str, Any]:
    """How two runs' `model.safetensors` differ: tensors not bit-equal, kept/pruned positions that
    flipped (a weight zero in one run and not in the other) and the largest absolute difference."""
    from safetensors.torch import load_file

    a, b = load_file(ref / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys(), "different tensor names"
    differ, flipped, total, max_abs = [], 0, 0, 0.0
    for name in sorted(a):
        x, y = a[name].float(), b[name].float()
        total += x.numel()
        if not (x.shape == y.shape and bool((x == y).all())):
            differ.append(name)
            flipped += int(((x == 0) != (y == 0)).sum())
            max_abs = max(max_abs, float((x - y).abs().max()))
    return {
        "tensors": len(a),
        "tensors_differing": len(differ),
        "first_differing": differ[:5],
        "mask_flips": flipped,
        "mask_flip_fraction": flipped / total if total else 0.0,
        "max_abs_diff": max_abs,
    }


def run_threads(
    label: str, python: str, extra: dict[str, str], counts: list[int], eval_windows: int, dense_eval: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The demo once per thread count (each in its own child); the rows, and a summary comparing every
    run with the first count's: identical model files, tensor differences, perplexity deltas."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="repro-threads-") as tmp:
        for n in counts:
            row = run_demo(
                f"{label}-t{n}", python, {**extra, **thread_env(n)}, eval_windows, dense_eval,
                keep=Path(tmp) / f"t{n}", threads=n,
            )  # fmt: skip
            print(
                json.dumps({k: row[k] for k in ("label", "model_digest", "pruned_ppl", "wall_s")}), flush=True
            )
            rows.append(row)
        ref = rows[0]
        runs = []
        for n, row in zip(counts, rows, strict=True):
            runs.append(
                {
                    "threads": n,
                    "torch_threads": row["versions"]["host"]["torch_threads"],
                    "identical_model_files": row["model_digest"] == ref["model_digest"],
                    "pruned_ppl": row["pruned_ppl"],
                    "pruned_delta_pct": 100 * (row["pruned_ppl"] / ref["pruned_ppl"] - 1),
                    "dense_ppl": row["dense_ppl"],
                    "wall_s": row["wall_s"],
                    "vs_first": tensor_diff(Path(tmp) / f"t{counts[0]}", Path(tmp) / f"t{n}"),
                }
            )
    summary = {
        "label": label,
        "reference_threads": counts[0],
        "eval_windows": eval_windows,
        "all_identical": all(r["identical_model_files"] for r in runs),
        "runs": runs,
        "bench_machine": machine(),
    }
    return rows, summary


def compare(rows: list[dict[str, Any]], reference: str | None) -> list[dict[str, Any]]:
    """Each run against the reference run (default: the first): identical model files? perplexity deltas."""
    ref = next((r for r in rows if r["label"] == reference), rows[0]) if reference else rows[0]
    out = []
    for r in rows:
        host = r["versions"]["host"]
        out.append(
            {
                "label": r["label"],
                "env": " ".join(f"{k}={v}" for k, v in r["env"].items()) or "-",
                "aten": host["aten_cpu_capability"],
                "threads": host["torch_threads"],
                "same_install": r["freeze_sha256"] == ref["freeze_sha256"],
                "windows": r.get("eval_windows"),  # perplexities compare only at equal window counts
                "identical_weights": r["model_digest"] == ref["model_digest"],
                "dense_ppl": r["dense_ppl"],
                "pruned_ppl": r["pruned_ppl"],
                "pruned_delta_pct": round(100 * (r["pruned_ppl"] / ref["pruned_ppl"] - 1), 3),
                "dense_delta_pct": (
                    round(100 * (r["dense_ppl"] / ref["dense_ppl"] - 1), 4) if r["dense_ppl"] else None
                ),
                "load": round(r["loadavg_before"][0], 1),
            }
        )
    return out


def _markdown(table: list[dict[str, Any]]) -> str:
    cols = list(table[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(row[c]) for c in cols) + " |" for row in table]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("venv", help="a fresh virtual environment pinned by constraints.txt")
    v.add_argument("dir", type=Path)
    r = sub.add_parser("run", help="one demo run")
    r.add_argument("--label", required=True)
    r.add_argument("--python", default=sys.executable, help="interpreter of the run (a venv's python)")
    r.add_argument("--env", action="append", default=[], help="K=V for the child (repeatable)")
    spec_flags(
        r,
        {"evaluation.max_windows": 40, "evaluation.dense_baseline": True},
        {"--no-dense-eval": ["--no-dense-baseline"]},
    )
    r.add_argument("--out", type=Path, help="append the JSON line here")
    r.add_argument(
        "--threads", help="comma-separated thread counts (e.g. 1,2,4): one run per count, LABEL-tN"
    )
    r.add_argument("--summary", type=Path, help="with --threads: write the comparison JSON here")
    c = sub.add_parser("compare", help="compare the runs of a JSONL file")
    c.add_argument("file", type=Path)
    c.add_argument("--reference", help="label of the reference run (default: the first)")
    c.add_argument("--md", action="store_true", help="a Markdown table instead of JSON")
    args = p.parse_args(argv)
    if args.command == "venv":
        print(json.dumps(make_venv(args.dir.resolve())))
        return 0
    if args.command == "compare":
        rows = [json.loads(line) for line in args.file.read_text().splitlines() if line.strip()]
        table = compare(rows, args.reference)
        print(_markdown(table) if args.md else json.dumps(table, indent=1))
        return 0
    extra = dict(kv.split("=", 1) for kv in args.env)
    if args.threads:
        counts = [int(n) for n in args.threads.split(",")]
        rows, summary = run_threads(
            args.label, args.python, extra, counts, args.eval_windows, args.dense_baseline
        )
        print(json.dumps(summary, indent=1))
        if args.summary:
            args.summary.write_text(json.dumps(summary, indent=1) + "\n")
    else:
        rows = [run_demo(args.label, args.python, extra, args.eval_windows, args.dense_baseline)]
        print(json.dumps(rows[0]))
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
