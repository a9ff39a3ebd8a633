"""prunectl --wait against the real stack while the API is SIGKILLed and comes back 15 s later."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
from pathlib import Path

import pytest

from prunectl.cli import main
from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.faults
DOWNTIME_S = 15.0


def _queued_or_running(fs: FaultStack, source: str) -> str | None:
    items = fs.http.get("/v1/jobs", params={"limit": 50}).json()["items"]
    return next((j["id"] for j in items if j["request"]["model"]["source"] == source), None)


def test_submit_wait_download_rides_out_an_api_restart(faults: FaultStack, tmp_path: Path) -> None:
    source = faults.source("pause-sse")  # holds 3 s at pruning block 1: the API dies mid-job
    body = {
        "model": {"source": source},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": str(faults.text), "nsamples": 4, "seqlen": 32},
        "evaluation": {"source": str(faults.text), "max_windows": 2},
    }
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(body))
    target = tmp_path / "pruned"
    out, err = io.StringIO(), io.StringIO()
    argv = ["--url", f"http://127.0.0.1:{faults.api_port}", "--json", "--timeout", "300", "submit"]
    argv += ["--spec", str(spec), "--idempotency-key", f"restart-{time.time_ns()}"]
    argv += ["--wait", "--poll", "0.3", "--download", str(target)]
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(main(argv, out=out, err=err)))
    t.start()
    job_id = None
    try:
        deadline = time.monotonic() + 120
        while job_id is None and time.monotonic() < deadline:
            job_id = _queued_or_running(faults, source)
            time.sleep(0.1)
        assert job_id is not None, err.getvalue()
        faults.wait_stage(job_id, "pruning", 1)
        faults.stack.stop_process("api", signal.SIGKILL)  # connections refused/reset from here on
        killed = time.monotonic()
        time.sleep(DOWNTIME_S)
        assert t.is_alive(), err.getvalue()  # still waiting, not given up
        faults.stack.start_api(faults.api_port)
        t.join(timeout=240)
    finally:
        if not faults.stack.procs.get("api"):
            faults.stack.start_api(faults.api_port)  # leave the stack running for the next test
    assert not t.is_alive()
    assert result == [0], err.getvalue()
    assert time.monotonic() - killed >= DOWNTIME_S
    final = json.loads(out.getvalue().strip().splitlines()[-1])
    assert final["id"] == job_id and final["status"] == "succeeded"
    listed = faults.http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]
    manifest = json.loads((target / "manifest.json").read_text())["files"]
    got = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert got == sorted(a["name"] for a in listed)  # the complete artifact set, nothing else
    assert set(manifest) == set(got) - {"manifest.json"}
    assert "model/model.safetensors" in manifest
