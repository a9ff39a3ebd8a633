"""Quality gates over the real stack: a gate that cannot pass -> prunectl exit 6, artifacts kept."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import httpx
import pytest

from prunectl.cli import EXIT_GATE, EXIT_OK, main
from tests import tiny_models
from tests.service_fixtures import Service

pytestmark = pytest.mark.e2e


def spec_file(tmp_path: Path, model: Path, gate: dict[str, float]) -> Path:
    spec = {
        "model": {"source": str(model)},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2},
        "outputs": {"model": False},
        "gate": gate,
    }
    path = tmp_path / f"spec-{len(list(tmp_path.glob('spec-*')))}.json"
    path.write_text(json.dumps(spec))
    return path


def test_gate_missed_and_passed_exit_codes(service: Service, tmp_path: Path) -> None:
    model = tiny_models.save("llama", tmp_path / "tiny")
    out, err = io.StringIO(), io.StringIO()
    dest = tmp_path / "dl"
    impossible = {"max_pruned_ppl": 1.0, "min_sparsity": 0.4}  # perplexity is never <= 1 on real text
    argv = [
        "--url",
        service.api_url,
        "--json",
        "submit",
        "--spec",
        str(spec_file(tmp_path, model, impossible)),
    ]
    code = main([*argv, "--wait", "--download", str(dest)], out, err)
    assert code == EXIT_GATE, err.getvalue()
    job = json.loads(out.getvalue())
    gate = job["summary"]["gate"]
    assert gate["passed"] is False and job["status"] == "succeeded"
    assert [(c["name"], c["passed"]) for c in gate["checks"]] == [
        ("max_pruned_ppl", False),
        ("min_sparsity", True),
    ]
    assert "missed its quality gate (max_pruned_ppl" in err.getvalue()
    # the report is kept and downloaded, and says the gate failed
    report = json.loads((dest / "report.json").read_text())
    assert report["gate"] == gate
    assert "Quality gate: FAILED" in (dest / "report.md").read_text()
    listed = httpx.get(f"{service.api_url}/v1/jobs/{job['id']}/artifacts").json()["artifacts"]
    html = next(a for a in listed if a["name"] == "report.html")
    assert hashlib.sha256((dest / "report.html").read_bytes()).hexdigest() == html["sha256"]

    out2, err2 = io.StringIO(), io.StringIO()
    easy = {"max_ppl_ratio": 100.0}
    argv = ["--url", service.api_url, "--json", "submit", "--spec", str(spec_file(tmp_path, model, easy))]
    assert main([*argv, "--wait"], out2, err2) == EXIT_OK, err2.getvalue()
    assert json.loads(out2.getvalue())["summary"]["gate"]["passed"] is True
