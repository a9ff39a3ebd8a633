"""Every list and string of a job request is bounded, and the body limit follows from the bounds."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, ValidationError

from core.spec import MAX_IGNORE, MAX_IGNORE_CHARS, MAX_NM_M, MAX_TASKS, MAX_VARIANTS
from jobs import bounds
from jobs.settings import Settings
from jobs.spec import JobRequest


def test_every_list_and_string_has_a_bound() -> None:
    rows, largest = bounds.bounds()  # raises Unbounded on any list or string without one
    got = {(path, kind): bound for path, kind, bound in rows}
    assert got[("prune.ignore", "items")] == MAX_IGNORE
    assert got[("prune.ignore[]", "chars")] == MAX_IGNORE_CHARS
    assert got[("evaluation.tasks", "items")] == MAX_TASKS
    assert got[("sweep.sparsities", "items")] == MAX_VARIANTS
    assert got[("webhook.url", "chars")] == 2048
    assert got[("webhook.events", "items")] == 3
    assert {p for p, _ in got} >= {
        "model.source",
        "calibration.source",
        "evaluation.source",
        "model.gguf_file",
    }
    assert Settings().max_body == bounds.max_body() >= largest


def test_a_field_without_a_bound_is_found() -> None:
    class Future(BaseModel):
        labels: list[str] = []

    with pytest.raises(bounds.Unbounded, match="labels"):
        bounds.bounds(Future)

    class FutureString(BaseModel):
        note: str = ""

    with pytest.raises(bounds.Unbounded, match="note"):
        bounds.bounds(FutureString)


def test_validator_bounds_hold() -> None:
    """The strings bounded by a validator, not the schema: the longest accepted value fits, one longer
    is refused."""
    base = {"model": {"source": "m"}}
    longest = {
        "prune.pattern": [f"{MAX_NM_M - 1}:{MAX_NM_M}", "unstructured"],
        "outputs.max_shard_size": ["999999KB"],
        "evaluation.tasks[]": ["t" * 64],
    }
    for path, values in longest.items():
        assert all(len(v) <= bounds.VALIDATED[path] for v in values)
    refused = [
        {"prune": {"pattern": "unstructured!"}},
        {"prune": {"pattern": f"1:{MAX_NM_M + 1}"}},
        {"outputs": {"max_shard_size": "9999999KB"}},
        {"evaluation": {"tasks": ["t" * 65]}},
        {"outputs": {"formats": ["dense", "compact", "int8", "compact-int8", "dense"]}},
        {"webhook": {"url": "http://x", "events": ["completed", "completed"]}},
    ]
    for extra in refused:
        with pytest.raises(ValidationError):
            JobRequest.model_validate({**base, **extra})


def test_the_largest_request_is_accepted_and_one_more_pattern_is_not() -> None:
    tasks = [f"t{i}" + "t" * 62 for i in range(MAX_TASKS)]
    body = bounds.largest_request("/m", "/t.txt", tasks, "https://example.org/")
    raw = json.dumps(body, indent=2)
    assert len(raw) <= bounds.max_body()
    req = JobRequest.model_validate_json(raw)
    assert len(req.prune.ignore) == MAX_IGNORE and len(req.variants()) == MAX_VARIANTS
    body["prune"]["ignore"].append("model.layers.99.*")
    with pytest.raises(ValidationError, match="at most 128 items"):
        JobRequest.model_validate(body)
    body["prune"]["ignore"] = ["x" * (MAX_IGNORE_CHARS + 1)]
    with pytest.raises(ValidationError, match="at most 256 characters"):
        JobRequest.model_validate(body)
