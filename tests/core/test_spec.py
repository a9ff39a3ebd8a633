"""core.spec: the validation rules every entry point shares (issue 13, item 8)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from core.spec import MAX_NM_M, PruneSpec, RunSpec, check_prunes_something, parse_pattern, shard_bytes


@pytest.mark.parametrize("good", ["2:4", "4:8", "1:2", f"1:{MAX_NM_M}", f"{MAX_NM_M - 1}:{MAX_NM_M}"])
def test_nm_patterns_accepted(good: str) -> None:
    n, m = parse_pattern(good)
    assert f"{n}:{m}" == good


@pytest.mark.parametrize(
    "bad", ["2:4\n", "2:4 ", " 2:4", "２:４", "2:٤", "02:4", "0:4", "4:4", "5:4", f"1:{MAX_NM_M + 1}",
            "1:1000000000000", "2:", ":4", "2-4", "Unstructured"],
)  # fmt: skip
def test_nm_patterns_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pattern(bad)
    with pytest.raises(ValidationError):
        PruneSpec(pattern=bad)


def test_strict_types() -> None:
    with pytest.raises(ValidationError):
        PruneSpec.model_validate({"sparsity": "0.5"})
    with pytest.raises(ValidationError):
        RunSpec.model_validate({"model": {"source": "/m"}, "calibration": {"nsamples": "8"}})
    with pytest.raises(ValidationError):
        RunSpec.model_validate_json('{"model": {"source": "/m"}, "evaluation": {"enabled": "yes"}}')
    assert PruneSpec.model_validate({"sparsity": 1 / 2}).target_sparsity == 0.5
    spec = RunSpec.model_validate_json('{"model": {"source": "/m"}, "prune": {"pattern": "2:4"}}')
    assert spec.prune.nm == (2, 4)


@pytest.mark.parametrize("size,nbytes", [("1KB", 1000), ("500MB", 500 * 10**6), ("2GB", 2 * 10**9)])
def test_shard_sizes(size: str, nbytes: int) -> None:
    assert shard_bytes(size) == nbytes


@pytest.mark.parametrize("size", ["0KB", "0GB", "5mb", "５MB", "5MB\n", "-1GB", "1TB", ""])
def test_bad_shard_sizes(size: str) -> None:
    with pytest.raises(ValidationError):
        RunSpec.model_validate({"model": {"source": "/m"}, "outputs": {"max_shard_size": size}})


def test_runs_that_prune_nothing_are_refused() -> None:
    for prune in (PruneSpec(sparsity=0.0), PruneSpec(pattern="2:4", ignore=["*"]), PruneSpec(ignore=["*?"])):
        with pytest.raises(ValueError, match="nothing"):
            check_prunes_something(prune)
    check_prunes_something(PruneSpec(ignore=["lm_head", "model.layers.0.*"]))
