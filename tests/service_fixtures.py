"""Pytest fixtures running the real service pieces: redis-server, the uvicorn API and a Celery worker.

Import the fixtures you need into a conftest (`from tests.service_fixtures import redis_url  # noqa`).
Every process runs in its own process group under a temp dir and is stopped at teardown.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from scripts.stack import REPO, Stack, _wait, free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA_DIR = Path(os.environ.get("PRUNE_DATA_DIR", REPO.parent / "shared" / "data"))
TASKS_DIR = REPO / "tests" / "data" / "lm_eval_tasks"
"""Tiny zero-shot task folders (lm-evaluation-harness YAML + local data) for offline tests."""
SIGNING_KEY = "test-signing-key"
WEBHOOK_SECRET = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0zMmJ5dGVzISE="


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on a free port for the whole session."""
    stack = Stack(tmp_path_factory.mktemp("redis-home"))
    try:
        yield stack.start_redis()
    finally:
        stack.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client on the session's Redis; the database is flushed before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def key_prefix() -> str:
    """A unique key prefix, so tests sharing a Redis never see each other's keys."""
    return f"t{uuid.uuid4().hex[:8]}"


def service_data_dir(root: Path) -> Path:
    """A data directory for a service under test: every entry of the shared one (symlinked) plus
    the test task folders as ``lm_eval_tasks/``."""
    root.mkdir(parents=True, exist_ok=True)
    for entry in DATA_DIR.iterdir() if DATA_DIR.is_dir() else []:
        if entry.name != "lm_eval_tasks":
            (root / entry.name).symlink_to(entry)
    (root / "lm_eval_tasks").symlink_to(TASKS_DIR)
    return root


@dataclass
class Service:
    """A running stack: its URLs, home directory and process handles."""

    stack: Stack
    api_url: str
    redis_url: str
    home: Path
    signing_key: str = SIGNING_KEY
    webhook_secret: str = WEBHOOK_SECRET

    @property
    def artifacts_dir(self) -> Path:
        """Root of the local artifact store."""
        return self.home / "artifacts"


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Redis + API + one Celery worker (prefork, concurrency 1), torn down at the end of the session."""
    home = tmp_path_factory.mktemp("prune-home")
    env = {
        "PRUNE_SIGNING_KEY": SIGNING_KEY,
        "PRUNE_DATA_DIR": str(service_data_dir(home / "data")),
        "PRUNE_URL_TTL": "600",
        # every tmp dir of the session (tiny models) is an allowed model root
        "PRUNE_MODEL_ROOTS": str(tmp_path_factory.getbasetemp()),
        "PRUNE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PRUNE_WEBHOOK_ALLOW_PRIVATE": "1",
        "PRUNE_SWEEP_FANOUT": "0",  # sweeps run serially here; tests/e2e/test_fanout.py fans them out
    }
    stack = Stack(home, env=env)
    try:
        stack.start_all()
        yield Service(stack, stack.api_url, stack.redis_url or "", home)
    finally:
        stack.stop()


@contextmanager
def nanio_server(data: Path, access: str, secret: str) -> Iterator[str]:
    """A real S3-compatible server (nanio: verifies SigV4 signatures and expiry) on a free loopback
    port, for the duration of the `with` block; yields its endpoint URL."""
    port = free_port()
    env = {**os.environ, "NANIO_ACCESS_KEY": access, "NANIO_SECRET_KEY": secret}
    cmd = [sys.executable, "-m", "nanio", "serve", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--data-dir", str(data), "--log-level", "warning", "--no-access-log"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"nanio did not start: {err}") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def start_aof_redis(stack: Stack, home: Path, port: int) -> None:
    """redis-server on a fixed ``port`` (so a test can stop and start it in place), data under
    ``home/redis``: AOF with fsync on every write, no RDB snapshots; returns once it answers PING."""
    data = home / "redis"
    data.mkdir(exist_ok=True)
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no"]
    proc = stack._spawn("redis", cmd)
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        _wait("redis", client.ping, 30, proc, stack.logs / "redis.log")
    finally:
        client.close()
