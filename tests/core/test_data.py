"""Calibration and evaluation text: sources, data directory, windows, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.errors import CalibrationError, InvalidInput
from core.model import data


def test_named_dataset_from_data_dir(data_dir: Path) -> None:
    text, desc = data.load_text("wikitext2", "calibration", data_dir=data_dir)
    assert desc.endswith("wikitext-2/valid.txt") and len(text) > 1_000_000
    _, desc = data.load_text("wikitext2", "evaluation", data_dir=data_dir)
    assert desc.endswith("wikitext-2/test.txt")


def test_data_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PRUNE_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    assert data.default_data_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("PRUNE_DATA_DIR")
    assert data.default_data_dir().name == "data"


def test_missing_named_dataset_offline(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="offline"):
        data.load_text("c4", "calibration", data_dir=tmp_path)


def test_text_file_folder_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha beta")
    (tmp_path / "b.txt").write_text("gamma")
    (tmp_path / "skip.md").write_text("nope")
    text, _ = data.load_text(str(tmp_path))
    assert text == "alpha beta\n\ngamma"
    assert data.load_text(str(tmp_path / "a.txt"))[0] == "alpha beta"
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps({"content": s}) for s in ["one", "two"]) + "\n")
    assert data.load_text(str(jl), text_field="content")[0] == "one\n\ntwo"
    with pytest.raises(CalibrationError, match="no 'text' field"):
        data.load_text(str(jl))
    jl.write_text("{bad json\n")
    with pytest.raises(CalibrationError, match="invalid JSON"):
        data.load_text(str(jl), text_field="content")
    with pytest.raises(CalibrationError, match="not found"):
        data.load_text(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match=r"no \.txt files"):
        data.load_text(str(empty))


def test_windows_seeded_and_in_range() -> None:
    ids = torch.arange(1000)
    a = data.sample_windows(ids, 16, 50, seed=7)
    b = data.sample_windows(ids, 16, 50, seed=7)
    c = data.sample_windows(ids, 16, 50, seed=8)
    assert a.shape == (16, 50) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 1:] - a[:, :-1] == 1).all(), "windows are contiguous slices"
    assert data.sample_windows(torch.arange(50), 3, 50, seed=0).tolist() == [list(range(50))] * 3


def test_too_short_and_empty_text(tmp_path: Path, tiny_tokenizer) -> None:
    with pytest.raises(CalibrationError, match="need at least 100 tokens, found 40"):
        data.sample_windows(torch.arange(40), 4, 100, seed=0)
    f = tmp_path / "empty.txt"
    f.write_text("  \n")
    with pytest.raises(CalibrationError, match="empty: need at least 32 tokens, found 0"):
        data.calibration_windows(str(f), tiny_tokenizer, 4, 32, 0)
    f.write_text("a few words only")
    with pytest.raises(CalibrationError, match="need at least 512 tokens, found"):
        data.calibration_windows(str(f), tiny_tokenizer, 4, 512, 0)


def test_calibration_from_text_and_tensor(data_dir: Path, tiny_tokenizer) -> None:
    ids, desc = data.calibration_windows("wikitext2", tiny_tokenizer, 8, 64, 3, data_dir=data_dir)
    again, _ = data.calibration_windows("wikitext2", tiny_tokenizer, 8, 64, 3, data_dir=data_dir)
    assert ids.shape == (8, 64) and ids.dtype == torch.long and torch.equal(ids, again)
    assert "valid.txt" in desc
    ready = torch.randint(0, 100, (10, 16))
    got, desc = data.calibration_windows(ready, None, 4, 16, 0)
    assert desc == "tensor" and torch.equal(got, ready[:4])
    with pytest.raises(CalibrationError, match="has 10 samples, need 20"):
        data.calibration_windows(ready, None, 20, 16, 0)
    with pytest.raises(CalibrationError, match="seqlen 16, expected 32"):
        data.calibration_windows(ready, None, 4, 32, 0)


def test_seqlen_resolution() -> None:
    assert data.resolve_seqlen(None, 8192) == 2048
    assert data.resolve_seqlen(None, 256) == 256
    assert data.resolve_seqlen(None, None) == 2048
    assert data.resolve_seqlen(128, 256) == 128
    with pytest.raises(InvalidInput, match="exceeds the model's context length 256"):
        data.resolve_seqlen(512, 256)
