"""Bad input catalogue: every malformed request is a 4xx problem+json and changes nothing stored.

The real app (TestClient) on a real redis-server; the engine CLI runs as a subprocess. Items only the
worker can detect (missing or corrupted model files, unsupported architectures, too little text, seqlen
beyond the context) are in tests/faults/test_bad_input_worker.py.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from jobs.settings import Settings
from jobs.signing import Signer
from scripts.stack import REPO

PROBLEM = "application/problem+json"
JOB = "0" * 20
OK = {"model": {"source": "/models/tiny"}, "prune": {"method": "wanda", "pattern": "2:4"}}


def snapshot(r: redis.Redis, settings: Settings) -> tuple[Any, ...]:
    """Every Redis key with its type and size, and every file under PRUNE_HOME (artifacts included)."""
    keys = sorted((k, r.type(k), r.memory_usage(k)) for k in r.keys("*"))
    files = sorted(
        (p.relative_to(settings.home).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
        for p in settings.home.rglob("*")
        if p.is_file() and p.name != "signing.key"
    )
    return keys, files


def with_(path: str, value: Any) -> dict[str, Any]:
    """OK with one nested field replaced ('a.b' = value)."""
    body: dict[str, Any] = {k: dict(v) for k, v in OK.items()}
    head, _, leaf = path.partition(".")
    if leaf:
        body.setdefault(head, {})[leaf] = value
    else:
        body[head] = value
    return body


BAD_BODIES: dict[str, tuple[bytes | dict[str, Any], int]] = {
    "malformed json": (b'{"model": {"source": "/m"', 422),
    "not an object": (b"[1, 2, 3]", 422),
    "not utf-8": (b'{"model": {"source": "\xff\xfe"}}', 400),
    "empty body": (b"", 422),
    "model missing": ({"prune": {"method": "wanda"}}, 422),
    "source wrong type": (with_("model", {"source": 42}), 422),
    "sparsity wrong type": (with_("prune", {"sparsity": "half"}), 422),
    "nsamples wrong type": ({**OK, "calibration": {"nsamples": [1]}}, 422),
    "unknown top-level field": ({**OK, "colour": "blue"}, 422),
    "unknown nested field": (with_("prune.speed", "fast"), 422),
    "sparsity 1.0": (with_("prune", {"sparsity": 1.0}), 422),
    "sparsity negative": (with_("prune", {"sparsity": -0.1}), 422),
    "sparsity nan": (b'{"model": {"source": "/m"}, "prune": {"sparsity": NaN}}', 422),
    "N equals M": (with_("prune", {"pattern": "4:4"}), 422),
    "N above M": (with_("prune", {"pattern": "5:4"}), 422),
    "N zero": (with_("prune", {"pattern": "0:4"}), 422),
    "N:M with variant": (with_("prune", {"pattern": "2:4", "variant": True}), 422),
    "N:M contradicting sparsity": (with_("prune", {"pattern": "2:4", "sparsity": 0.7}), 422),
    "unknown method": (with_("prune", {"method": "obs"}), 422),
    "unknown pattern": (with_("prune", {"pattern": "diagonal"}), 422),
    "unknown dtype": (with_("model", {"source": "/m", "dtype": "int3"}), 422),
    "seqlen too small": ({**OK, "calibration": {"seqlen": 1}}, 422),
    "source empty": (with_("model", {"source": ""}), 422),
    "oversized body": ({**OK, "prune": {"ignore": ["x" * 1024] * 80}}, 413),
    # issue 13, item 8: strict types, whole-string ASCII patterns, bounds, jobs that prune nothing
    "sparsity as a string": (with_("prune", {"sparsity": "0.5"}), 422),
    "nsamples as a float": ({**OK, "calibration": {"nsamples": 8.0}}, 422),
    "variant as a string": (with_("prune", {"variant": "true"}), 422),
    "pattern with a newline": (with_("prune", {"pattern": "2:4\n"}), 422),
    "full-width digits": (with_("prune", {"pattern": "２:４"}), 422),
    "leading zero": (with_("prune", {"pattern": "02:4"}), 422),
    "M too large": (with_("prune", {"pattern": "1:1000000000000"}), 422),
    "M above the cap": (with_("prune", {"pattern": "1:128"}), 422),
    "shard size zero": ({**OK, "outputs": {"max_shard_size": "0KB"}}, 422),
    "shard size full-width": ({**OK, "outputs": {"max_shard_size": "５MB"}}, 422),
    "sparsity zero": (with_("prune", {"sparsity": 0}), 422),
    "ignore everything": (with_("prune", {"pattern": "2:4", "ignore": ["*"]}), 422),
    "duplicate key": (b'{"model": {"source": "/m"}, "prune": {"sparsity": 0.5, "sparsity": 0.9}}', 422),
    "duplicate top-level key": (b'{"model": {"source": "/m"}, "model": {"source": "/n"}}', 422),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_job_bodies_are_problems_and_store_nothing(
    case: str, client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    payload, status = BAD_BODIES[case]
    before = snapshot(redis_client, settings)
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = client.post("/v1/jobs", content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM)
    body = r.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert snapshot(redis_client, settings) == before
    assert redis_client.llen(settings.queue) == 0


def test_bad_lookups_and_downloads_are_problems(
    client: TestClient, settings: Settings, redis_client: redis.Redis
) -> None:
    secret = settings.home / "secret.txt"
    secret.write_text("do not serve")
    (settings.artifacts_dir / "default" / JOB).mkdir(parents=True)
    (settings.artifacts_dir / "default" / JOB / "report.json").write_text("{}")
    before = snapshot(redis_client, settings)
    signer = Signer(settings.signing_key.encode())  # type: ignore[union-attr]
    future = int(time.time()) + 600
    good = signer.sign("default", JOB, "report.json", future)
    assert (
        client.get(f"/v1/artifacts/default/{JOB}/report.json?expires={future}&sig={good}").status_code == 200
    )

    bad = good[:-1] + ("1" if good.endswith("0") else "0")  # a different signature, always
    cases: list[tuple[str, str, int]] = [
        ("GET", "/v1/jobs/" + "f" * 20, 404),
        ("GET", "/v1/jobs/" + "f" * 20 + "/events", 404),
        ("GET", "/v1/jobs/" + "f" * 20 + "/artifacts", 404),
        ("POST", "/v1/jobs/" + "f" * 20 + "/cancel", 404),
        ("GET", "/v1/jobs/NOT-AN-ID", 422),
        ("GET", "/v1/jobs/../../etc/passwd", 404),
        ("GET", f"/v1/jobs/{JOB}/events?after=bogus", 404),
        ("GET", f"/v1/artifacts/default/{JOB}/report.md?expires={future}&sig={good}", 403),  # other file
        ("GET", f"/v1/artifacts/other/{JOB}/report.json?expires={future}&sig={good}", 403),  # other tenant
        ("GET", f"/v1/artifacts/default/{JOB}/report.json?expires={future + 1}&sig={good}", 403),
        ("GET", f"/v1/artifacts/default/{JOB}/report.json?expires={future}&sig={bad}", 403),
        ("GET", f"/v1/artifacts/default/{JOB}/report.json?expires={future}", 422),
        ("GET", f"/v1/artifacts/default/{JOB}/report.json?expires=soon&sig={good}", 422),
    ]
    past = int(time.time()) - 5
    cases.append(
        (
            "GET",
            f"/v1/artifacts/default/{JOB}/report.json?expires={past}&sig="
            + signer.sign("default", JOB, "report.json", past),
            403,
        )
    )
    for escape in (
        "..%2F..%2Fsecret.txt",
        "%2E%2E/%2E%2E/secret.txt",
        "model/..%2F..%2F..%2Fsecret.txt",
        "%2Fetc%2Fpasswd",
        "report.json%00.md",
        "..%5C..%5Csecret.txt",
    ):
        name = escape.replace("%2F", "/").replace("%2E", ".").replace("%5C", "\\").replace("%00", "\x00")
        sig = signer.sign("default", JOB, name, future)  # even a validly signed escape is refused
        cases.append(("GET", f"/v1/artifacts/default/{JOB}/{escape}?expires={future}&sig={sig}", 403))
    sig = signer.sign("..", JOB, "secret.txt", future)
    cases.append(("GET", f"/v1/artifacts/%2E%2E/{JOB}/secret.txt?expires={future}&sig={sig}", 403))
    for method, url, status in cases:
        r = client.request(method, url)
        assert r.status_code in (status, 404) if "%" in url else r.status_code == status, (url, r.text)
        assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith(PROBLEM), url
        assert b"do not serve" not in r.content
    assert snapshot(redis_client, settings) == before


CLI_BAD = {
    "sparsity 1.0": ["--sparsity", "1.0"],
    "N >= M": ["--pattern", "4:4"],
    "N:M with variant": ["--pattern", "2:4", "--variant"],
    "unknown method": ["--method", "obs"],
    "unknown pattern": ["--pattern", "diagonal"],
    "wrong type": ["--nsamples", "many"],
    "unknown flag": ["--colour", "blue"],
}


def test_cli_bad_arguments_exit_2_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for case, extra in CLI_BAD.items():
        cmd = [sys.executable, "-m", "core", "prune", "--model", str(tmp_path), "--out", str(out), *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
        assert res.returncode == 2, (case, res.stderr)
        assert "Traceback" not in res.stderr and res.stderr.strip(), case
        assert not out.exists(), case
