"""bench/repro.py's tensor comparison on real safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from bench.repro import tensor_diff, thread_env


def test_tensor_diff_counts_differing_tensors_and_mask_flips(tmp_path: Path) -> None:
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0], [3.0, 0.0, 0.0, 4.0]])
    other = w.clone()
    other[0, 0], other[0, 1] = 0.5, 0.0  # one pruned weight kept instead of another
    other[1, 3] = 4.25  # same mask, another value
    for name, t in (("a", w), ("b", other)):
        (tmp_path / name).mkdir()
        save_file({"x.weight": t, "y.weight": torch.ones(3)}, str(tmp_path / name / "model.safetensors"))
    same = tensor_diff(tmp_path / "a", tmp_path / "a")
    assert same["tensors_differing"] == 0 and same["mask_flips"] == 0 and same["max_abs_diff"] == 0
    d = tensor_diff(tmp_path / "a", tmp_path / "b")
    assert d["tensors"] == 2 and d["tensors_differing"] == 1 and d["first_differing"] == ["x.weight"]
    assert d["mask_flips"] == 2 and d["mask_flip_fraction"] == 2 / 11
    assert d["max_abs_diff"] == 1.0
    assert thread_env(4) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
