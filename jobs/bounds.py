"""The bound of every list and string of a job request, read from its JSON schema, and the request
body limit derived from them (`PRUNE_MAX_BODY`'s default).

A string is bounded by `maxLength` or an enum/const, a list by `maxItems`, and the few whose validator
bounds them (a regular expression, a no-repeats rule) by `VALIDATED`. `bounds()` raises on any
unbounded one, so a future field without a bound fails `tests/jobs/test_bounds.py` instead of reaching
the store.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from core.spec import MAX_NM_M, TASK_NAME
from jobs.spec import JobRequest

VALIDATED: dict[str, int] = {
    "prune.pattern": len("unstructured"),  # or N:M with 1 <= N < M <= MAX_NM_M
    "sweep.patterns[]": len("unstructured"),
    "outputs.max_shard_size": len("999999KB"),  # 1 to 6 digits and KB, MB or GB
    "evaluation.tasks[]": 64,  # core.spec.TASK_NAME
    "outputs.formats": 4,  # distinct values of a 4-value Literal (a validator refuses repeats)
}
"""Lists and strings whose validator (not the schema) bounds them: items or characters."""
assert len(f"{MAX_NM_M - 1}:{MAX_NM_M}") <= VALIDATED["prune.pattern"]
assert TASK_NAME.pattern.endswith("{0,63}")
CHAR_BYTES = 6
"""Most bytes one character of a JSON string can take (a `\\uXXXX` escape)."""
NUMBER_BYTES = 32
WHITESPACE_BYTES = 16 * 1024
"""Allowance for indentation and spaces between tokens (a pretty-printed spec file)."""


class Unbounded(ValueError):
    """A list or string of the request schema has no bound."""


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _walk(node: dict[str, Any], path: str, defs: dict[str, Any], rows: list[tuple[str, str, int]]) -> int:
    """Append (path, 'items'|'chars', bound) rows under `node`; return its largest JSON size in bytes."""
    node = _resolve(node, defs)
    options = node.get("anyOf") or node.get("oneOf")
    if options:
        return max(_walk(o, path, defs, rows) for o in options)
    if "enum" in node or "const" in node:
        values = node.get("enum", [node.get("const")])
        return max(len(json.dumps(v)) for v in values)
    kind = node.get("type")
    if kind == "string":
        bound = node.get("maxLength", VALIDATED.get(path))
        if bound is None:
            raise Unbounded(f"string {path} has no maxLength")
        rows.append((path, "chars", bound))
        return 2 + CHAR_BYTES * bound
    if kind == "array":
        most = node.get("maxItems", VALIDATED.get(path))
        if most is None:
            raise Unbounded(f"list {path} has no maxItems")
        rows.append((path, "items", most))
        return 2 + most * (_walk(node.get("items", {}), path + "[]", defs, rows) + 1)
    if kind == "object":
        props = node.get("properties", {})
        if node.get("additionalProperties", False) is not False:
            raise Unbounded(f"object {path} takes any key")
        return 2 + sum(
            len(k) + 3 + _walk(v, f"{path}.{k}".lstrip("."), defs, rows) + 1 for k, v in props.items()
        )
    return {"boolean": 5, "null": 4}.get(kind or "", NUMBER_BYTES)


def bounds(model: type[BaseModel] = JobRequest) -> tuple[list[tuple[str, str, int]], int]:
    """((path, 'items'|'chars', bound) of every list and string of `model`, its largest JSON in bytes);
    raise Unbounded when one has no bound."""
    schema = model.model_json_schema()
    rows: list[tuple[str, str, int]] = []
    size = _walk(schema, "", schema.get("$defs", {}), rows)
    return sorted(set(rows)), size


def max_body() -> int:
    """The request body limit: the largest JSON a bounded request can take, plus whitespace, in KiB."""
    size = bounds()[1] + WHITESPACE_BYTES
    return -(-size // 1024) * 1024


def _pad_path(path: str, chars: int) -> str:
    """`path` lengthened to `chars` characters with `/.` segments (the same file)."""
    assert len(path) <= chars, path
    pad = chars - len(path)
    return path + "/." * (pad // 2) + ("/" if pad % 2 else "")


def largest_request(model: str, text: str, tasks: list[str], webhook_url: str) -> dict[str, Any]:
    """A job body with every list full and every string at its bound (sources padded with `/.`);
    `tasks` are existing task names (at most 8) and `webhook_url` a reachable base URL. The worst case
    a stored record can hold: `bench/read_cost.py` measures reading it."""
    rows = {path: bound for path, _, bound in bounds()[0]}
    width = rows["prune.ignore[]"]
    ignore = [f"model.layers.{i}.never.matches.{'x' * width}"[:width] for i in range(rows["prune.ignore"])]
    formats = ["dense", "compact", "int8", "compact-int8"]
    return {
        "model": {"source": _pad_path(model, rows["model.source"])},
        "prune": {"method": "wanda", "ignore": ignore},
        "calibration": {
            "source": _pad_path(text, rows["calibration.source"]),
            "nsamples": 4,
            "seqlen": 32,
            "text_field": "t" * rows["calibration.text_field"],
        },
        "evaluation": {
            "source": _pad_path(text, rows["evaluation.source"]),
            "max_windows": 2,
            "text_field": "t" * rows["evaluation.text_field"],
            "tasks": tasks[: rows["evaluation.tasks"]],
        },
        "outputs": {"model": False, "formats": formats, "max_shard_size": "999999KB"},
        "gate": {"max_ppl_ratio": 10.0, "max_pruned_ppl": 1e6, "min_sparsity": 0.1},
        "sweep": {"sparsities": [round(0.05 * (i + 1), 2) for i in range(rows["sweep.sparsities"])]},
        "webhook": {
            "url": webhook_url + "a" * (rows["webhook.url"] - len(webhook_url)),
            "events": ["started", "progress", "completed"],
        },
    }
