"""Over the real API: a job asking for every artifact format; each downloads through its signed URL."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
import torch

from tests import tiny_models
from tests.e2e.test_service import small_request, wait_status
from tests.service_fixtures import Service

pytestmark = pytest.mark.e2e
FORMATS = ["dense", "compact", "int8", "compact-int8"]


def test_job_with_every_format(service: Service, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from core.artifacts.formats import compact

    source = tiny_models.save("llama", tmp_path / "model")
    body = small_request(source) | {"outputs": {"formats": FORMATS}}
    with httpx.Client(base_url=service.api_url, timeout=httpx.Timeout(30, read=120)) as http:
        r = http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_status(http, job_id, {"succeeded", "failed", "cancelled"}, timeout=300)
        assert job["status"] == "succeeded", job
        listing = http.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]

    dl = tmp_path / "download"
    for a in listing:
        resp = httpx.get(a["url"], timeout=60)
        assert resp.status_code == 200, (a["name"], resp.text)
        assert hashlib.sha256(resp.content).hexdigest() == a["sha256"]
        (dl / a["name"]).parent.mkdir(parents=True, exist_ok=True)
        (dl / a["name"]).write_bytes(resp.content)
    manifest = json.loads((dl / "manifest.json").read_text())["files"]
    assert set(manifest) == {a["name"] for a in listing} - {"manifest.json"}
    for rel, meta in manifest.items():
        assert hashlib.sha256((dl / rel).read_bytes()).hexdigest() == meta["sha256"], rel
    for d in ("model", "compact", "int8", "compact-int8"):
        assert any(rel.startswith(f"{d}/") and rel.endswith(".safetensors") for rel in manifest), d

    report = json.loads((dl / "report.json").read_text())
    art = report["artifacts"]["formats"]
    assert list(art) == FORMATS
    for fmt, a in art.items():
        weights = sum(
            m["size"]
            for rel, m in manifest.items()
            if rel.startswith(f"{a['dir']}/") and rel.endswith(".safetensors")
        )
        assert a["weights_bytes"] == weights, fmt

    dense = AutoModelForCausalLM.from_pretrained(dl / "model").eval()
    int8 = AutoModelForCausalLM.from_pretrained(dl / "int8").eval()
    packed = compact.load_model(dl / "compact")
    ids = torch.randint(0, 500, (1, 12))
    with torch.no_grad():
        want = dense(ids).logits
        assert torch.equal(packed(ids).logits, want)
        assert (int8(ids).logits - want).abs().max() < 0.05 * want.abs().max()
