"""core.run.preflight: what the model's config refuses is refused before any weight loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import CalibrationError, InvalidInput
from core.run import pipeline
from core.spec import RunSpec
from tests import tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.save("llama", tmp_path_factory.mktemp("pre") / "tiny")  # hidden 64, mlp 128


def _run(tiny: Path, tmp_path: Path, **sections: dict) -> list[str]:
    """Run the pipeline expecting a refusal; return the progress messages emitted before it."""
    seen: list[str] = []
    body = {"model": {"source": str(tiny)}, "calibration": {"source": str(tiny / "config.json")}, **sections}
    spec = RunSpec.model_validate(body)
    with pytest.raises(InvalidInput) as info:
        pipeline.run(spec, tmp_path / "out", on_progress=lambda p: seen.append(p.message))
    seen.append(f"error: {info.value}")
    return seen


@pytest.mark.parametrize(
    "sections,match",
    [
        ({"prune": {"pattern": "2:3"}}, "not a multiple of M=3"),
        ({"prune": {"pattern": "1:48"}}, "not a multiple of M=48"),
        ({"calibration": {"source": "wikitxt2"}}, "wikitxt2"),
        ({"evaluation": {"source": "/no/such/text.txt"}}, "not found"),
        ({"calibration": {"source": "wikitext2", "seqlen": 100000}}, "context length"),
        ({"prune": {"ignore": ["model.layers.*"]}}, "matches all"),
    ],
)
def test_refused_before_the_model_loads(tiny: Path, tmp_path: Path, sections: dict, match: str) -> None:
    seen = _run(tiny, tmp_path, **sections)
    assert match in seen[-1]
    assert "model loaded" not in seen and not any(m.startswith("loading ") for m in seen[:-1]), seen
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_misspelt_calibration_is_a_calibration_error(tiny: Path, tmp_path: Path) -> None:
    spec = RunSpec.model_validate({"model": {"source": str(tiny)}, "calibration": {"source": "wikitxt2"}})
    with pytest.raises(CalibrationError):
        pipeline.run(spec, tmp_path / "out")


def test_cli_misspelt_calibration_exits_2_without_loading(tiny: Path, tmp_path: Path, capsys) -> None:
    from core.cli import main

    code = main(["prune", "--model", str(tiny), "--calibration", "wikitxt2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "wikitxt2" in err
    assert "model loaded" not in err
