"""The service packages and the engine import one way down, without circles, and keep functions short.

Layers: api -> jobs -> core; worker -> jobs, core; prunectl -> jobs, core. core imports none of the
service packages, jobs neither api nor worker, and api never torch (nor anything that imports it)
nor the worker. Every import counts: at module level, inside a function or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("api", "jobs", "worker", "prunectl", "core")
FORBIDDEN: dict[str, set[str]] = {
    "core": {"api", "jobs", "worker", "prunectl"},
    "jobs": {"api", "worker", "prunectl"},
    "api": {"worker", "prunectl", "torch"},
    "worker": {"api", "prunectl"},
    "prunectl": {"api", "worker", "torch"},
}
MAX_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the checked packages, by dotted name."""
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module `name` imports (its own packages' modules by their names, others by their top
    package), wherever the import statement is. `from pkg import module` counts as importing the
    module only: the package's `__init__` runs first either way, but its lazy attributes do not."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            yield from submodules  # `from jobs import metrics` imports the module jobs.metrics
            if len(submodules) < len(node.names):  # and names defined by the package itself
                yield base


def graph() -> dict[str, set[str]]:
    """Module -> the modules it imports (internal ones by name, external ones by top package)."""
    known = modules()
    edges: dict[str, set[str]] = {}
    for name, path in known.items():
        targets = set()
        for target in imported(name, path, known):
            targets.add(target if target in known else target.split(".")[0])
        edges[name] = targets - {name}
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo.extend(edges.get(v, ()))
    return seen


def long_functions(packages: tuple[str, ...] = PACKAGES, root: Path = REPO) -> list[tuple[str, str, int]]:
    """(file, function, lines) of every function (methods and nested ones too) longer than MAX_LINES
    lines, counted from its ``def`` line to its last line."""
    out = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    n = (node.end_lineno or node.lineno) - node.lineno + 1
                    if n > MAX_LINES:
                        out.append((path.relative_to(root).as_posix(), node.name, n))
    return out


def test_the_import_graph_sees_function_level_imports() -> None:
    edges = graph()
    assert "jobs.metrics" in edges["api.metrics"]  # `from jobs import metrics`
    assert "core.run.pipeline" in edges["worker.app"]  # imported inside a function
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle() -> None:
    assert circles(graph()) == []  # core included: issue 20's split removed its last three


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_back_up_a_layer(layer: str) -> None:
    edges = graph()
    wrong = [
        (name, target)
        for name, targets in edges.items()
        if name.split(".")[0] == layer
        for target in targets
        if target.split(".")[0] in FORBIDDEN[layer]
    ]
    assert wrong == []


@pytest.mark.parametrize("layer", ["api", "prunectl"])
def test_torch_free_layers_reach_no_module_that_imports_torch(layer: str) -> None:
    edges = graph()
    starts = [name for name in edges if name.split(".")[0] == layer]
    reached = set().union(*(reachable(edges, s) for s in starts))
    assert sorted(m for m in reached if "torch" in edges.get(m, ())) == []


# core's sub-packages, bottom to top: a module may import its own floor's modules and those below only.
CORE_FLOORS: dict[str, int] = {
    "core.spec": 0, "core.settings": 0, "core.errors": 0, "core.result": 0, "core.progress": 0,
    "core.spec_cli": 0, "core.methods": 1, "core.model": 2, "core.evaluation": 3, "core.artifacts": 4,
    "core.run": 5, "core.cli": 6, "core.__main__": 6, "core": 6,
}  # fmt: skip


def core_floor(module: str) -> int:
    """The floor of the sub-package (or top-level module) `module` belongs to."""
    parts = module.split(".")
    for n in (2, 1):
        prefix = ".".join(parts[:n])
        if prefix in CORE_FLOORS and (n == 2 or module == "core"):
            return CORE_FLOORS[prefix]
    raise KeyError(f"{module}: give it a floor in CORE_FLOORS")


def test_core_subpackages_import_only_downward() -> None:
    edges = graph()
    core = {name: core_floor(name) for name in edges if name.split(".")[0] == "core"}  # KeyError: no floor
    wrong = [
        (name, target)
        for name, floor in core.items()
        for target in edges[name]
        if target in core and core[target] > floor
    ]
    assert wrong == []
    assert core_floor("core.run.engine") == 5
    with pytest.raises(KeyError):
        core_floor("core.nowhere")


def test_long_functions_counts_body_lines(tmp_path: Path) -> None:
    assert long_functions(("pkg",), root=_long_module(tmp_path)) == [("pkg/m.py", "long", MAX_LINES + 1)]


def _long_module(root: Path) -> Path:
    """A package with one function of MAX_LINES lines and one of MAX_LINES + 1."""
    (root / "pkg").mkdir()
    ok = "def ok():\n" + '    """doc."""\n' + "    x = 1\n" * (MAX_LINES - 3) + "    return x\n"
    long = "def long():\n" + "    x = 1\n" * (MAX_LINES - 1) + "    return x\n"
    (root / "pkg" / "m.py").write_text(ok + "\n\n" + long)
    return root


@pytest.mark.parametrize("package", PACKAGES)
def test_functions_are_at_most_80_lines(package: str) -> None:
    assert long_functions((package,)) == []  # core included since issue 23's split
