"""Test-only fault plan, read only when PRUNE_FAULTS=1 (shared by the worker and the API).

PRUNE_FAULT_PLAN is a JSON object mapping a substring of a job's model source to a fault. The worker's
actions (`kill`, `hold`) are described in `worker/faults.py`. The API's:

- `kill_api`: SIGKILL the API process right after it created the job's record, before it sends the
  task: an API lost between the two writes (the job must still run, through the outbox sweeper).

Production processes never set PRUNE_FAULTS, and then nothing here runs.
"""

from __future__ import annotations

import json
import os
import signal
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def plan() -> dict[str, dict[str, Any]]:
    """The fault plan from the environment (empty unless PRUNE_FAULTS=1)."""
    if os.environ.get("PRUNE_FAULTS") != "1":
        return {}
    return json.loads(os.environ.get("PRUNE_FAULT_PLAN") or "{}")


def fault_for(source: str, attempt: int) -> dict[str, Any] | None:
    """The fault planned for a job with this model source on this attempt, if any."""
    for needle, fault in plan().items():
        if needle in source and attempt <= int(fault.get("max_attempt", 1 << 30)):
            return dict(fault)  # a private copy: `hold` marks it as done
    return None


def after_create(source: str) -> None:
    """In the API, between creating a job's record and sending its task: the `kill_api` fault."""
    fault = fault_for(source, 1)
    if fault is not None and fault.get("action") == "kill_api":
        os.kill(os.getpid(), signal.SIGKILL)
