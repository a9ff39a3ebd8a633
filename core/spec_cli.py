"""Command-line options generated from the run spec's own fields: the one flag table of every CLI.

`add_spec_options` walks a pydantic spec model (`core.spec.RunSpec`, or `jobs.spec.JobRequest` for
prunectl) recursively and adds one argparse option per leaf field: nested models become option
groups, ``Literal`` fields get their values as choices, booleans get ``--x/--no-x``, lists are
repeatable (``--ignore a --ignore b`` or ``--ignore a b``); help texts are the field descriptions.
A field added to the spec is picked up with no change here. Flag names follow one rule (section
prefix + field name with hyphens) plus the short `FLAG_NAMES` table, so one field has one flag
everywhere; `flag_for` names it. `spec_body` turns the parsed flags into a nested dict laid over a
``--spec FILE`` (flags win). Pure pydantic and argparse: no torch.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

__all__ = [
    "DEST_PREFIX",
    "FLAG_NAMES",
    "SECTION_PREFIX",
    "SpecOption",
    "add_deprecated",
    "add_spec_options",
    "flag_for",
    "load_spec_file",
    "spec_body",
    "spec_options",
]

DEST_PREFIX = "spec:"
"""argparse ``dest`` of a spec option: this prefix + the field's dotted path (``spec:prune.sparsity``)."""

SECTION_PREFIX: dict[str, str] = {
    "model": "",
    "prune": "",
    "calibration": "",
    "outputs": "",
    "evaluation": "eval-",
}
"""Flag prefix of each top-level section; a section not listed (``gate``, ``sweep``, ``webhook``, any
section added later) uses its own name: ``--gate-min-sparsity``, ``--sweep-methods``. A prefixed
section's ``enabled`` field is the bare prefix: ``--eval/--no-eval``, ``--recovery/--no-recovery``."""

FLAG_NAMES: dict[str, str] = {
    "model.source": "model",
    "calibration.source": "calibration",
    "calibration.text_field": "calibration-text-field",
    "evaluation.max_windows": "eval-windows",
    "evaluation.dense_baseline": "dense-baseline",
    "outputs.model": "export-model",
    "outputs.formats": "format",
}
"""Flags whose name is not the rule's (docs/core.md "Command-line flags" lists every flag)."""


@dataclass(frozen=True)
class SpecOption:
    """One leaf field of a spec model and its command-line flag."""

    path: str
    """Dotted field path, e.g. ``prune.sparsity``."""
    flag: str
    """The option string, e.g. ``--sparsity``."""
    info: FieldInfo
    section: type[BaseModel]
    """The model holding the field (validates one value on its own)."""
    kind: Literal["value", "bool", "list"]
    scalar: Any
    """Type of one value (the list's item type for lists)."""
    choices: tuple[str, ...] | None

    @property
    def name(self) -> str:
        """The field's own name."""
        return self.path.rsplit(".", 1)[-1]


def _strip_optional(ann: Any) -> Any:
    """``X | None`` -> ``X`` and ``Annotated[X, ...]`` -> ``X`` (constraints are checked by the
    field's model)."""
    if typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _model_of(ann: Any) -> type[BaseModel] | None:
    ann = _strip_optional(ann)
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _choices(ann: Any) -> tuple[str, ...] | None:
    if typing.get_origin(ann) is Literal:
        return tuple(str(a) for a in typing.get_args(ann))
    return None


def flag_for(path: str) -> str:
    """The flag of a field path: ``FLAG_NAMES``, else section prefix + field name (``_`` -> ``-``)."""
    if path in FLAG_NAMES:
        return "--" + FLAG_NAMES[path]
    section, _, rest = path.partition(".")
    prefix = SECTION_PREFIX.get(section, f"{section}-")
    if rest == "enabled" and prefix:  # a section's own switch: --eval / --no-eval, --recovery
        return "--" + prefix.rstrip("-")
    return "--" + prefix + rest.replace(".", "-").replace("_", "-")


def spec_options(model: type[BaseModel], only: Sequence[str] | None = None) -> list[SpecOption]:
    """Every leaf field of ``model`` (recursively) as a `SpecOption`; ``only``: these paths."""
    out: list[SpecOption] = []

    def walk(m: type[BaseModel], prefix: str) -> None:
        for name, info in m.model_fields.items():
            path = f"{prefix}{name}"
            sub = _model_of(info.annotation)
            if sub is not None:
                walk(sub, path + ".")
                continue
            ann = _strip_optional(info.annotation)
            kind: Literal["value", "bool", "list"] = "value"
            if ann is bool:
                kind = "bool"
            elif typing.get_origin(ann) is list:
                kind, ann = "list", _strip_optional(typing.get_args(ann)[0])
            out.append(SpecOption(path, flag_for(path), info, m, kind, ann, _choices(ann)))

    walk(model, "")
    seen: dict[str, str] = {}
    for o in out:
        if o.flag in seen:
            raise RuntimeError(
                f"spec fields {seen[o.flag]} and {o.path} would both be {o.flag}: "
                "give one a name in core.spec_cli.FLAG_NAMES"
            )
        seen[o.flag] = o.path
    if only is not None:
        by_path = {o.path: o for o in out}
        return [by_path[p] for p in only]
    return out


def _help(opt: SpecOption, default: Any = None) -> str:
    text = (opt.info.description or "").strip()
    if default is None and not opt.info.is_required():
        default = opt.info.get_default(call_default_factory=True)
    if default is not None and default != []:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text += f" (default: {shown})"
    if opt.kind == "list":
        text += " Repeatable."
    # argparse %-formats help texts
    return (text + f" [{opt.path}]").strip().replace("%", "%%")


def _converter(opt: SpecOption) -> Callable[[str], Any]:
    """argparse ``type=``: parse one value, then check it against the field's own rules alone (its
    constraints and field validators; rules spanning fields are checked when the spec is built)."""
    adapter: TypeAdapter[Any] = TypeAdapter(opt.scalar)

    def parse(text: str) -> Any:
        try:
            return adapter.validate_strings(text)
        except ValidationError:
            if opt.scalar in (str, int, float, bool):
                raise ValueError(text) from None  # argparse: "invalid <type> value: 'x'"
        try:  # a structured value (a model, a mapping, a list): JSON text
            return adapter.validate_json(text)
        except ValidationError:
            raise ValueError(text) from None

    def convert(text: str) -> Any:
        if opt.choices is not None and text not in opt.choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} for {opt.path} (choose from {', '.join(opt.choices)})"
            )
        value = parse(text)
        probe = [value] if opt.kind == "list" else value
        try:
            opt.section.model_validate({opt.name: probe})
        except ValidationError as exc:
            mine = [e for e in exc.errors() if e["loc"][:1] == (opt.name,)]
            if mine:
                msg = str(mine[0]["msg"]).removeprefix("Value error, ")
                raise argparse.ArgumentTypeError(f"{opt.path}: {msg}") from None
        except Exception:  # a section validator that needs other fields: checked with the whole spec
            pass
        return value

    convert.__name__ = getattr(opt.scalar, "__name__", "value")
    return convert


def _metavar(opt: SpecOption) -> str:
    if opt.choices is not None:
        return "{" + ",".join(opt.choices) + "}"
    return opt.flag.removeprefix("--").replace("-", "_").upper()


def add_spec_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    only: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    dest: Callable[[str], str] | None = None,
) -> list[SpecOption]:
    """Add an option for every leaf field of ``model`` (or the ``only`` paths), grouped by section.
    Options default to "not given" (`spec_body` keeps only what was typed) unless ``defaults``
    gives a path its own (a benchmark's settings); ``dest`` maps a path to its attribute
    (default ``DEST_PREFIX + path``)."""
    opts = spec_options(model, only)
    defaults = defaults or {}
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in opts:
        section = opt.path.partition(".")[0] if "." in opt.path else "run"
        if section not in groups:
            doc = (opt.section.__doc__ or "").strip().splitlines()[0] if "." in opt.path else ""
            groups[section] = parser.add_argument_group(f"spec section '{section}'", doc or None)
        kw: dict[str, Any] = {
            "dest": dest(opt.path) if dest else DEST_PREFIX + opt.path,
            "default": defaults.get(opt.path, argparse.SUPPRESS),
            "help": _help(opt, defaults.get(opt.path)),
        }
        if opt.kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=_converter(opt), metavar=_metavar(opt))
            if opt.kind == "list":
                kw.update(action="extend", nargs="+")
        groups[section].add_argument(opt.flag, **kw)
    return opts


class _Deprecated(argparse.Action):
    """An old flag: warns on stderr, then does what its new flag(s) do."""

    def __init__(self, option_strings: list[str], dest: str, new: Sequence[str] = (), **kw: Any) -> None:
        self.new = list(new)
        super().__init__(option_strings, dest, **kw)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"warning: {option_string} is deprecated and will be removed; use {' and '.join(self.new)}",
            file=sys.stderr,
        )
        for flag in self.new:
            target = parser._option_string_actions[flag]
            if target.nargs != 0:  # convert and check the value as the new flag would
                values_ = parser._get_values(target, values if isinstance(values, list) else [values])
            else:
                values_ = None
            target(parser, namespace, values_, flag)


def add_deprecated(parser: argparse.ArgumentParser, renames: dict[str, Sequence[str]]) -> None:
    """Keep old flags working, hidden from ``--help``: ``{"--eval-data": ["--eval-source"]}``; the new
    flags of one old flag take the same number of values (a boolean's ``--no-x`` takes none)."""
    for old, new in renames.items():
        nargs = parser._option_string_actions[new[0]].nargs
        parser.add_argument(
            old,
            action=_Deprecated,
            new=new,
            nargs=nargs,
            help=argparse.SUPPRESS,
            default=argparse.SUPPRESS,
            dest=argparse.SUPPRESS,
        )


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = body
    for i, key in enumerate(parents):
        child = node.setdefault(key, {})
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ValueError(f"spec field {'.'.join(parents[: i + 1])!r} must be a mapping")
        node = child
    node[leaf] = value


def _given(args: argparse.Namespace) -> Iterator[tuple[str, Any]]:
    for dest, value in vars(args).items():
        if dest.startswith(DEST_PREFIX):
            yield dest.removeprefix(DEST_PREFIX), value


def spec_body(args: argparse.Namespace, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The spec as a nested dict: ``base`` (a ``--spec`` file) with every given flag laid over it
    (a flag replaces the file's value, lists included). Not validated."""
    body = copy.deepcopy(base) if base else {}
    for path, value in _given(args):
        _set(body, path, value)
    return body


def load_spec_file(path: Path) -> dict[str, Any]:
    """Read a JSON (``.json``) or YAML spec file; ValueError with a readable message."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        if Path(path).suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise ValueError(f"cannot parse {path}: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping (a run spec)")
    return data


def flag_table(model: type[BaseModel]) -> str:
    """A Markdown table of every spec field and its flag (docs/core.md is written from it)."""
    rows = ["| spec field | flag | values |", "|---|---|---|"]
    for o in spec_options(model):
        flag = f"`{o.flag}` / `--no-{o.flag[2:]}`" if o.kind == "bool" else f"`{o.flag}`"
        values = ", ".join(o.choices) if o.choices else getattr(o.scalar, "__name__", str(o.scalar))
        rows.append(f"| `{o.path}` | {flag} | {values}{' (repeatable)' if o.kind == 'list' else ''} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m core.spec_cli: the flag table of the run spec
    from core.spec import RunSpec

    print(flag_table(RunSpec))
