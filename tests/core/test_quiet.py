"""`--quiet` silences the libraries' own progress bars too (issue 13, item 11): transformers'
"Writing model shards" and its GGUF conversion bar (a bare tqdm), each in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_models import REPO

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
GGUF_BAR = """
import sys
import transformers.modeling_gguf_pytorch_utils as gguf  # imports tqdm before anything is silenced
if sys.argv[1] == "quiet":
    from core.run.quiet import silence_progress_bars
    silence_progress_bars()
for _ in gguf.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
    pass
from transformers.utils import logging
for _ in logging.tqdm(range(3), desc="Writing model shards"):
    pass
"""


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("mode", ["loud", "quiet"])
def test_library_bars_are_silenced_even_when_tqdm_was_imported_first(mode: str) -> None:
    res = _python("-c", GGUF_BAR, mode)
    assert res.returncode == 0, res.stderr
    shown = ("Converting and de-quantizing GGUF" in res.stderr, "Writing model shards" in res.stderr)
    assert shown == ((False, False) if mode == "quiet" else (True, True)), res.stderr


def test_cli_prune_quiet_prints_nothing_on_stderr(tiny_model_dir, small_text: Path, tmp_path: Path) -> None:
    cmd = ["-m", "core", "prune", "--model", str(tiny_model_dir("llama")), "--pattern", "2:4"]
    cmd += ["--calibration", str(small_text), "--nsamples", "4", "--seqlen", "32", "--no-eval"]
    loud = _python(*cmd, "--out", str(tmp_path / "loud"))
    assert loud.returncode == 0, loud.stderr
    assert "Writing model shards" in loud.stderr and "[pruning]" in loud.stderr
    quiet = _python(*cmd, "--quiet", "--out", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert (tmp_path / "quiet" / "model" / "model.safetensors").is_file()
