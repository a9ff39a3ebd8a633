"""One spec file through both command lines: `python -m core prune --spec` (in process) and
`prunectl submit --spec` against the real stack (Redis, uvicorn API, Celery worker) give the same
masks (issue 23)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from core.cli import main as core_main
from prunectl.cli import main as prunectl_main
from tests import tiny_models
from tests.service_fixtures import Service, service  # noqa: F401

pytestmark = pytest.mark.e2e


def _masks(model_dir: Path) -> dict[str, list[bool]]:
    tensors = load_file(str(model_dir / "model.safetensors"))
    return {k: (t == 0).flatten().tolist() for k, t in tensors.items() if k.endswith("proj.weight")}


def test_one_spec_file_gives_the_same_masks_through_both_clis(service: Service, tmp_path: Path) -> None:  # noqa: F811
    model = tiny_models.save("llama", tmp_path / "tiny")
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"model:\n  source: {model}\nprune:\n  method: wanda\n  pattern: '2:4'\n"
        "calibration:\n  source: wikitext2\n  nsamples: 4\n  seqlen: 32\nevaluation:\n  enabled: false\n"
    )
    flags = ["--method", "ria", "--ria-alpha", "0.7"]  # flags override the file on both CLIs

    core_out = tmp_path / "core-out"
    assert core_main(["prune", "--spec", str(spec), *flags, "--quiet", "--out", str(core_out)]) == 0
    report = json.loads((core_out / "report.json").read_text())

    out, err, dest = io.StringIO(), io.StringIO(), tmp_path / "dl"
    argv = [
        "--url",
        service.api_url,
        "--json",
        "submit",
        "--spec",
        str(spec),
        *flags,
        "--wait",
        "--download",
        str(dest),
    ]
    assert prunectl_main(argv, out, err) == 0, err.getvalue()
    job = json.loads(out.getvalue())
    assert job["request"]["prune"] == {**job["request"]["prune"], "method": "ria", "ria_alpha": 0.7}

    served = json.loads((dest / "report.json").read_text())
    assert served["spec"] == report["spec"]
    core_masks, served_masks = _masks(core_out / "model"), _masks(dest / "model")
    assert len(core_masks) == 7 * 2  # every projection of the tiny model's two blocks
    assert core_masks == served_masks
    assert all(sum(m) == len(m) // 2 for m in core_masks.values())  # 2:4
