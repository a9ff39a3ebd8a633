"""HTTP load on loopback: concurrent clients submit jobs and poll them; compared with a bare FastAPI app.

    python bench/load.py --clients 32 --seconds 20 --out docs/bench/load.json

Starts its own redis-server and API (scripts/stack.py) and, in the same run, a trivial FastAPI app under
uvicorn. No worker runs: submitted jobs stay queued (this measures the API, Redis and the broker enqueue,
not pruning). Phases, all with the same httpx.AsyncClient clients:
1. mixed: each client POSTs a job, then polls GET /v1/jobs/{id}, submitting a new job every 20 polls;
2. get: GET /v1/jobs/{id} only;
3. bare: GET / on the trivial app (one uvicorn worker, like the API).
Reports requests/s, p50/p99 latency (ms) and errors (must be 0) per phase, and get/bare throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from scripts.stack import Stack, _wait, free_port

BARE_APP = (
    "import uvicorn, fastapi\n"
    "app = fastapi.FastAPI()\n"
    "@app.get('/')\n"
    "def root() -> dict:\n"
    "    return {'status': 'ok'}\n"
    "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', access_log=False)\n"
)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _phase(base: str, clients: int, seconds: float, mode: str, body: dict[str, Any]) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[str] = []
    submitted = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:

        async def submit() -> str:
            nonlocal submitted
            t = time.perf_counter()
            r = await http.post("/v1/jobs", json=body)
            lat.append(time.perf_counter() - t)
            submitted += 1
            if r.status_code != 201:
                errors.append(f"POST {r.status_code}")
                return ""
            return r.json()["id"]

        async def client(deadline: float) -> None:
            job_id = await submit() if mode != "bare" else ""
            n = 0
            while time.perf_counter() < deadline:
                if mode == "mixed" and n and n % 20 == 0:
                    job_id = await submit() or job_id
                url = "/" if mode == "bare" else f"/v1/jobs/{job_id}"
                t = time.perf_counter()
                try:
                    r = await http.get(url)
                    if r.status_code != 200:
                        errors.append(f"GET {r.status_code}")
                except httpx.HTTPError as e:
                    errors.append(type(e).__name__)
                lat.append(time.perf_counter() - t)
                n += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(t0 + seconds) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return {
        "requests": len(lat),
        "jobs_submitted": submitted,
        "seconds": round(elapsed, 2),
        "rps": round(len(lat) / elapsed, 1),
        "p50_ms": round(_pct(lat, 0.50) * 1000, 2),
        "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        "errors": len(errors),
        "error_kinds": sorted(set(errors)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three phases and print (and optionally save) the JSON report."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20, help="length of the mixed phase (others: half)")
    p.add_argument("--out", type=Path, default=Path("docs/bench/load.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp, Stack(Path(tmp), env={"PRUNE_SIGNING_KEY": "bench"}) as stack:
        home = Path(tmp)
        stack.start_redis()
        api = stack.start_api()
        port = free_port()
        bare_proc = stack._spawn("bare", [sys.executable, "-c", BARE_APP.replace("{port}", str(port))])
        bare = f"http://127.0.0.1:{port}"
        _wait("bare app", lambda: httpx.get(bare, timeout=1).status_code == 200, 60, bare_proc)
        body = {
            "model": {"source": str(home / "models" / "tiny")},
            "prune": {"method": "wanda", "pattern": "2:4"},
        }
        mixed = asyncio.run(_phase(api, args.clients, args.seconds, "mixed", body))
        get = asyncio.run(_phase(api, args.clients, args.seconds / 2, "get", body))
        bare_r = asyncio.run(_phase(bare, args.clients, args.seconds / 2, "bare", body))
    report = {
        "setup": {
            "clients": args.clients,
            "loopback": True,
            "worker": "none (jobs stay queued)",
            "api": "uvicorn api.app:app, one process",
            "bare": "trivial FastAPI app, one uvicorn process",
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "note": "client and servers share the same CPUs",
        },
        "mixed_submit_and_poll": mixed,
        "get_job": get,
        "bare_fastapi": bare_r,
        "get_job_vs_bare_throughput": round(get["rps"] / bare_r["rps"], 3),
        "errors_total": mixed["errors"] + get["errors"] + bare_r["errors"],
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report["errors_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
