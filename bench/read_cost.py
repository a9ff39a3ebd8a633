"""What reading the largest accepted job costs: parsing its stored record, and GET over real HTTP.

    python bench/read_cost.py --gets 300 --out docs/bench/read_cost.json

Starts its own redis-server and API (`python -m api.serve`, scripts/stack.py; no worker: the job stays
queued), submits the largest job the bounds accept (`jobs.bounds.largest_request`: 128 ignore
patterns of 256 characters, 8 tasks, 16 sweep variants, 2048-character webhook URL, sources at 1024
characters) and a minimal job, then reports:
- `parse_ms`: `Job.model_validate_json` of each stored record, in this process (median of `--gets`);
- `get_ms`: sequential `GET /v1/jobs/{id}` on one keep-alive connection (p50/p90/p99 of `--gets`);
- `unbounded_parse_ms`: what the old spec paid for the 100,000-pattern request the bounds now refuse
  (`core.spec.RunSpec` with an unbounded `ignore`, plus the job's prunes-something check the old
  `JobRequest` ran on every read; one run).
The machine's load average is recorded before and after: the figures are not from an idle machine
unless it says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.spec import RunSpec, check_prunes_something
from jobs.bounds import largest_request
from jobs.spec import Job
from scripts.stack import Stack
from tests import tiny_models
from tests.service_fixtures import TASKS_DIR, WEBHOOK_SECRET

TASKS = [f"task{i}" + "x" * 59 for i in range(8)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


def _home(root: Path) -> dict[str, str]:
    """A tiny model, a text file and eight task folders under `root`; the stack's environment."""
    tiny_models.save("llama", root / "tiny")
    (root / "small.txt").write_text("hello world. " * 4000)
    for name in TASKS:
        (root / "data" / "lm_eval_tasks").mkdir(parents=True, exist_ok=True)
        (root / "data" / "lm_eval_tasks" / name).symlink_to(TASKS_DIR / "tiny_mc")
    return {
        "PRUNE_SIGNING_KEY": "bench",
        "PRUNE_DATA_DIR": str(root / "data"),
        "PRUNE_MODEL_ROOTS": str(root),
        "PRUNE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PRUNE_WEBHOOK_ALLOW_PRIVATE": "1",
    }


def _measure(http: httpx.Client, stack: Stack, job_id: str, n: int) -> dict[str, Any]:
    import redis

    raw = redis.Redis.from_url(stack.redis_url or "").get(f"prune:job:{job_id}")
    assert raw is not None
    parse = []
    for _ in range(n):
        t = time.perf_counter()
        Job.model_validate_json(raw)
        parse.append((time.perf_counter() - t) * 1000)
    gets = []
    for _ in range(n):
        t = time.perf_counter()
        r = http.get(f"/v1/jobs/{job_id}")
        gets.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, r.text
    return {
        "record_bytes": len(raw),
        "parse_ms_median": round(statistics.median(parse), 3),
        "get_ms": {
            "p50": _pct(gets, 0.5),
            "p90": _pct(gets, 0.9),
            "p99": _pct(gets, 0.99),
            "max": _pct(gets, 1),
        },
    }


def _unbounded_parse_ms() -> float:
    body = {"model": {"source": "m"}, "prune": {"ignore": [f"{i:x}" for i in range(100_000)]}}
    raw = json.dumps(body)
    t = time.perf_counter()
    check_prunes_something(RunSpec.model_validate_json(raw).prune)  # what the old JobRequest ran
    return round((time.perf_counter() - t) * 1000, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gets", type=int, default=300)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), env=_home(Path(tmp))) as stack:
        stack.start_redis()
        stack.start_api()
        root = Path(tmp)
        body = largest_request(str(root / "tiny"), str(root / "small.txt"), TASKS, "http://127.0.0.1:9/")
        small = {"model": {"source": str(root / "tiny")}, "calibration": {"source": str(root / "small.txt")},
                 "evaluation": {"source": str(root / "small.txt")}}  # fmt: skip
        with httpx.Client(base_url=stack.api_url, timeout=30) as http:
            ids = {}
            for name, b in (("largest", body), ("minimal", small)):
                r = http.post("/v1/jobs", content=json.dumps(b), headers={"content-type": "application/json"})
                assert r.status_code == 201, r.text
                ids[name] = r.json()["id"]
            results = {name: _measure(http, stack, job_id, a.gets) for name, job_id in ids.items()}
        results["largest"]["body_bytes"] = len(json.dumps(body))
    out = {
        "bench": "read_cost",
        "gets": a.gets,
        "jobs": results,
        "unbounded_parse_ms": _unbounded_parse_ms(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": "shared machine (other sessions running): see loadavg; not an idle-machine figure",
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
