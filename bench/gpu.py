"""Everything issue 20 asks of a lent CUDA GPU, in one command that writes JSON as it goes.

Usage: python bench/gpu.py --out DIR [--tiny] [--device cuda] [--budget-s 480]

Sections, in order of priority (each one's result is written to ``DIR/gpu.json`` as soon as it
ends, so a run stopped by its time limit still returns what it measured):

1. ``matmul``: the bf16 matrix-product rate of this device (the FLOP floor's denominator).
2. ``big``: a LLaMA-3-8B-shape model (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 128256,
   32 blocks; random bf16 weights built on the device) pruned from 128 x 2048 calibration tokens
   with Wanda 2:4 and SparseGPT 50%, once resident and once onloaded block by block from host
   memory under a device budget. Wall time split into load, capture, statistics, masks, re-run
   and evaluation; peak device memory; the FLOP floor of the same passes at the measured rate.
3. ``matrix``: every tiny model of the architecture matrix (tests/tiny_models.py) pruned on the
   CPU and on the device (float32, same calibration ids), masks compared layer by layer.
4. ``llmc``: llm-compressor's ``oneshot`` Wanda 2:4 on the same 8B-shape model, if its wheels
   were carried (``.whl``), in a child process with its own time limit.

``--tiny`` shrinks every shape (and allows ``--device cpu``) so the script is tested here first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench import gpu_passes as passes  # noqa: E402

BIG = {"hidden": 4096, "inter": 14336, "heads": 32, "kv": 8, "vocab": 128256, "layers": 32}
TINY = {"hidden": 256, "inter": 512, "heads": 8, "kv": 2, "vocab": 1024, "layers": 4}


class Report:
    """The JSON document, rewritten after every section."""

    def __init__(self, path: Path, deadline: float) -> None:
        self.path, self.deadline = path, deadline
        self.doc: dict[str, Any] = {"machine": machine(), "sections": {}}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def put(self, key: str, value: Any) -> None:
        self.doc["sections"][key] = value
        self.path.write_text(json.dumps(self.doc, indent=1, default=str))
        print(json.dumps({key: value}, default=str)[:4000], flush=True)


def machine() -> dict[str, Any]:
    """The device and the software that measured."""
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__}
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(device=p.name, sms=p.multi_processor_count, mem_total_gib=total / 2**30,
                    mem_free_gib=free / 2**30, cuda=torch.version.cuda)  # fmt: skip
    else:
        info["device"] = "cpu: " + platform.processor()
    return info


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_rate(device: str, n: int, dtype: torch.dtype = torch.bfloat16, reps: int = 10) -> float:
    """TFLOP/s of an ``n x n x n`` product on random data (mean of ``reps`` after 3 warm-ups)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="small shapes, for a test on the CPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting sections after this")
    ap.add_argument("--sections", default="matmul,big,matrix,llmc", help="run in this order")
    ap.add_argument("--layers", type=int, default=0, help="decoder blocks of the big model (0: its own)")
    ap.add_argument("--placements", default="resident,onload", help="8B-shape runs: resident, onload or both")
    ap.add_argument("--llmc-timeout", type=float, default=150.0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rep = Report(args.out / "gpu.json", time.monotonic() + args.budget_s)
    shape = dict(TINY if args.tiny else BIG)
    if args.layers:
        shape["layers"] = args.layers
    ncal, seqlen = (8, 64) if args.tiny else (128, 2048)
    nwin = 4 if args.tiny else 16
    rate = 0.0
    for section in args.sections.split(","):
        if section == "matmul":
            rate = matmul_rate(args.device, 512 if args.tiny else 8192)
            rep.put("matmul", {"bf16_tflops": rate, "n": 512 if args.tiny else 8192})
        elif section == "big":
            part = partial(rep.put, "big")
            rep.put(
                "big", passes.big_runs(shape, ncal, seqlen, nwin, args.device, rate, rep.left, sync, part)
            )
        elif section == "profile":
            rep.put("profile", passes.profile_blocks(shape, ncal, seqlen, args.device))
        elif section == "matrix" and rep.left() > 30:
            rep.put("matrix", passes.arch_matrix(args.device, rep.left))
        elif section == "llmc" and rep.left() > 60:
            rep.put("llmc", run_llmc(args, shape, ncal, seqlen, min(args.llmc_timeout, rep.left() - 20)))
    rep.doc["done"] = True
    rep.put("wall_s", args.budget_s - rep.left())


def run_llmc(args: argparse.Namespace, shape: dict[str, int], ncal: int, seqlen: int, limit: float) -> Any:
    """llm-compressor in a child process (its import may fail or hang: neither stops this script)."""
    cmd = [sys.executable, str(REPO / "bench" / "gpu_llmc.py"), "--device", args.device,
           "--shape", json.dumps(shape), "--ncal", str(ncal), "--seqlen", str(seqlen)]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        tail = (e.stderr or b"")[-3000:]
        return {"error": f"timed out after {limit:.0f} s", "stderr": tail.decode(errors="replace")}
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-3000:]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    main()
