"""Quality gates, verdicts and the human reports (plots, report.html, report.md) of a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.artifacts.report import verdict
from core.evaluation import gate
from core.result import Evaluation, GateOutcome
from core.run import pipeline
from core.spec import GateSpec, RunSpec


def spec(source: Path, data_dir: Path, gate_: dict | None = None, **evaluation) -> RunSpec:
    body = {
        "model": {"source": str(source)},
        "prune": {"method": "wanda", "pattern": "2:4"},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2, **evaluation},
        "outputs": {"model": False},
    }
    if gate_ is not None:
        body["gate"] = gate_
    return RunSpec.model_validate(body)


def test_gate_needs_a_limit_and_measurable_values(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="at least one"):
        GateSpec()
    with pytest.raises(ValidationError, match=r"evaluation\.enabled"):
        spec(tmp_path, tmp_path, {"max_pruned_ppl": 10}, enabled=False)
    with pytest.raises(ValidationError, match="dense_baseline"):
        spec(tmp_path, tmp_path, {"max_ppl_ratio": 2}, dense_baseline=False)
    spec(tmp_path, tmp_path, {"min_sparsity": 0.4}, enabled=False)  # sparsity needs no evaluation


def ev(dense: float | None, pruned: float | None) -> Evaluation:
    return Evaluation(
        dense_ppl=dense, pruned_ppl=pruned, windows=1, seqlen=8, tokens=8, formula="f", source="s"
    )


def test_gate_check_compares_each_limit() -> None:
    e = ev(10.0, 25.0)
    ok = gate.check(GateSpec(max_ppl_ratio=3, min_sparsity=0.5), e, 0.5)
    assert ok.passed and [c.value for c in ok.checks] == [2.5, 0.5]
    bad = gate.check(GateSpec(max_ppl_ratio=2, max_pruned_ppl=30), e, 0.5)
    assert not bad.passed and [c.passed for c in bad.checks] == [False, True]
    missing = gate.check(GateSpec(max_pruned_ppl=30), None, None)
    assert missing.model_dump() == {"passed": False, "variant": None, "checks": [
        {"name": "max_pruned_ppl", "limit": 30.0, "value": None, "passed": False}]}  # fmt: skip


def test_gate_picks_the_sparsest_passing_variant() -> None:
    yes, no = GateOutcome(passed=True, checks=[]), GateOutcome(passed=False, checks=[])
    assert gate.pick([("a", 0.3, yes), ("b", 0.5, yes), ("c", 0.7, no)]) == "b"
    assert gate.pick([("a", 0.5, yes), ("b", 0.5, yes)]) == "a"
    assert gate.pick([("a", 0.3, no)]) is None


@pytest.mark.parametrize(
    ("pruned", "label", "warning"),
    [(10.5, "good", False), (14.0, "fair", False), (25.0, "poor", False), (60.0, "damaged", True)],
)
def test_verdict_bands(pruned: float, label: str, warning: bool) -> None:
    v = verdict(ev(10.0, pruned))
    assert (v.label, v.warning) == (label, warning)
    assert v.ratio == pytest.approx(pruned / 10.0)
    assert ("badly damaged" in v.text) == warning
    assert verdict(None).label == "unknown"


def test_run_writes_plots_html_and_gate(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    out = tmp_path / "out"
    report = pipeline.run(spec(src, data_dir, {"max_ppl_ratio": 1.0001, "min_sparsity": 0.4}), out,
                          data_dir=data_dir)  # fmt: skip
    g = report.gate
    assert [c.name for c in g.checks] == ["max_ppl_ratio", "min_sparsity"]
    ratio = report.evaluation.pruned_ppl / report.evaluation.dense_ppl
    assert g.checks[0].value == pytest.approx(ratio)
    assert g.passed == (ratio <= 1.0001) and g.checks[1].passed
    assert report.verdict.ratio == pytest.approx(ratio)
    png = out / "plots" / "layer_sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from core.artifacts.report.plots import block_recon

    rows = block_recon(report.layers)
    assert [b for b, _, _ in rows] == [0, 1] and all(0 < mean <= mx for _, mean, mx in rows)
    assert (out / "plots" / "block_recon_error.png").read_bytes()[:4] == b"\x89PNG"
    assert "](plots/block_recon_error.png)" in (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "Quality gate" in html
    md = (out / "report.md").read_text()
    assert "](plots/layer_sparsity.png)" in md and "## Verdict" in md
    layer_rows = [
        ln for ln in md.split("## Layers")[1].split("</details>")[0].splitlines() if ln.startswith("| `")
    ]
    assert len(layer_rows) == len(report.layers) > 0
    name, rec = next(iter(report.layers.items()))
    cells = [c.strip() for c in layer_rows[0].split("|")[1:-1]]
    assert (
        cells[0] == f"`{name}`"
        and cells[1] == "wanda"
        and float(cells[4]) == pytest.approx(rec["sparsity"], abs=1e-4)
    )
    assert float(cells[5]) == pytest.approx(rec["recon_error"], abs=1e-4)
    gens = report.generations
    assert [g.prompt for g in gens][:1] == ["The capital of France is"] and len(gens) == 3
    assert all(isinstance(g.dense, str) and isinstance(g.pruned, str) for g in gens)
    assert "## Generations" in md and "| other |" in md
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in
            md.split("## Where the time went")[1].split("\n\n")[1].splitlines()[2:]}  # fmt: skip
    assert sum(v for k, v in rows.items() if k != "total") == pytest.approx(rows["total"], abs=0.05)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"report.html", "plots/layer_sparsity.png"} <= set(manifest["files"])


def seen_by(seen: list[str]):  # type: ignore[no-untyped-def]
    return lambda p: seen.append(p.message)


def test_dense_baseline_is_cached(tiny_model_dir, data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from core.evaluation import baseline_cache

    monkeypatch.setenv("PRUNE_BASELINE_CACHE", str(tmp_path / "cache"))
    src = tiny_model_dir("llama")
    messages: list[list[str]] = []
    reports = []
    for i in range(2):
        seen: list[str] = []
        on_progress = seen_by(seen)
        reports.append(pipeline.run(spec(src, data_dir), tmp_path / f"o{i}", on_progress, data_dir=data_dir))
        messages.append(seen)
    first, second = (r.evaluation for r in reports)
    assert first.dense_cached is False and second.dense_cached is True
    assert second.dense_ppl == first.dense_ppl and second.pruned_ppl == first.pruned_ppl
    assert any("dense perplexity: block" in m for m in messages[0])
    assert not any("dense perplexity: block" in m for m in messages[1])
    assert "dense perplexity: cached baseline" in messages[1]
    assert "cached dense baseline" in (tmp_path / "o1" / "report.md").read_text()
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    # other evaluation windows (or other weights) miss the cache
    third = pipeline.run(spec(src, data_dir, max_windows=1), tmp_path / "o2", data_dir=data_dir)
    assert third.evaluation.dense_cached is False
    monkeypatch.setenv("PRUNE_BASELINE_CACHE", "off")
    assert baseline_cache.cache_dir() is None


def test_time_breakdown_adds_up() -> None:
    from core.artifacts.report.timing import time_breakdown

    t = {"load_s": 2.0, "calibrate_s": 1.0, "dense_eval_s": 3.0, "pruned_eval_s": 3.5, "eval_s": 6.5,
         "prune_s": 4.0, "mask_s": 1.0, "export_s": 0.5, "total_s": 15.0}  # fmt: skip
    rows = dict(time_breakdown(t))
    assert rows["other"] == pytest.approx(1.0) and "eval" not in rows and "mask" not in rows
    assert sum(v for k, v in rows.items() if k != "total") == pytest.approx(rows["total"])


def test_report_says_how_many_tokens_each_expert_saw(data_dir: Path, tmp_path: Path) -> None:
    from tests import tiny_models
    from tests.core.test_engine import NEVER, _never_routed

    src = tmp_path / "moe"
    _never_routed().save_pretrained(src)
    tiny_models.tokenizer().save_pretrained(src)
    body = spec(src, data_dir).model_dump()
    body["prune"]["pattern"] = "unstructured"
    report = pipeline.run(RunSpec.model_validate(body), tmp_path / "out", data_dir=data_dir)
    experts = [e.model_dump() for e in report.experts]
    assert [e["module"] for e in experts] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    for e in experts:
        assert (
            sum(e["tokens"]) == 4 * 32 * 2 and e["tokens"][NEVER] == 0 and e["fallback_magnitude"] == [NEVER]
        )
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["experts"] == experts and len(saved["warnings"]) == 4
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Experts" in md and "## Warnings" in md
    row = next(line for line in md.splitlines() if line.startswith("| `model.layers.1.mlp.experts`"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[1] == " ".join(map(str, experts[1]["tokens"])) and cells[2] == "0" and cells[4] == str(NEVER)
