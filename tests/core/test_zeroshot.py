"""Zero-shot tasks through lm-evaluation-harness: whole-model and block by block (a tiny local task)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from core.errors import TaskError
from core.evaluation import tasks, zeroshot
from core.run import pipeline
from core.spec import RunSpec

TASKS = Path(__file__).resolve().parents[1] / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A data directory: the shared WikiText-2 plus the tiny task folders of tests/data."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2").symlink_to(data_dir / "wikitext-2")
    shutil.copytree(TASKS, root / tasks.TASKS_DIR)
    return root


def test_unknown_or_broken_tasks_are_named(task_data: Path, tmp_path: Path) -> None:
    with pytest.raises(TaskError, match=r"'nope'.*hub is offline"):
        zeroshot.resolve("nope", task_data, online=False)
    broken = tmp_path / tasks.TASKS_DIR / "tiny_mc"
    shutil.copytree(task_data / tasks.TASKS_DIR / "tiny_mc", broken)
    (broken / "test.jsonl").unlink()
    with pytest.raises(TaskError, match=r"'tiny_mc': data file .*test.jsonl not found"):
        zeroshot.resolve("tiny_mc", tmp_path, online=False)
    assert "no data file" in tasks.submit_problem("tiny_mc", tmp_path, offline=True)
    assert "hub is offline" in tasks.submit_problem("nope", task_data, offline=True)
    assert tasks.submit_problem("nope", task_data, offline=False) is None
    assert tasks.submit_problem("tiny_mc", task_data, offline=True) is None


@torch.no_grad()
def oracle_accuracy(model, tok, rows: list[dict]) -> float:  # type: ignore[no-untyped-def]
    """Accuracy by summed continuation log-likelihood, computed here directly."""
    right = 0
    for r in rows:
        scores = []
        for choice in r["choices"]:
            ctx = tok(r["question"], add_special_tokens=False).input_ids
            whole = tok(r["question"] + choice, add_special_tokens=False).input_ids
            logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        right += int(max(range(len(scores)), key=scores.__getitem__) == r["answer"])
    return right / len(rows)


def test_tasks_run_on_the_loaded_model(tiny_model_dir, task_data: Path, tmp_path: Path, monkeypatch) -> None:
    import transformers

    loads: list[str] = []
    real = transformers.AutoModelForCausalLM.from_pretrained.__func__

    def counting(cls, *a, **kw):  # type: ignore[no-untyped-def]
        loads.append(str(a[0]) if a else "?")
        return real(cls, *a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(counting))
    src = tiny_model_dir("llama")
    spec = RunSpec.model_validate(
        {
            "model": {"source": str(src)},
            "prune": {"method": "wanda", "pattern": "2:4"},
            "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
            "evaluation": {"max_windows": 2, "generations": 0, "tasks": ["tiny_mc"]},
            "outputs": {"model": False},
        }
    )
    out = tmp_path / "o"
    report = pipeline.run(spec, out, data_dir=task_data)
    assert len(loads) == 1, loads  # the harness wrapped the loaded model, nothing was re-read

    [score] = report.evaluation.tasks
    assert (score.task, score.metric, score.samples) == ("tiny_mc", "acc", 8)
    assert score.source.startswith("local: ")
    rows = [json.loads(line) for line in (task_data / tasks.TASKS_DIR / "tiny_mc" / "test.jsonl").open()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    dense = real(transformers.AutoModelForCausalLM, src).eval()
    assert score.dense == pytest.approx(oracle_accuracy(dense, tok, rows))
    assert 0.0 <= score.pruned <= 1.0 and report.timings["tasks_s"] > 0
    md = (out / "report.md").read_text()
    assert "## Zero-shot tasks (lm-evaluation-harness)" in md and "| tiny_mc | acc |" in md
    assert "tiny_mc" in (out / "report.html").read_text()


def test_missing_task_fails_the_run_naming_it(tiny_model_dir, task_data: Path, tmp_path: Path) -> None:
    spec = RunSpec.model_validate(
        {
            "model": {"source": str(tiny_model_dir("llama"))},
            "calibration": {"source": "wikitext2", "nsamples": 2, "seqlen": 32},
            "evaluation": {"max_windows": 1, "tasks": ["no_such_task"]},
        }
    )
    with pytest.raises(TaskError, match="'no_such_task'"):
        pipeline.run(spec, tmp_path / "o", data_dir=task_data)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_tasks_block_by_block_equal_the_whole_model(tiny_model_dir, task_data: Path, family: str) -> None:
    """The harness scoring logits computed block by block (weights onloaded one block at a time)
    gives the whole-model forward's scores; the logits themselves agree to float rounding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.evaluation import block_eval

    src = tiny_model_dir(family)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    tok = AutoTokenizer.from_pretrained(src)
    task = zeroshot.resolve("tiny_mc", task_data, online=False)
    calls: list[tuple[int, int]] = []

    def forward(ids: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(ids.shape))
        parts: list[torch.Tensor] = []
        block_eval.forward_rows(model, ids, 3, lambda _b, logits: parts.append(logits), max_device_memory=1)
        return torch.cat(parts)

    whole = zeroshot.evaluate(model, tok, [task], None)
    blockwise = zeroshot.evaluate(model, tok, [task], None, forward=forward, device="cpu")
    assert calls and blockwise == whole
    ids = torch.randint(0, model.config.vocab_size, (5, 17))
    with torch.no_grad():
        assert torch.allclose(forward(ids), model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_tasks_with_weights_on_disk(tiny_model_dir, task_data: Path, tmp_path: Path) -> None:
    """A checkpoint pruned with its weights on disk gets its zero-shot scores (dense from the input,
    pruned from the staged output), equal to the in-memory run's."""
    src = tiny_model_dir("llama")
    reports = {}
    for stream in ("never", "always"):
        spec = RunSpec.model_validate(
            {
                "model": {"source": str(src), "stream": stream},
                "prune": {"method": "wanda", "pattern": "2:4"},
                "calibration": {"source": "wikitext2", "nsamples": 4, "seqlen": 32},
                "evaluation": {"max_windows": 2, "generations": 0, "tasks": ["tiny_mc"]},
            }
        )
        reports[stream] = pipeline.run(spec, tmp_path / stream, data_dir=task_data)
    assert reports["always"].streaming["used"] and not reports["never"].streaming["used"]
    [disk], [memory] = reports["always"].evaluation.tasks, reports["never"].evaluation.tasks
    assert (disk.dense, disk.pruned, disk.samples) == (memory.dense, memory.pruned, memory.samples)
