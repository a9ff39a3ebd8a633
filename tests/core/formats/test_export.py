"""``outputs.formats`` through ``core.run.pipeline.run``: every artifact, its size and perplexity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.artifacts.formats import compact
from core.run import pipeline
from core.spec import OutputSpec, RunSpec
from tests.core.formats.test_compact import assert_bit_identical, tensors


def spec(source: Path, formats: list[str], pattern: str = "2:4") -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": {"source": str(source)},
            "prune": {"method": "wanda", "pattern": pattern},
            "calibration": {"nsamples": 4, "seqlen": 32},
            "evaluation": {"max_windows": 3},
            "outputs": {"formats": formats},
        }
    )


def test_all_formats(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    formats = ["dense", "compact", "int8", "compact-int8"]
    report = pipeline.run(spec(tiny_model_dir("llama"), formats), tmp_path / "out", data_dir=data_dir)
    out = tmp_path / "out"
    art = report.artifacts
    assert list(art["formats"]) == formats
    for fmt, d in {
        "dense": "model",
        "compact": "compact",
        "int8": "int8",
        "compact-int8": "compact-int8",
    }.items():
        assert (out / d).is_dir() and art["formats"][fmt]["dir"] == d
    sizes = {f: a["weights_bytes"] for f, a in art["formats"].items()}
    assert sizes["compact-int8"] < sizes["int8"] < sizes["compact"] < sizes["dense"]  # fp32 tiny model
    assert art["formats"]["dense"]["ratio_to_dense_fp16"] == pytest.approx(2.0, rel=0.01)
    pruned = report.evaluation.pruned_ppl
    for fmt in ("int8", "compact-int8"):
        a = art["formats"][fmt]
        assert a["pruned_fp_ppl"] == pruned and a["ppl"] == pytest.approx(pruned, rel=0.05)
        assert a["quantized_layers"] == len(report.sparsity.layers)
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for d in ("model", "compact", "int8", "compact-int8"):
        assert any(k.startswith(f"{d}/") for k in manifest)
    assert f"compact/{compact.HEADER}" in manifest
    compact.unpack(out / "compact", tmp_path / "u")
    assert_bit_identical(tensors(out / "model"), tensors(tmp_path / "u"))
    assert json.loads((out / "report.json").read_text())["artifacts"] == art
    assert "| compact-int8 | `compact-int8/` |" in (out / "report.md").read_text()


def test_compact_only_has_no_dense_directory(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    report = pipeline.run(
        spec(tiny_model_dir("llama"), ["compact"], "unstructured"), tmp_path / "o", data_dir=data_dir
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
        "compact",
        "manifest.json",
        "plots",
        "report.html",
        "report.json",
        "report.md",
    ]
    assert list(report.artifacts["formats"]) == ["compact"]
    model = compact.load_model(tmp_path / "o" / "compact")
    zeros = sum(int((m.weight == 0).sum()) for n, m in model.named_modules() if n.endswith("proj"))
    total = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("proj"))
    assert zeros / total == pytest.approx(0.5, abs=0.01)


def test_formats_are_validated() -> None:
    assert OutputSpec().formats == ["dense"]
    with pytest.raises(ValidationError, match="repeat"):
        OutputSpec(formats=["compact", "compact"])
    with pytest.raises(ValidationError):
        OutputSpec(formats=["zip"])
    with pytest.raises(ValidationError):
        OutputSpec(formats=[])
