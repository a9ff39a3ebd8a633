"""Test-only fault injection in the worker, active only when PRUNE_FAULTS=1.

PRUNE_FAULT_PLAN is a JSON object mapping a substring of a job's model source to a fault:

    {"poison": {"action": "kill", "stage": "pruning", "block": 1},
     "hold-loading": {"action": "hold", "stage": "loading", "max_attempt": 1}}

- `kill`: SIGKILL the process running the job (the prefork pool child) when the job reports
  progress at `stage` (and `block`, when given): a worker death at a known point.
- `hold`: pause at that point until the job is cancelled (or `hold_s`, default 120 s, passes), so a
  test can act (cancel, kill, restart a service) while the job is known to be in that stage.
- `max_attempt`: only fire while the job's attempt counter is at most this (default: always).

The plan is read by `jobs/faults.py` (which also holds the API's `kill_api` fault).
Production workers never set PRUNE_FAULTS, and then nothing here runs.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from jobs.faults import fault_for, plan

__all__ = ["fault_for", "maybe_fire", "plan"]


def maybe_fire(
    fault: dict[str, Any] | None, stage: str, block: int | None, cancelled: Callable[[], bool]
) -> None:
    """Run the planned fault when the job reaches its stage/block."""
    if fault is None or fault.get("stage") != stage:
        return
    if fault.get("block") is not None and fault["block"] != block:
        return
    if fault["action"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault["action"] == "hold" and not fault.get("_held"):
        fault["_held"] = True  # once per attempt: later progress calls go through
        deadline = time.monotonic() + float(fault.get("hold_s", 120))
        while time.monotonic() < deadline and not cancelled():
            time.sleep(0.05)
