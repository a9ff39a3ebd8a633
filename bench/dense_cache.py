"""The cached dense baseline on the real SmolLM2 demo: the demo job (scripts/stack.py) run twice on one
stack (fresh $PRUNE_HOME); prints JSON with each run's timings and the saving.

    /work/tools/bench "dense cache" env HF_HUB_OFFLINE=1 python bench/dense_cache.py \
        > docs/bench/dense_cache.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import data_dir, machine, smollm2_dir
from scripts.stack import Stack, demo_request, follow


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    runs = []
    with tempfile.TemporaryDirectory() as home:
        env = {"PRUNE_DATA_DIR": str(data_dir()), "PRUNE_MODEL_ROOTS": str(smollm2_dir())}
        with Stack(Path(home), env=env) as stack:
            stack.start_all()
            for i in range(2):
                t = time.perf_counter()
                r = httpx.post(f"{stack.api_url}/v1/jobs", json=demo_request(), timeout=30)
                r.raise_for_status()
                job = follow(stack.api_url, r.json()["id"])
                wall = time.perf_counter() - t
                assert job["status"] == "succeeded", job
                report = httpx.get(
                    next(
                        a["url"]
                        for a in httpx.get(f"{stack.api_url}/v1/jobs/{job['id']}/artifacts").json()[
                            "artifacts"
                        ]
                        if a["name"] == "report.json"
                    )
                ).json()
                runs.append(
                    {
                        "run": i + 1,
                        "dense_cached": report["evaluation"]["dense_cached"],
                        "dense_ppl": job["summary"]["dense_ppl"],
                        "pruned_ppl": job["summary"]["pruned_ppl"],
                        "timings_s": {k: round(v, 2) for k, v in job["summary"]["durations"].items()},
                        "job_wall_s": round(wall, 1),
                    }
                )
    first, second = runs
    saved = first["timings_s"]["total_s"] - second["timings_s"]["total_s"]
    out = {
        "what": "SmolLM2-135M demo job (wanda 2:4, 32x512 calibration, 40x512 eval windows) run twice",
        "runs": runs,
        "engine_total_saved_s": round(saved, 2),
        "engine_total_saved_fraction": round(saved / first["timings_s"]["total_s"], 3),
        "dense_eval_s_first": first["timings_s"].get("dense_eval_s"),
        "dense_eval_s_second": second["timings_s"].get("dense_eval_s"),
        "machine": machine(),  # includes the CPU model and os.getloadavg() at the end
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
