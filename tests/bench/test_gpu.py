"""bench/gpu.py at tiny shapes on the CPU: the script the lent GPU runs must work before it travels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_passes import block_params, flop_floor

REPO = Path(__file__).resolve().parents[2]


def test_flop_floor_counts_two_forwards_per_block_but_the_last() -> None:
    shape = {"hidden": 8, "inter": 16, "heads": 2, "kv": 1, "vocab": 10, "layers": 3}
    mats = block_params(shape)
    assert mats["k"] == (4, 8) and mats["down"] == (8, 16)
    lin = 2 * 100 * sum(o * i for o, i in mats.values())
    floor = flop_floor(shape, tokens=100, seqlen=10, method="wanda")
    assert floor == {"forward": 5 * (lin + 2 * 100 * 10 * 8)}
    assert set(flop_floor(shape, 100, 10, "sparsegpt")) == {"forward", "hessian", "solve"}


def test_tiny_run_on_the_cpu_writes_every_section(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path), "--tiny", "--device",
           "cpu", "--sections", "matmul,big,matrix", "--budget-s", "300"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=600, cwd=REPO)
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["done"] and doc["sections"]["matmul"]["bf16_tflops"] > 0
    runs = doc["sections"]["big"]["runs"]
    assert [(r["method"], r["onload"]) for r in runs] == [
        ("wanda", False), ("wanda", True), ("sparsegpt", False), ("sparsegpt", True)
    ]  # fmt: skip
    for r in runs:
        assert r["prune_s"] > 0 and r["stats_s"] > 0 and r["rerun_s"] > 0 and r["pruned_ppl"] > 1
    for resident, onloaded in (runs[0:2], runs[2:4]):  # same weights, same windows: same perplexity
        assert onloaded["pruned_ppl"] == resident["pruned_ppl"] and resident["ppl_rel_diff"] < 1e-5
    matrix = doc["sections"]["matrix"]
    assert matrix["errors"] == 0 and matrix["total_differing_elements"] == 0  # the CPU against itself
    assert len(matrix["rows"]) >= 3 * 20
