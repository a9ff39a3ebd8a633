"""Bad input only the worker can detect: the job fails with a clear message and stores nothing."""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from tests.faults.conftest import FaultStack

pytestmark = pytest.mark.faults


def test_worker_detected_bad_input_fails_cleanly(faults: FaultStack) -> None:
    models = faults.home / "models"
    corrupt = models / "corrupt-st"
    shutil.copytree(models / "tiny", corrupt, dirs_exist_ok=True)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated download
    gguf = models / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    bert = models / "bert"
    shutil.copytree(models / "tiny", bert, dirs_exist_ok=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (models / "empty.txt").write_text("")
    (models / "short.txt").write_text("too short to calibrate on.\n")

    tiny = faults.source()
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        "missing model": (
            {"model": {"source": str(models / "nope")}},
            "model_load_error",
            str(models / "nope"),
        ),
        "corrupted safetensors": ({"model": {"source": str(corrupt)}}, "model_load_error", str(weights)),
        "corrupted gguf": ({"model": {"source": str(gguf)}}, "model_load_error", str(gguf)),
        "unsupported architecture": ({"model": {"source": str(bert)}}, "unsupported_model", "bert"),
        "empty calibration text": (
            {"model": {"source": tiny}, "calibration": {"source": str(models / "empty.txt")}},
            "calibration_error",
            "empty.txt",
        ),
        "too-short calibration text": (
            {"model": {"source": tiny}, "calibration": {"source": str(models / "short.txt"), "seqlen": 32}},
            "calibration_error",
            "calibration text is too short",
        ),
        "seqlen beyond context": (
            {"model": {"source": tiny}, "calibration": {"source": str(faults.text), "seqlen": 512}},
            "invalid_input",
            "exceeds the model's context length 256",
        ),
    }
    ids = {}
    for case, (body, _, _) in cases.items():
        r = faults.http.post("/v1/jobs", json={"evaluation": {"enabled": False}, **body})
        assert r.status_code == 201, (case, r.text)
        ids[case] = r.json()["id"]
    for case, (_, code, needle) in cases.items():
        job = faults.wait_done(ids[case])
        assert job["status"] == "failed", (case, job)
        assert job["error"]["code"] == code, (case, job["error"])
        assert needle in job["error"]["message"], (case, job["error"])
        assert "Traceback" not in job["error"]["message"]
        assert faults.job_files(ids[case]) == [], case
        assert faults.http.get(f"/v1/jobs/{ids[case]}/artifacts").status_code == 409
