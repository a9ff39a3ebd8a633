"""core.run.hostinfo: the CPU model, instruction set and kernel choice every report and bench JSON records
(issue 13, item 10: the same job gave other pruned weights on another host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import machine
from core.run import hostinfo
from tests.tiny_models import REPO


def test_describe_matches_this_machine() -> None:
    host = hostinfo.describe()
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert host["cpu_model"] and (not cpuinfo or host["cpu_model"] in cpuinfo)
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), []
    )
    assert host["simd_flags"] == [f for f in hostinfo.SIMD_FLAGS if f in flags]
    assert host["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert host["torch_threads"] == torch.get_num_threads()
    mem = host["memory"]
    assert 0 < mem["host_available_mb"] <= mem["host_total_mb"]
    assert len(mem["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert all(0 <= d["free_mb"] <= d["total_mb"] for d in mem["cuda"])
    assert machine()["host"]["cpu_model"] == host["cpu_model"]  # every bench JSON carries it


def test_kernel_and_thread_knobs_are_recorded_and_take_effect() -> None:
    """ATEN_CPU_CAPABILITY=default really selects the baseline kernels, and it is written down."""
    code = "import json; from core.run import hostinfo; print(json.dumps(hostinfo.describe()))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    host = json.loads(res.stdout)
    assert host["aten_cpu_capability"] == "DEFAULT"
    assert host["torch_threads"] == 1
    assert host["env"]["ATEN_CPU_CAPABILITY"] == "default" and host["env"]["OMP_NUM_THREADS"] == "1"
