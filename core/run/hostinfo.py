"""What a run's numbers depend on beyond its spec: CPU model, SIMD flags, kernels, threads, and the
devices with their free memory (host RAM, each CUDA GPU).

Recorded in every report.json (``versions.host``) and every bench JSON, because the pruned weights
of one spec differ between CPUs whose kernels differ (docs/reliability.md, "Reproducibility").
"""

from __future__ import annotations

import os
import platform
import re
from typing import Any

SIMD_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve",
)  # fmt: skip
"""CPU flags that change which ATen/MKL/oneDNN kernels run."""
KNOB_VARS = (
    "ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS",
)  # fmt: skip
"""Environment variables that select kernels or thread counts (recorded when set)."""


def _cpuinfo() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        text = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return model, flags
    m = re.search(r"^(?:model name|Model|cpu model)\s*:\s*(.+)$", text, re.M)
    f = re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M)
    return (m.group(1).strip() if m else model), (f.group(1).split() if f else [])


def describe() -> dict[str, Any]:
    """CPU model and SIMD flags, torch's kernel choice (ATen capability, BLAS), threads, kernel knobs."""
    import torch

    model, flags = _cpuinfo()
    config = torch.__config__.show()
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return {
        "cpu_model": model,
        "machine": platform.machine(),
        "simd_flags": [f for f in SIMD_FLAGS if f in flags],
        "cpus": affinity,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas.group(1) if blas else "unknown",
        "mkl": torch.backends.mkl.is_available(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ[k] for k in KNOB_VARS if k in os.environ},
        "memory": memory(),
    }


def memory() -> dict[str, Any]:
    """The compute devices and their free memory at this moment (MiB): the host's available RAM
    and, per CUDA device, its name, total and free memory (``cuda: []`` without a GPU). The engine's
    default budgets (:mod:`core.model.placement`) are 90% of these free figures."""
    import psutil
    import torch

    vm = psutil.virtual_memory()
    cuda = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            name = torch.cuda.get_device_name(i)
            cuda.append({"index": i, "name": name, "total_mb": total // 2**20, "free_mb": free // 2**20})
    return {"host_total_mb": vm.total // 2**20, "host_available_mb": vm.available // 2**20, "cuda": cuda}
