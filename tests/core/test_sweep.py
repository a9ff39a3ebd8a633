"""Sweeps: the spec's variants, and a real sweep run on a tiny model (one load, one dense
evaluation, one calibration capture; each variant pruned from the dense weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from core.errors import InvalidInput
from core.progress import Progress
from core.run import pipeline, sweep
from core.spec import RunSpec


def body(source: str | Path, sweep: dict | None, gate: dict | None = None, **prune) -> dict:
    b: dict = {
        "model": {"source": str(source)},
        "prune": {"method": "wanda", **prune},
        "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
        "evaluation": {"max_windows": 2, "generations": 0},
    }
    if sweep is not None:
        b["sweep"] = sweep
    if gate is not None:
        b["gate"] = gate
    return b


def labels(**sweep) -> list[str]:
    return [label for label, _ in RunSpec.model_validate(body("m", sweep)).variants()]


def test_variants_combine_methods_patterns_and_sparsities() -> None:
    assert labels(sparsities=[0.3, 0.5]) == ["wanda-0.3", "wanda-0.5"]
    assert labels(patterns=["unstructured", "2:4"], methods=["wanda", "magnitude"]) == [
        "wanda-0.5", "wanda-2of4", "magnitude-0.5", "magnitude-2of4"]  # fmt: skip
    spec = RunSpec.model_validate(body("m", {"patterns": ["2:4", "4:8"]}))
    assert [(p.pattern, p.target_sparsity) for _, p in spec.variants()] == [("2:4", 0.5), ("4:8", 0.5)]
    assert RunSpec.model_validate(body("m", None)).variants()[0][0] == "wanda-0.5"


@pytest.mark.parametrize(
    ("sweep", "prune", "match"),
    [
        ({}, {}, "at least one"),
        ({"sparsities": [0.0]}, {}, r"in \(0, 1\)"),
        ({"sparsities": [0.5, 0.5]}, {}, "must not repeat"),
        ({"patterns": ["3:2"]}, {}, "1 <= N < M"),
        ({"sparsities": [0.3]}, {"pattern": "2:4"}, "add 'unstructured'"),
        ({"patterns": ["2:4"]}, {"variant": True}, "sweep variant wanda 2:4: variant=true"),
        ({"sparsities": [i / 20 for i in range(1, 19)]}, {}, "at most 16"),
        ({"methods": ["nope"]}, {}, "Input should be"),
    ],
)
def test_bad_sweeps_are_refused(sweep: dict, prune: dict, match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RunSpec.model_validate(body("m", sweep, **prune))


def test_sweep_with_weights_on_disk_equals_in_memory(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    """One run path: a sweep in streaming mode (each variant pruned from the input checkpoint,
    evaluated block by block from disk) gives the in-memory sweep's tensors and perplexities."""
    src = tiny_model_dir("llama")
    reports = {}
    for stream in ("always", "never"):
        b = body(src, {"sparsities": [0.3, 0.6]})
        b["model"]["stream"] = stream
        reports[stream] = pipeline.run(RunSpec.model_validate(b), tmp_path / stream, data_dir=data_dir)
    disk, mem = reports["always"], reports["never"]
    assert disk.streaming["used"] is True and mem.streaming["used"] is False
    assert disk.evaluation.dense_ppl == pytest.approx(mem.evaluation.dense_ppl, rel=1e-5)
    for a, b in zip(disk.sweep.variants, mem.sweep.variants, strict=True):
        assert a.label == b.label and a.pruned_ppl == pytest.approx(b.pruned_ppl, rel=1e-5)
        wa = _weights(tmp_path / "always" / "variants" / a.label / "model")
        wb = _weights(tmp_path / "never" / "variants" / b.label / "model")
        assert set(wa) == set(wb) and all(torch.equal(wa[n], wb[n]) for n in wb), a.label


def _weights(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_sweep_run(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    src = tiny_model_dir("llama")
    events: list[Progress] = []
    gate = {"min_sparsity": 0.45, "max_ppl_ratio": 1000.0}
    spec = RunSpec.model_validate(body(src, {"sparsities": [0.5, 0.3, 0.7]}, gate))
    out = tmp_path / "sweep"
    report = pipeline.run(spec, out, events.append, data_dir=data_dir)

    sw = report.sweep
    assert [v.label for v in sw.variants] == ["wanda-0.5", "wanda-0.3", "wanda-0.7"]
    assert [v.target for v in sw.variants] == [0.5, 0.3, 0.7]
    assert [v.sparsity for v in sw.variants] == pytest.approx([0.5, 0.3, 0.7], abs=0.02)  # floor per row
    assert sw.captures == 1  # calibration arguments captured once for the three variants
    assert sw.headline == "wanda-0.7" and sw.chosen_by_gate and report.gate.variant == "wanda-0.7"
    assert [v.gate.passed for v in sw.variants] == [True, False, True]
    assert report.variant == "wanda-0.7" and report.sparsity.overall == sw.variants[2].sparsity
    # dense perplexity measured once, pruned perplexity once per variant
    dense = [p for p in events if p.message.startswith("dense perplexity")]
    assert dense and all(p.variant is None for p in dense)
    assert {p.variant for p in events if "pruned perplexity" in p.message} == {v.label for v in sw.variants}
    assert {p.variant for p in events if p.stage == "pruning" and p.block} == {v.label for v in sw.variants}
    assert "dense_eval_s" in report.timings and report.timings["restore_s"] >= 0
    fracs = [p.fraction for p in events]
    assert fracs == sorted(fracs) and fracs[-1] == 1.0

    for v in sw.variants:
        vdir = out / v.dir
        vrep = json.loads((vdir / "report.json").read_text())
        assert vrep["variant"] == v.label and vrep["spec"]["prune"]["sparsity"] == v.target
        assert vrep["spec"]["sweep"] is None and vrep["evaluation"]["pruned_ppl"] == v.pruned_ppl
        assert (vdir / "model" / "config.json").is_file()
    top = json.loads((out / "report.json").read_text())
    assert top["sweep"]["headline"] == "wanda-0.7" and top["spec"]["sweep"]["sparsities"] == [0.5, 0.3, 0.7]
    assert (out / "plots" / "sweep_ppl.png").read_bytes()[:4] == b"\x89PNG"
    md = (out / "report.md").read_text()
    assert "## Sweep" in md and "| wanda-0.3 | wanda | unstructured | 0.3 |" in md
    assert "Chosen variant: **wanda-0.7**" in md and "](plots/sweep_ppl.png)" in md
    assert "sweep_ppl" in (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    assert "variants/wanda-0.3/model/config.json" in manifest

    # each variant is pruned from the dense weights: the same as a single run at its sparsity
    single = RunSpec.model_validate(body(src, None, sparsity=0.3))
    pipeline.run(single, tmp_path / "single", data_dir=data_dir)
    a, b = _weights(out / "variants" / "wanda-0.3" / "model"), _weights(tmp_path / "single" / "model")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_sweep_gate_missed_keeps_the_sparsest(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    spec = RunSpec.model_validate(
        body(tiny_model_dir("llama"), {"sparsities": [0.3, 0.6]}, {"max_pruned_ppl": 1.0}, method="magnitude")
    )
    spec = spec.model_copy(update={"outputs": spec.outputs.model_copy(update={"model": False})})
    report = pipeline.run(spec, tmp_path / "o", data_dir=data_dir)
    assert report.gate.passed is False and report.gate.variant is None
    assert report.sweep.headline == "magnitude-0.6" and not report.sweep.chosen_by_gate
    assert "No variant passes the gate." in (tmp_path / "o" / "report.md").read_text()


def test_fanned_out_sweep_equals_the_serial_one(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    """Each variant run alone (`variant=`), then gathered: the same variant artifacts, sweep table,
    gate and headline as the serial sweep; the manifest lists every variant's files."""
    src = tiny_model_dir("llama")
    gate = {"min_sparsity": 0.45, "max_ppl_ratio": 1000.0}
    spec = RunSpec.model_validate(body(src, {"sparsities": [0.5, 0.3, 0.7]}, gate))
    serial = pipeline.run(spec, tmp_path / "serial", data_dir=data_dir)

    root = tmp_path / "gathered"
    reports = []
    for label, _ in spec.variants():
        events: list[Progress] = []
        rep = pipeline.run(spec, root / "variants" / label, events.append, data_dir=data_dir, variant=label)
        reports.append(rep)
        assert rep.variant == label and rep.sweep is None and "load_s" in rep.timings
        assert {p.variant for p in events if p.stage == "pruning" and p.block} == {label}
        assert [p.fraction for p in events][-1] == 1.0
        a = _weights(root / "variants" / label / "model")
        b = _weights(tmp_path / "serial" / "variants" / label / "model")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        mine = json.loads((root / "variants" / label / "report.json").read_text())
        theirs = json.loads((tmp_path / "serial" / "variants" / label / "report.json").read_text())
        for key in ("spec", "sparsity", "layers", "evaluation", "gate", "verdict", "variant"):
            assert mine[key] == theirs[key], key
    report = sweep.gather(spec, spec, reports, root)

    def table(r):
        return [v.model_dump(exclude={"prune_s"}) for v in r.sweep.variants]

    assert table(report) == table(serial) and report.gate == serial.gate
    assert report.sweep.headline == serial.sweep.headline == "wanda-0.7" and report.sweep.captures == 3
    assert report.timings["load_s"] == pytest.approx(sum(r.timings["load_s"] for r in reports))
    top = json.loads((root / "report.json").read_text())
    assert top["sweep"]["headline"] == "wanda-0.7" and (root / "plots" / "sweep_ppl.png").is_file()
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    serial_manifest = json.loads((tmp_path / "serial" / "manifest.json").read_text())["files"]
    assert sorted(manifest) == sorted(serial_manifest)
    with pytest.raises(InvalidInput, match="not one of"):
        pipeline.run(spec, tmp_path / "bad", data_dir=data_dir, variant="wanda-0.9")
