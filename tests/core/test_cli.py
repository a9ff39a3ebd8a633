"""``python -m core``: exit codes, one-line errors, JSON on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import cli
from tests.tiny_models import REPO


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--out", "o"], "--model"),
        (["prune", "--model", "m", "--out", "o", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["prune", "--model", "m", "--out", "o", "--pattern", "2:4", "--sparsity", "0.3"], "contradicts"),
        (["prune", "--model", "m", "--out", "o", "--method", "nope"], "prune.method"),
        (["prune", "--model", "m", "--out", "o", "--nsamples", "x"], "invalid int value"),
        (["prune", "--model", "m", "--out", "o", "--nsamples", "0"], "calibration.nsamples"),
        (["prune", "--model", "m", "--out", "o", "--pattern", "2:4", "--variant"], "variant"),
        (["prune", "--model", "/does/not/exist", "--out", "o"], "model path not found"),
        (["eval", "--model", "/does/not/exist"], "model path not found"),
        (["frobnicate"], "invalid choice"),
        (["prune", "--model", "m", "--out", "o", "--stream", "sometimes"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_one_line(argv, message, tmp_path: Path, capsys) -> None:
    argv = [str(tmp_path / a) if a == "o" else a for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "o").exists()


def test_subprocess_prune_and_eval(tiny_model_dir, small_text: Path, tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    model = tiny_model_dir("gpt_neox")
    cmd = [sys.executable, "-m", "core", "prune", "--model", str(model), "--pattern", "2:4"]
    cmd += ["--calibration", str(small_text), "--eval-source", str(small_text)]
    cmd += ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--out", str(out)]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["sparsity"]["nm_ok"] is True and report["evaluation"]["windows"] == 2
    assert "[pruning]" in res.stderr and "block 2/2" in res.stderr
    assert (out / "model" / "config.json").is_file()

    cmd = [
        sys.executable,
        "-m",
        "core",
        "eval",
        "--model",
        str(out / "model"),
        "--eval-source",
        str(small_text),
    ]
    res = subprocess.run(
        [*cmd, "--eval-seqlen", "32", "--eval-windows", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr
    ev = json.loads(res.stdout)
    assert ev["windows"] == 2 and ev["ppl"] == pytest.approx(report["evaluation"]["pruned_ppl"], rel=1e-4)
    assert ev["sparsity"] == pytest.approx(0.5)

    res = subprocess.run(
        [sys.executable, "-m", "core", "prune", "--model", str(model), "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "not empty" in res.stderr


def test_stream_flag() -> None:
    args = cli.build_parser().parse_args(["prune", "--model", "m", "--out", "o", "--stream", "always"])
    assert cli.spec_from_args(args).model.stream == "always"
    args = cli.build_parser().parse_args(["prune", "--model", "m", "--out", "o"])
    assert cli.spec_from_args(args).model.stream == "auto"


def test_exported_weights_get_the_umask_mode_like_every_file(tmp_path: Path, capsys) -> None:
    """Issue 13, item 11: model.safetensors gets the same umask-derived mode as every other file
    (it was 0600). Library bars under --quiet: tests/core/test_quiet.py."""
    import os

    from core.cli import main as core_main
    from tests import tiny_models

    model = tiny_models.save("llama", tmp_path / "tiny")
    text = tmp_path / "small.txt"
    text.write_text((tiny_models.WIKITEXT / "valid.txt").read_text(encoding="utf-8")[:20_000])
    old = os.umask(0o022)
    try:
        code = core_main(
            ["prune", "--model", str(model), "--pattern", "2:4", "--calibration", str(text),
             "--nsamples", "4",
             "--seqlen", "32", "--no-eval", "--quiet", "--out", str(tmp_path / "out")]
        )  # fmt: skip
    finally:
        os.umask(old)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "[pruning]" not in err  # our own progress lines are silenced
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert modes["model.safetensors"] == 0o644
    assert set(modes.values()) == {0o644}, modes


def test_a_refused_engine_variable_exits_2_naming_it(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PRUNE_HESSIAN_LIMIT_BYTES": "16G"}
    cmd = [sys.executable, "-m", "core", "prune", "--model", "/does/not/exist", "--out", str(tmp_path / "o")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip() == (
        "error: invalid configuration: PRUNE_HESSIAN_LIMIT_BYTES='16G': Input should be a valid integer, "
        "unable to parse string as an integer"
    )
