"""``python -m core``: prune a model, inspect what would be pruned, measure perplexity, unpack.

Spec options are generated from `core.spec.RunSpec` (`core.spec_cli`): the same flags as
``prunectl submit``; ``prune --spec FILE`` reads a JSON/YAML spec that the flags override.

``prune`` prints the report JSON on stdout and progress on stderr; ``eval`` prints a JSON
result on stdout. Bad arguments and invalid input exit with code 2 and a one-line message on
stderr (no traceback, nothing written to ``--out``); other engine errors exit with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["build_parser", "main", "spec_from_args"]


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


RENAMED_PRUNE_FLAGS: dict[str, tuple[str, ...]] = {
    "--eval-data": ("--eval-source",),
    "--no-dense-eval": ("--no-dense-baseline",),
    "--text-field": ("--calibration-text-field", "--eval-text-field"),
    "--no-model": ("--no-export-model",),
}
"""Old ``prune`` flags, still accepted with a warning (docs/core.md "Renamed flags")."""
EVAL_FIELDS = (
    "model.source",
    "model.gguf_file",
    "model.dtype",
    "model.device",
    "evaluation.source",
    "evaluation.text_field",
    "evaluation.seqlen",
    "evaluation.max_windows",
)
RENAMED_EVAL_FLAGS: dict[str, tuple[str, ...]] = {
    "--data": ("--eval-source",),
    "--windows": ("--eval-windows",),
    "--seqlen": ("--eval-seqlen",),
    "--batch-size": ("--eval-batch-size",),
    "--text-field": ("--eval-text-field",),
}
"""Old ``eval`` flags, still accepted with a warning."""
INSPECT_FIELDS = ("model.source", "model.gguf_file", "prune.ignore", "prune.prune_routers")


def _require(parser: argparse.ArgumentParser, flag: str) -> None:
    parser._option_string_actions[flag].required = True


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``prune``, ``inspect``, ``unpack`` and ``eval``; spec options come
    from `core.spec.RunSpec` through `core.spec_cli` (the same flags as ``prunectl submit``)."""
    from core.spec import METHODS, RunSpec
    from core.spec_cli import add_deprecated, add_spec_options

    p = _Parser(
        prog="python -m core", description=f"Prune Service engine: prune LLMs with {', '.join(METHODS)}."
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser(
        "prune",
        help="prune a model and write model/, report.json, report.md, manifest.json",
        description="Every run-spec field is a flag (docs/core.md); flags override --spec.",
    )
    pr.add_argument("--spec", type=Path, help="JSON/YAML run spec; the flags below override its fields")
    pr.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    pr.add_argument("--data-dir", help="data directory for named datasets (default: PRUNE_DATA_DIR, ...)")
    pr.add_argument("--quiet", action="store_true", help="no progress on stderr")
    add_spec_options(pr, RunSpec)
    add_deprecated(pr, RENAMED_PRUNE_FLAGS)

    ins = sub.add_parser(
        "inspect", help="print what would be pruned (blocks, layers, experts), prune nothing"
    )
    add_spec_options(ins, RunSpec, INSPECT_FIELDS)
    _require(ins, "--model")
    ins.add_argument("--json", action="store_true", help="print the full description as JSON")

    un = sub.add_parser("unpack", help="restore a compact directory as a standard Hugging Face directory")
    un.add_argument("dir", help="compact (or compact-int8) directory")
    un.add_argument("out", help="output directory (must not exist or be empty)")

    ev = sub.add_parser("eval", help="perplexity of a model on a text")
    add_spec_options(ev, RunSpec, EVAL_FIELDS)
    _require(ev, "--model")
    ev.add_argument(
        "--eval-batch-size", type=int, default=1, help="evaluation windows per forward (default 1)"
    )
    ev.add_argument("--data-dir", help="data directory for named datasets (default: PRUNE_DATA_DIR, ...)")
    add_deprecated(ev, RENAMED_EVAL_FLAGS)
    return p


def spec_from_args(args: argparse.Namespace) -> Any:
    """Build and validate the :class:`core.spec.RunSpec` of a ``prune`` command: ``--spec`` with the
    given flags laid over it."""
    from core.spec import RunSpec
    from core.spec_cli import load_spec_file, spec_body

    try:
        base = load_spec_file(args.spec) if getattr(args, "spec", None) else None
        body = spec_body(args, base)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not isinstance(body.get("model"), dict) or not body["model"].get("source"):
        raise UsageError("a model is required: --model SOURCE or model.source in --spec")
    return RunSpec.model_validate(body)


def _validation_message(exc: Any) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def _progress_printer(quiet: bool) -> Any:
    if quiet:
        return None

    def show(p: Any) -> None:
        where = f" block {p.block}/{p.nblocks}" if p.block is not None else ""
        print(f"[{p.stage}] {p.fraction * 100:5.1f}%{where} {p.message}", file=sys.stderr, flush=True)

    return show


def _cmd_prune(args: argparse.Namespace) -> int:
    from core.artifacts.export import check_out_dir

    if args.quiet:
        from core.run.quiet import silence_progress_bars

        silence_progress_bars()
    spec = spec_from_args(args)
    check_out_dir(args.out)
    from core.run.pipeline import run

    report = run(spec, args.out, on_progress=_progress_printer(args.quiet), data_dir=args.data_dir)
    print(json.dumps(report.to_json(), indent=2))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    import time

    from core.artifacts.export import staging_dir
    from core.artifacts.formats import compact

    t0 = time.perf_counter()
    with staging_dir(args.out) as tmp:
        header = compact.unpack(args.dir, tmp)
    took = round(time.perf_counter() - t0, 3)
    print(json.dumps({"out": str(args.out), "tensors": len(header["tensors"]), "unpack_s": took}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from core.model.describe import describe_model, format_text
    from core.spec import ModelSpec
    from core.spec_cli import spec_body

    body = spec_body(args)
    prune = body.get("prune", {})
    desc = describe_model(
        ModelSpec.model_validate(body["model"]),
        routers=prune.get("prune_routers", False),
        ignore=prune.get("ignore", []),
    )
    print(json.dumps(desc, indent=2) if args.json else format_text(desc), end="\n" if args.json else "")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import time

    from core.evaluation import evaluate
    from core.model import data
    from core.model.loading import load_model, model_context
    from core.spec import EvalSpec, ModelSpec
    from core.spec_cli import spec_body

    if args.eval_batch_size < 1:
        raise UsageError("--eval-batch-size must be at least 1")
    body = spec_body(args)
    mspec = ModelSpec.model_validate(body["model"])
    espec = EvalSpec.model_validate(body.get("evaluation", {}))
    t0 = time.perf_counter()
    loaded = load_model(mspec)
    seqlen = data.resolve_seqlen(espec.seqlen, model_context(loaded.model))
    text, source = data.load_text(espec.source, "evaluation", espec.text_field, args.data_dir)
    ids = data.tokenize(loaded.tokenizer, text)
    t1 = time.perf_counter()
    res = evaluate.perplexity(loaded.model, ids, seqlen, espec.max_windows, args.eval_batch_size)
    res.update(
        model=loaded.source,
        source=source,
        sparsity=evaluate.sparsity_report(loaded.model)["all_linears"],
        load_s=t1 - t0,
        eval_s=time.perf_counter() - t1,
    )
    print(json.dumps(res, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    from pydantic import ValidationError

    from core.errors import CoreError, InvalidInput
    from core.settings import ConfigError, EngineSettings

    try:
        args = build_parser().parse_args(argv)
        if args.command == "prune":
            EngineSettings.from_env()  # a refused PRUNE_* variable stops the run before any work
            return _cmd_prune(args)
        if args.command == "unpack":
            return _cmd_unpack(args)
        if args.command == "inspect":
            return _cmd_inspect(args)
        return _cmd_eval(args)
    except ValidationError as exc:
        print(f"error: invalid arguments: {_validation_message(exc)}", file=sys.stderr)
        return 2
    except (UsageError, InvalidInput, ConfigError) as exc:  # ConfigError: a refused PRUNE_* value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
