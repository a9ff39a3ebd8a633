"""Test-only fault plan of the fault stack (`tests/faults/conftest.py`); production never imports it.

PRUNE_FAULT_PLAN is a JSON object mapping a substring of a job's model source to a fault:

    {"poison": {"action": "kill", "stage": "loading"},
     "hold-loading": {"action": "hold", "stage": "loading", "max_attempt": 1},
     "api-dies": {"action": "kill_api"}}

Worker actions (`tests.faults.worker_hooks`, served as `celery -A tests.faults.worker_hooks`):
- `kill`: SIGKILL the process running the job (the prefork pool child) when the job reports
  progress at `stage` (and `block`, when given): a worker death at a known point.
- `hold`: pause at that point until the job is cancelled (or `hold_s`, default 120 s, passes), so a
  test can act (cancel, kill, restart a service) while the job is known to be in that stage.
- `max_attempt`: only fire while the job's attempt counter is at most this (default: always).

API action (`tests.faults.api_hooks:app`, served by uvicorn instead of `api.app:app`):
- `kill_api`: SIGKILL the API process right after it created the job's record, before it sends the
  task: an API lost between the two writes (the job must still run, through the outbox sweeper).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def plan() -> dict[str, dict[str, Any]]:
    """The fault plan from the environment."""
    return json.loads(os.environ.get("PRUNE_FAULT_PLAN") or "{}")


def fault_for(source: str, attempt: int) -> dict[str, Any] | None:
    """The fault planned for a job with this model source on this attempt, if any."""
    for needle, fault in plan().items():
        if needle in source and attempt <= int(fault.get("max_attempt", 1 << 30)):
            return dict(fault)  # a private copy: `hold` marks it as done
    return None


def maybe_fire(
    fault: dict[str, Any] | None, stage: str, block: int | None, cancelled: Callable[[], bool]
) -> None:
    """Run the planned worker fault when the job reaches its stage/block."""
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
