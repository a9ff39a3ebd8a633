"""PruneSpec accepts or refuses every method x allocation x refine x pattern combination."""

from __future__ import annotations

import itertools

import pytest
from pydantic import ValidationError

from core.spec import METHODS, PruneSpec


@pytest.mark.parametrize(
    ("method", "allocation", "refine", "pattern"),
    list(itertools.product(METHODS, ["uniform", "owl"], ["none", "dsnot"], ["unstructured", "2:4", "4:8"])),
)
def test_every_combination_is_decided(method: str, allocation: str, refine: str, pattern: str) -> None:
    kw = {"method": method, "allocation": allocation, "refine": refine, "pattern": pattern}
    if allocation == "owl" and pattern != "unstructured":
        with pytest.raises(ValidationError, match="unstructured sparsity only"):
            PruneSpec(**kw)
        return
    spec = PruneSpec(**kw)
    assert PruneSpec.model_validate(spec.model_dump()) == spec  # defaults round-trip (worker re-validates)


def test_owl_band_must_stay_inside_unit_interval() -> None:
    PruneSpec(allocation="owl", sparsity=0.9, owl_lambda=0.08)
    with pytest.raises(ValidationError, match="lower owl_lambda"):
        PruneSpec(allocation="owl", sparsity=0.95)
    with pytest.raises(ValidationError, match="lower owl_lambda"):
        PruneSpec(allocation="owl", sparsity=0.05)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"owl_lambda": 0.1}, "allocation 'owl'"),
        ({"dsnot_threshold": 1.0}, "refine 'dsnot'"),
        ({"ria_permute": True, "pattern": "2:4"}, "method 'ria'"),
        ({"method": "ria", "ria_permute": True}, "pattern 'N:M'"),
        ({"allocation": "owl", "variant": True}, "variant"),
    ],
)
def test_ignored_or_undefined_options_are_refused(kw: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        PruneSpec(**kw)
