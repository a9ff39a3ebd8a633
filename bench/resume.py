"""What resuming saves: the real SmolLM2 job on the real stack, fresh vs. killed at ~80% of pruning.

One stack (Redis, API, one Celery worker; lease renewed every 1 s, expiring after 4 s). Job A runs
undisturbed on a host that has never seen the model: the host's caches (`$PRUNE_HOME/cache`: the
dense baselines and the dequantized GGUF models) are emptied before it. They are emptied again and
job B, the same spec, runs until its progress reports block >= 80% of the blocks pruned; then the
whole worker (main process and pool child) is SIGKILLed and a new one started on the same host: the
API's sweeper re-queues B when its lease expires, and attempt 2 continues from the block checkpoints
in the work dir, and reuses what attempt 1 left in the host's caches (the dense baseline it
measured and, for a GGUF source, the dequantized model it stored), as a real host would.
`--no-baseline-cache` / `--no-model-cache` turn those caches off for both jobs.
Reported: each attempt's run time from its `running` event to its end (Redis stream ids), the
ratio attempt-2 / fresh, the wall time from the kill to B's success (lease expiry + worker start
included), and what the host's caches held before each attempt (`caches`) with what the reports
say they used (`model.gguf_cache`, `evaluation.dense_cached`). `--source hf` runs the same weights
as a Hugging Face safetensors directory (converted from the GGUF file first) instead of the GGUF
file, whose dequantizing load is a fixed cost of every attempt that misses the model cache.

    /work/tools/bench "resume" env HF_HUB_OFFLINE=1 python bench/resume.py --source hf --eval-windows 8 \
        > docs/bench/resume-hf.json
    /work/tools/bench "resume-gguf" env HF_HUB_OFFLINE=1 python bench/resume.py --eval-windows 8 \
        > docs/bench/resume-gguf.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import data_dir, machine, smollm2_dir, spec_flags
from scripts.stack import Stack, demo_request

KILL_AT = 0.8


def _events(http: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    return http.get(f"/v1/jobs/{job_id}/events", params={"limit": 1000}).json()["items"]


def _ms(event: dict[str, Any]) -> int:
    return int(event["id"].split("-")[0])


def attempts(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attempt: seconds from its `running` event to the next status event, and the blocks it pruned."""
    out: list[dict[str, Any]] = []
    for e in items:
        if e["type"] == "status":
            if out and "s" not in out[-1]:
                out[-1]["s"] = round((_ms(e) - out[-1]["start"]) / 1000, 2)
                out[-1]["ended"] = e["data"]["status"]
            if e["data"]["status"] == "running":
                out.append({"start": _ms(e), "blocks": []})
        elif e["type"] == "progress" and e["data"].get("stage") == "pruning" and e["data"].get("block"):
            blocks = out[-1]["blocks"]
            if not blocks or blocks[-1] != e["data"]["block"]:
                blocks.append(e["data"]["block"])
    for a in out:
        a.pop("start")
        a["blocks"] = f"{a['blocks'][0]}..{a['blocks'][-1]}" if a["blocks"] else "none"
    return out


def wait(http: httpx.Client, job_id: str, pred: Any, timeout: float = 900) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if pred(job):
            return job
        time.sleep(0.2)
    raise TimeoutError(job_id)


def cache_state(cache: Path) -> dict[str, int]:
    """What the host's caches hold: complete model-cache entries and dense baselines."""
    models = cache / "models"
    entries = [p for p in models.iterdir() if (p / "complete.json").is_file()] if models.is_dir() else []
    baselines = list((cache / "baselines").glob("*.json")) if (cache / "baselines").is_dir() else []
    return {"model_entries": len(entries), "dense_baselines": len(baselines)}


def report(http: httpx.Client, job_id: str) -> dict[str, Any]:
    """The job's report.json (its last attempt's)."""
    arts = http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    return httpx.get(next(a["url"] for a in arts if a["name"] == "report.json"), timeout=30).json()


def used(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "gguf_cache": rep["model"].get("gguf_cache"),
        "dense_cached": (rep.get("evaluation") or {}).get("dense_cached"),
    }


def hf_copy(gguf: Path, out: Path) -> Path:
    """The GGUF model's weights as a Hugging Face safetensors directory (float32)."""
    from core.model.loading import load_model
    from core.spec import RunSpec

    loaded = load_model(RunSpec.model_validate({"model": {"source": str(gguf), "dtype": "float32"}}).model)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    spec_flags(ap, {"evaluation.max_windows": 8}, {"--windows": ["--eval-windows"]})  # the demo uses 40
    ap.add_argument("--source", choices=["gguf", "hf"], default="gguf")
    ap.add_argument("--no-baseline-cache", action="store_true", help="PRUNE_BASELINE_CACHE=off")
    ap.add_argument("--no-model-cache", action="store_true", help="PRUNE_MODEL_CACHE=off")
    args = ap.parse_args()
    body = demo_request()
    body["evaluation"]["max_windows"] = args.eval_windows
    body["evaluation"]["generations"] = 0
    with tempfile.TemporaryDirectory() as home_s:
        home = Path(home_s)
        roots = [str(smollm2_dir())]
        if args.source == "hf":
            body["model"] = {"source": str(hf_copy(Path(body["model"]["source"]), home / "smollm2-hf"))}
            roots.append(str(home))
        env = {
            "PRUNE_DATA_DIR": str(data_dir()),
            "PRUNE_MODEL_ROOTS": ":".join(roots),
            **({"PRUNE_BASELINE_CACHE": "off"} if args.no_baseline_cache else {}),
            **({"PRUNE_MODEL_CACHE": "off"} if args.no_model_cache else {}),
            "PRUNE_LEASE_RENEW": "1",
            "PRUNE_LEASE_EXPIRE": "4",
        }
        cache = home / "stack" / "cache"  # $PRUNE_HOME/cache of the stack's worker
        caches: dict[str, Any] = {}
        with Stack(home / "stack", env=env) as stack:
            stack.start_all()
            http = httpx.Client(base_url=stack.api_url, timeout=30)
            shutil.rmtree(cache, ignore_errors=True)  # A's host has never seen the model
            caches["fresh"] = {"before": cache_state(cache)}
            fresh_id = http.post("/v1/jobs", json=body).json()["id"]
            fresh = wait(http, fresh_id, lambda j: j["status"] in ("succeeded", "failed"))
            assert fresh["status"] == "succeeded", fresh
            caches["fresh"] |= {"after": cache_state(cache), "used": used(report(http, fresh_id))}
            print(f"fresh: {attempts(_events(http, fresh_id))}", file=sys.stderr)

            shutil.rmtree(cache, ignore_errors=True)  # B's host has not seen it either
            caches["killed_attempt_1"] = {"before": cache_state(cache)}
            job_id = http.post("/v1/jobs", json=body).json()["id"]

            def late_in_pruning(j: dict[str, Any]) -> bool:
                p = j["progress"] or {}
                return p.get("stage") == "pruning" and (p.get("block") or 0) >= KILL_AT * (
                    p.get("nblocks") or 1
                )

            at = wait(http, job_id, late_in_pruning)["progress"]
            t_kill = time.time()
            stack.stop_process("worker", signal.SIGKILL)  # the whole host's worker: main process and child
            caches["killed_attempt_2"] = {"before": cache_state(cache)}  # what attempt 1 left
            stack.start_worker()
            done = wait(http, job_id, lambda j: j["status"] in ("succeeded", "failed"))
            kill_to_done = time.time() - t_kill
            assert done["status"] == "succeeded" and done["attempts"] == 2, done
            caches["killed_attempt_2"] |= {"after": cache_state(cache), "used": used(report(http, job_id))}
            runs = {"fresh": attempts(_events(http, fresh_id)), "killed": attempts(_events(http, job_id))}
            same = fresh["summary"]["pruned_ppl"] == done["summary"]["pruned_ppl"]
    resumed = runs["killed"][-1]["s"]
    out = {
        "what": f"SmolLM2-135M ({args.source}) wanda 2:4, 32x512 calibration, {args.eval_windows}x512 eval "
        "windows, no generations; job B SIGKILLed (worker main + child) late in pruning, resumed on the "
        "same host",
        "baseline_cache": not args.no_baseline_cache,
        "model_cache": not args.no_model_cache and args.source == "gguf",
        "caches": caches,
        "killed_at": {"block": at["block"], "nblocks": at["nblocks"]},
        "attempts": runs,
        "fresh_s": runs["fresh"][0]["s"],
        "resumed_attempt_s": resumed,
        "ratio": round(resumed / runs["fresh"][0]["s"], 3),
        "kill_to_success_s": round(kill_to_done, 1),
        "pruned_ppl": {"fresh": fresh["summary"]["pruned_ppl"], "resumed": done["summary"]["pruned_ppl"]},
        "identical_ppl": same,
        "durations_resumed": done["summary"]["durations"],
        "durations_fresh": fresh["summary"]["durations"],
        "machine": machine(),
        "command": " ".join(["python", "bench/resume.py", *sys.argv[1:]]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
