"""The recovery stage (core.run.recovery): zeros kept after the merge on several families (one MoE),
both modes; the run's report; no training on the evaluation text; cancel; resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.errors import Cancelled, InvalidInput
from core.methods.masks import check_nm
from core.model import families
from core.run import engine, pipeline
from core.run.recovery import TrainText, batch_indices, lr_at, recover
from core.spec import PruneSpec, RecoverySpec, RunSpec
from tests import tiny_models

REPO = Path(__file__).resolve().parents[2]


def _pruned(family: str, pattern: str) -> tuple[torch.nn.Module, PruneSpec]:
    torch.manual_seed(0)
    model = tiny_models.build(family)
    vocab = int((getattr(model.config, "text_config", None) or model.config).vocab_size)
    prune = PruneSpec(method="wanda", pattern=pattern)
    engine.prune(model, torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0)), prune)
    return model, prune


@pytest.mark.parametrize("mode", ["masked", "lora"])
@pytest.mark.parametrize(
    ("family", "pattern"),
    [("llama", "2:4"), ("gpt2", "2:4"), ("qwen3_moe", "2:4"), ("mixtral", "unstructured")],
)
def test_recovery_keeps_every_zero(
    family: str, pattern: str, mode: str, tiny_tokenizer, small_text: Path, data_dir: Path
) -> None:
    model, prune = _pruned(family, pattern)
    targets = families.prunable_targets(model)
    before = {n: t.get_weight() for n, t in targets.items()}
    lora = {"rank": 4} if mode == "lora" else {}
    spec = RecoverySpec(enabled=True, mode=mode, steps=4, batch=2, seqlen=32, lr=5e-3, warmup_steps=0, **lora)
    where = TrainText(str(small_text), data_dir=data_dir, eval_source="wikitext2")
    info = recover(model, tiny_tokenizer, spec, prune, where, 32)
    assert info.steps == 4 and info.tokens == 4 * 2 * 32 and len(info.losses) == 4
    assert info.check.zeros_kept and info.check.rows_ok
    assert info.check.nm_ok is (True if pattern == "2:4" else None)
    changed = 0
    for name, t in families.prunable_targets(model).items():
        w, w0 = t.get_weight(), before[name]
        assert torch.equal(w[w0 == 0], torch.zeros_like(w[w0 == 0])), name  # every pruned weight exactly 0
        assert torch.equal((w == 0).sum(1) >= (w0 == 0).sum(1), torch.ones(w.shape[0], dtype=torch.bool))
        if pattern == "2:4":
            assert check_nm(w, 2, 4), name
        changed += int((w != w0).sum())
    assert changed > 0  # it did train
    assert not any(p.__class__.__name__ == "ParametrizationList" for p in model.modules())  # merged
    assert all(p.requires_grad for p in model.parameters())


def test_schedule_and_order_are_pure() -> None:
    spec = RecoverySpec(enabled=True, steps=10, lr=1e-3, warmup_steps=2)
    lrs = [lr_at(s, 10, spec) for s in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    seen = [i for s in range(5) for i in batch_indices(s, 2, 10, 7)]
    assert sorted(seen) == list(range(10))  # one pass covers every window once
    assert batch_indices(3, 2, 10, 7) == batch_indices(3, 2, 10, 7) != batch_indices(3, 2, 10, 8)


def test_training_on_evaluation_text_refused(tiny_tokenizer, data_dir: Path, small_text: Path) -> None:
    model, prune = _pruned("llama", "2:4")
    spec = RecoverySpec(enabled=True, steps=1, batch=1, seqlen=32)
    test_txt = str(data_dir / "wikitext-2" / "test.txt")
    with pytest.raises(InvalidInput, match="evaluation text"):
        recover(
            model,
            tiny_tokenizer,
            spec,
            prune,
            TrainText(test_txt, data_dir=data_dir, eval_source="wikitext2"),
            32,
        )
    with pytest.raises(InvalidInput, match="evaluation text"):  # the same text under another name
        recover(
            model,
            tiny_tokenizer,
            spec,
            prune,
            TrainText(str(small_text), data_dir=data_dir, eval_source=str(small_text)),
            32,
        )


def _spec(model_dir: Path, steps: int = 6, **recovery) -> RunSpec:
    return RunSpec.model_validate(
        {
            "model": {"source": str(model_dir)},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
            "evaluation": {"source": "wikitext2", "max_windows": 4},
            "outputs": {"max_shard_size": "100KB"},
            "gate": {"max_pruned_ppl": 1e9},
            "recovery": {"enabled": True, "steps": steps, "batch": 2, "lr": 3e-3, **recovery},
        }
    )


def test_run_reports_recovery(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    events = []
    out = tmp_path / "out"
    report = pipeline.run(_spec(tiny_model_dir("llama")), out, events.append, data_dir=data_dir)
    rec, ev = report.recovery, report.evaluation
    assert rec is not None and rec.steps == 6 and rec.check.zeros_kept and rec.check.nm_ok
    assert (
        "valid.txt" in rec.source
        and ev.recovered_ppl == rec.recovered_ppl
        and rec.pruned_ppl == ev.pruned_ppl
    )
    assert ev.final_ppl == ev.recovered_ppl and report.gate.checks[0].value == ev.recovered_ppl
    assert report.sparsity.nm_ok  # the exported, merged model is still 2:4
    steps = [e for e in events if e.stage == "recovering" and "loss" in e.message]
    assert len(steps) == 6 and "ETA" in steps[-1].message
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)
    assert (out / "plots" / "recovery_loss.png").is_file() and "plots/recovery_loss.png" in report.plots
    md = (out / "report.md").read_text()
    assert "## Recovery" in md and "still exactly zero: **yes**" in md
    assert {"recovery_s", "recovered_eval_s"} <= set(report.timings)
    saved = json.loads((out / "report.json").read_text())
    assert saved["recovery"]["check"]["zeros_kept"] is True


def test_cancel_mid_recovery_leaves_nothing(tiny_model_dir, data_dir: Path, tmp_path: Path) -> None:
    seen: list[str] = []
    with pytest.raises(Cancelled):
        pipeline.run(
            _spec(tiny_model_dir("llama"), steps=50),
            tmp_path / "out",
            lambda p: seen.append(p.message),
            lambda: any("recovery step 3/" in m for m in seen),
            data_dir=data_dir,
        )
    assert list(tmp_path.iterdir()) == []
    assert not any("recovery step 4/" in m for m in seen)  # stopped between steps


CHILD = """
import json, sys
from pathlib import Path
from core.run import pipeline
from core.spec import RunSpec
spec = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
def show(p):
    print(p.message, flush=True)
report = pipeline.run(spec, sys.argv[2], show, data_dir=sys.argv[4], resume_dir=sys.argv[3])
print("RESUMED", report.recovery.resumed_from_step, flush=True)
"""


def _child(spec_file: Path, out: Path, resume: Path, data_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(spec_file), str(out), str(resume), str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted((out / "model").glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("mode", ["masked", "lora"])
def test_sigkill_mid_recovery_resumes_to_same_weights(
    mode: str, tiny_model_dir, data_dir: Path, tmp_path: Path
) -> None:
    lora = {"mode": "lora", "rank": 4} if mode == "lora" else {}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        _spec(tiny_model_dir("qwen3_moe"), steps=12, checkpoint_every=2, **lora).model_dump_json()
    )
    ref = _child(spec_file, tmp_path / "ref", tmp_path / "resume-ref", data_dir)
    assert ref.wait(timeout=600) == 0

    first = _child(spec_file, tmp_path / "out", tmp_path / "resume", data_dir)
    assert first.stdout is not None
    for line in first.stdout:  # killed like a lost worker once step 7 is done (checkpoint at step 6)
        if "recovery step 7/" in line:
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL and not (tmp_path / "out").exists()
    assert (tmp_path / "resume" / "recovery" / "recovery.pt").is_file()

    second = _child(spec_file, tmp_path / "out", tmp_path / "resume", data_dir)
    lines, _ = second.communicate(timeout=600)
    assert second.returncode == 0
    assert "RESUMED 6" in lines and "recovery step 7/12" in lines and "recovery step 6/12" not in lines
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "resume").exists()  # cleared on success


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({"enabled": True, "lr": float("nan")}, "lr"),
        ({"enabled": True, "lr": float("inf")}, "lr"),
        ({"steps": 3}, "recovery.enabled = true"),
        ({"enabled": True, "rank": 4}, "only apply to mode 'lora'"),
        ({"enabled": True, "source": "x" * 1025}, "source"),
        ({"enabled": True, "batch": 0}, "batch"),
        ({"enabled": True, "mode": "qlora"}, "mode"),
    ],
)
def test_spec_refusals(body: dict, says: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=says):
        RecoverySpec.model_validate(body)


def test_spec_budget_and_streaming() -> None:
    assert RecoverySpec(enabled=True).max_steps(512) == 100
    assert RecoverySpec(enabled=True, tokens=10_000, batch=2).max_steps(512) == 10  # ceil(10000 / 1024)
    assert RecoverySpec(enabled=True, tokens=10_000, steps=3, batch=2).max_steps(512) == 3
    assert RunSpec.model_validate({"model": {"source": "m"}}).recovery.enabled is False
    with pytest.raises(ValueError, match="in-memory"):
        RunSpec.model_validate({"model": {"source": "m", "stream": "always"}, "recovery": {"enabled": True}})
