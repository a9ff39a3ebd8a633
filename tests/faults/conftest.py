"""A private stack for fault injection: redis-server (AOF, fsync always), uvicorn API, Celery worker.

The worker and the API are the production apps wrapped by test-only hooks (`tests.faults.worker_hooks`,
`tests.faults.api_hooks:app`) that read the `PLAN` below (`tests/faults/plan.py`): a job whose model
source contains a plan key (a symlink to the tiny model named after the fault) gets that fault.
The API's outbox sweeper runs every 0.5 s with a 3 s age; workers renew their lease every
`LEASE_RENEW` s and the API re-queues a job whose lease was not renewed for `LEASE_EXPIRE` s. The
broker's visibility timeout is an hour: no test gets a job back through it.
Tests kill and restart these processes; every test leaves the stack running for the next one.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from scripts.stack import Stack, free_port
from tests import tiny_models
from tests.service_fixtures import DATA_DIR, SIGNING_KEY, WEBHOOK_SECRET, start_aof_redis

TERMINAL = {"succeeded", "failed", "cancelled"}
STAGES = ("loading", "calibrating", "pruning", "evaluating", "exporting", "uploading")
VISIBILITY_TIMEOUT = 3600
LEASE_RENEW = 1.0
LEASE_EXPIRE = 6.0
OUTBOX = "prune:outbox"

PLAN: dict[str, dict[str, Any]] = {
    "poison": {"action": "kill", "stage": "loading"},  # every attempt loads (pruning resumes past a block)
    "kill-child": {"action": "hold", "stage": "pruning", "block": 1, "max_attempt": 1},
    "kill-worker": {"action": "hold", "stage": "pruning", "block": 1, "max_attempt": 1},
    "pause-redis": {"action": "hold", "stage": "pruning", "block": 1, "hold_s": 4},
    "pause-sse": {"action": "hold", "stage": "pruning", "block": 1, "hold_s": 3},
    **{f"hold-{s}": {"action": "hold", "stage": s} for s in STAGES},
    "api-dies": {"action": "kill_api"},  # the API is SIGKILLed between creating the job and sending it
}


@dataclass
class FaultStack:
    """The running stack plus helpers to break and repair it."""

    stack: Stack
    home: Path
    redis_port: int
    api_port: int
    http: httpx.Client
    r: redis.Redis

    @property
    def text(self) -> Path:
        """A 40 kB slice of WikiText-2 (fast to tokenize) used for calibration and evaluation."""
        return self.home / "models" / "small.txt"

    @property
    def artifacts(self) -> Path:
        """The local artifact root."""
        return self.home / "artifacts"

    def source(self, fault: str | None = None) -> str:
        """Model source for a job: the tiny model, or a symlink to it named after a planned fault."""
        models = self.home / "models"
        if fault is None:
            return str(models / "tiny")
        link = models / fault
        if not link.exists():
            link.symlink_to(models / "tiny")
        return str(link)

    def submit(self, fault: str | None = None, **overrides: Any) -> str:
        """POST a small job (tiny llama, wanda 2:4) and return its id."""
        body: dict[str, Any] = {
            "model": {"source": self.source(fault)},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": str(self.text), "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": str(self.text), "max_windows": 2},
            **overrides,
        }
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        """GET the job, retrying while the API is briefly unreachable."""
        for _ in range(100):
            try:
                r = self.http.get(f"/v1/jobs/{job_id}")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"cannot read job {job_id}")

    def wait(self, job_id: str, pred: Any, what: str, timeout: float = 180) -> dict[str, Any]:
        """Poll the job until `pred(job)` holds (a generous bound: this is not a timing assertion)."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while time.monotonic() < deadline:
            job = self.job(job_id)
            if pred(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} never reached {what}: {job}")

    def wait_done(self, job_id: str, timeout: float = 180) -> dict[str, Any]:
        """Wait for a terminal status."""
        return self.wait(job_id, lambda j: j["status"] in TERMINAL, "a terminal status", timeout)

    def wait_stage(self, job_id: str, stage: str, block: int | None = None) -> dict[str, Any]:
        """Wait until the running job reports `stage` (and `block`)."""
        return self.wait(
            job_id,
            lambda j: (
                (j["progress"] or {}).get("stage") == stage
                and (block is None or j["progress"].get("block") == block)
            ),
            f"stage {stage} block {block}",
        )

    def worker_pid(self) -> int:
        """Pid of the Celery main process."""
        return self.stack.procs["worker"].pid

    def pool_child(self) -> psutil.Process:
        """The prefork pool process (the one running the job)."""
        children = psutil.Process(self.worker_pid()).children()
        assert len(children) == 1, children
        return children[0]

    def restart_worker(self) -> None:
        """SIGKILL the whole worker (main process and pool child), then start a fresh one."""
        self.kill_worker()
        self.stack.start_worker()

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group."""
        self.stack.stop_process("worker", signal.SIGKILL)

    def start_redis(self) -> None:
        """redis-server on the fixed port: AOF with fsync on every write, no RDB snapshots."""
        start_aof_redis(self.stack, self.home, self.redis_port)

    def restart_redis(self) -> None:
        """SIGKILL redis-server (no graceful shutdown) and start it again from its AOF."""
        self.stack.stop_process("redis", signal.SIGKILL)
        self.start_redis()

    def restart_api(self) -> None:
        """SIGKILL the API and start it again on the same port."""
        self.stack.stop_process("api", signal.SIGKILL)
        self.stack.start_api(self.api_port)

    def broker_job_ids(self) -> list[str]:
        """Job ids of the task messages held by the broker: queued or delivered but unacked."""
        raws = [*self.r.lrange("prune.gpu", 0, -1), *self.r.hvals("unacked")]
        out = []
        for raw in raws:
            msg = json.loads(raw)
            msg = msg[0] if isinstance(msg, list) else msg  # unacked entries: [message, exchange, key]
            out.append(json.loads(base64.b64decode(msg["body"]))[0][0])
        return out

    def artifact_files(self) -> list[str]:
        """Every file under the artifact root (relative), including temp dirs."""
        if not self.artifacts.is_dir():
            return []
        return sorted(
            p.relative_to(self.artifacts).as_posix() for p in self.artifacts.rglob("*") if p.is_file()
        )

    def job_files(self, job_id: str) -> list[str]:
        """Files stored for a job, plus any partial upload or scratch left for it."""
        left = [f for f in self.artifact_files() if job_id in f]
        work = self.home / "work" / job_id
        return left + ([str(work)] if work.exists() else [])

    def logs(self, name: str) -> str:
        """Tail of a service log (for assertion messages)."""
        path = self.stack.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


@pytest.fixture(scope="session")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    """The fault-injection stack (session scope: the tests share one worker and repair what they break)."""
    home = tmp_path_factory.mktemp("faults-home")
    tiny_models.save("llama", home / "models" / "tiny")
    wiki = (tiny_models.WIKITEXT / "valid.txt").read_text(encoding="utf-8")
    (home / "models" / "small.txt").write_text(wiki[:40_000], encoding="utf-8")
    env = {
        "PRUNE_SIGNING_KEY": SIGNING_KEY,
        "PRUNE_DATA_DIR": str(DATA_DIR),
        "PRUNE_MODEL_ROOTS": str(home / "models"),
        "PRUNE_FAULT_PLAN": json.dumps(PLAN),
        "PRUNE_LEASE_RENEW": str(LEASE_RENEW),
        "PRUNE_LEASE_EXPIRE": str(LEASE_EXPIRE),
        "PRUNE_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT),
        "PRUNE_MAX_ATTEMPTS": "3",
        "PRUNE_STORAGE_RETRIES": "2",
        "PRUNE_STORAGE_BACKOFF": "0.2",
        "PRUNE_OUTBOX_AGE": "3",
        "PRUNE_OUTBOX_INTERVAL": "0.5",
        "PRUNE_WEBHOOK_SECRET": WEBHOOK_SECRET,  # webhook tests post to a receiver on loopback
        "PRUNE_WEBHOOK_ALLOW_PRIVATE": "1",
    }
    redis_port, api_port = free_port(), free_port()
    stack = Stack(
        home,
        redis_url=f"redis://127.0.0.1:{redis_port}/0",
        env=env,
        api_app="tests.faults.api_hooks:app",
        worker_app="tests.faults.worker_hooks",
    )
    client = redis.Redis(port=redis_port, socket_timeout=5)
    http = httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=httpx.Timeout(30, read=60))
    fs = FaultStack(stack, home, redis_port, api_port, http, client)
    try:
        fs.start_redis()
        stack.start_api(api_port)
        stack.start_worker()
        yield fs
    finally:
        http.close()
        stack.stop()
        client.close()


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, **kw
    )
