"""``bench/scale.py --service``: a checkpoint larger than the machine's RAM, pruned and evaluated
through the service, as a user would: ``prunectl submit --wait`` against a local stack (Redis,
uvicorn API, one Celery worker: :class:`scripts.stack.Stack`).

1. A child process writes the random LLaMA-shaped checkpoint (``--shape 7b --layers 32``: 6.7 B
   parameters, 27 GB in float32) block by block, plus a tokenizer (the tiny test tokenizer: its
   ids are valid for the 32000-token vocabulary; text and tokenizer do not change memory or time).
2. The job (Wanda 2:4, calibration ``--nsamples`` x ``--seqlen`` tokens of wikitext-2, one
   evaluation window) runs with its weights on disk: dense perplexity block by block from the
   input, pruning block by block into the output, pruned perplexity block by block from the
   output. ``outputs.model`` is false so that the output (written, evaluated, then dropped) is not
   copied again into the artifact store: input + output + a copy would not fit the disk.
3. A sampler thread records the RSS of the worker's processes every 0.2 s (the job runs in the
   prefork child); ``uptime`` is recorded before and after (the machine is shared).

Prints and writes JSON; the multi-GB files are deleted at the end.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import data_dir, machine, run_child


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


class _RSS:
    """Peak RSS of a process tree, sampled in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil

        self.root = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.wait(0.2):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                self.peak = max(self.peak, *(p.memory_info().rss for p in procs))
            except Exception:
                pass


def _job_spec(model: Path, nsamples: int, seqlen: int, pattern: str) -> dict[str, Any]:
    return {
        "model": {"source": str(model), "stream": "always"},
        "prune": {"method": "wanda", "pattern": pattern},
        "calibration": {"source": "wikitext2", "nsamples": nsamples, "seqlen": seqlen},
        "evaluation": {"max_windows": 1, "seqlen": seqlen, "generations": 0},
        "outputs": {"model": False},
    }


def pipeline_child(work: Path, nsamples: int, seqlen: int, pattern: str) -> dict[str, Any]:
    """The worker's call, ``core.run.pipeline.run``, in this (child) process; the report."""
    from core.run import pipeline
    from core.spec import RunSpec

    spec = _job_spec(work / "ckpt", nsamples, seqlen, pattern)
    spec["outputs"]["model"] = True
    os.environ["PRUNE_DATA_DIR"] = str(data_dir())
    return pipeline.run(RunSpec.model_validate(spec), work / "out").to_json()


def _direct(me: str, work: Path, args: Any) -> tuple[int, dict[str, Any], float, float]:
    """``pipeline_child`` in a child process: (exit code, report, wall s, peak RSS bytes)."""
    cmd = [me, "--child", "pipeline", "--dir", str(work), "--nsamples", str(args.nsamples)]
    report, wall, peak_mib = run_child([*cmd, "--seqlen", str(args.seqlen), "--pattern", args.pattern])
    return 0, report, wall, peak_mib * 2**20


def _service(work: Path, spec: Path) -> tuple[int, dict[str, Any], float, float, str]:
    """``prunectl submit --wait`` against a local stack: (exit, report, wall s, worker peak RSS, err)."""
    from prunectl.cli import main as prunectl
    from scripts.stack import Stack

    env = {"PRUNE_MODEL_ROOTS": str(work), "PRUNE_DATA_DIR": str(data_dir())}
    with Stack(work / "home", env=env) as stack:
        stack.start_redis()
        stack.start_api()
        worker = stack.start_worker()
        rss = _RSS(worker.pid)
        rss.thread.start()
        out, err = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        argv = ["--url", stack.api_url, "--json", "submit", "--spec", str(spec), "--wait"]
        code = prunectl([*argv, "--download", str(work / "dl")], out, err)
        wall = time.perf_counter() - t
        rss.stop.set()
    report = json.loads((work / "dl" / "report.json").read_text()) if code == 0 else {}
    return code, report, wall, rss.peak, err.getvalue()[-3000:]


def service_run(args: Any, shape: tuple[int, int, int]) -> None:
    from tests import tiny_models

    me = str(Path(__file__).resolve().parent / "scale.py")
    work = Path(tempfile.mkdtemp(prefix="prune-scale-svc-", dir=args.workdir))
    load_before = _uptime()
    try:
        made, make_s, _ = run_child(
            [me, "--child", "make", "--dir", str(work / "ckpt"), "--layers", str(args.layers),
             "--shape", args.shape]
        )  # fmt: skip
        tiny_models.tokenizer().save_pretrained(work / "ckpt")
        ckpt_bytes = sum(p.stat().st_size for p in (work / "ckpt").glob("*.safetensors"))
        print(f"checkpoint: {ckpt_bytes / 2**30:.2f} GiB in {make_s:.0f}s", file=sys.stderr, flush=True)
        spec = work / "spec.json"
        spec.write_text(json.dumps(_job_spec(work / "ckpt", args.nsamples, args.seqlen, args.pattern)))
        if args.direct:
            code, report, wall, peak = _direct(me, work, args)
        else:
            code, report, wall, peak, err = _service(work, spec)
            if code != 0:
                raise SystemExit(f"prunectl exited {code}: {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t, st = report["timings"], report["streaming"]
    blocks_s = sum(st["blocks_s"])
    result = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": _uptime(),
        "model": {
            "shape": f"LLaMA {args.shape}: hidden, MLP, heads = {shape}, vocab 32000, untied head",
            "layers": args.layers,
            "params": made["params"],
            "dtype": "float32",
        },
        "checkpoint_bytes": ckpt_bytes,
        "host_total_mb": machine()["host"]["memory"]["host_total_mb"],
        "make_checkpoint_s": round(make_s, 1),
        "via": "core.run.pipeline.run in a child process (--direct)"
        if args.direct
        else "prunectl submit --wait",
        "exit": code,
        "wall_s": round(wall, 1),
        "peak_rss_mib": round(peak / 2**20, 1),
        "dense_ppl": report["evaluation"]["dense_ppl"],
        "pruned_ppl": report["evaluation"]["pruned_ppl"],
        "sparsity": report["sparsity"]["overall"],
        "nm_ok": report["sparsity"]["nm_ok"],
        "timings": {
            "read_s (prune: blocks from the input)": st.get("read_s"),
            "write_s (prune: pruned blocks to the output)": st.get("write_s"),
            "compute_s (prune: capture + blocks - read - write)": round(
                st["capture_s"] + blocks_s - (st.get("read_s") or 0) - (st.get("write_s") or 0), 1
            ),
            "eval_s (dense + pruned, block by block from disk)": t.get("eval_s"),
            "eval_read_s (of which reading weights)": st.get("eval_read_s"),
            "export_s": t.get("export_s"),
            "load_s": t.get("load_s"),
            "calibrate_s": t.get("calibrate_s"),
            "total_s (worker)": t.get("total_s"),
        },
        "report_peak_rss_mb": report.get("peak_rss_mb"),
        "placement": report.get("placement"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
