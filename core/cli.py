"""``python -m core``: prune a model, inspect what would be pruned, measure perplexity, unpack.

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
from typing import Any, NoReturn

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["build_parser", "main", "spec_from_args"]


class UsageError(Exception):
    """Bad command-line arguments (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``prune`` and ``eval``."""
    p = _Parser(
        prog="python -m core",
        description="Prune Service engine: prune LLMs with Wanda, SparseGPT, magnitude.",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pr = sub.add_parser("prune", help="prune a model and write model/, report.json, report.md, manifest.json")
    pr.add_argument("--model", required=True, help="Hugging Face directory, .gguf file, or hub id (online)")
    pr.add_argument("--gguf-file", help="GGUF file name inside --model (a directory)")
    pr.add_argument("--method", default="wanda", help="wanda | magnitude | sparsegpt (default wanda)")
    pr.add_argument("--sparsity", type=float, help="fraction pruned per layer (default 0.5, or 1-N/M)")
    pr.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    pr.add_argument("--variant", action="store_true", help="Wanda's appendix variant (unstructured wanda)")
    pr.add_argument(
        "--ignore", action="append", default=[], help="fnmatch pattern of layers to keep dense (repeat)"
    )
    pr.add_argument("--calibration", default="wikitext2", help="wikitext2 | c4 | text file | folder | .jsonl")
    pr.add_argument("--text-field", default="text", help="JSONL field holding the text")
    pr.add_argument("--nsamples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument("--seqlen", type=int, help="tokens per window (default min(2048, model context))")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="calibration samples per forward (default: ~1024 tokens on the CPU, 8 on CUDA)",
    )
    pr.add_argument("--blocksize", type=int, default=128, help="SparseGPT column block")
    pr.add_argument("--percdamp", type=float, default=0.01, help="SparseGPT dampening")
    pr.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    pr.add_argument("--device", default="cpu", help="cpu | cuda")
    pr.add_argument(
        "--stream",
        choices=("auto", "always", "never"),
        default="auto",
        help="prune block by block from the safetensors files (auto: when the checkpoint is large "
        "for the available RAM; streaming runs skip perplexity evaluation)",
    )
    pr.add_argument("--eval-data", default="wikitext2", help="evaluation text (wikitext2 | c4 | file)")
    pr.add_argument("--eval-seqlen", type=int, help="evaluation window length (default: calibration seqlen)")
    pr.add_argument("--eval-windows", type=int, help="at most this many evaluation windows")
    pr.add_argument("--no-eval", action="store_true", help="skip perplexity evaluation")
    pr.add_argument("--no-dense-eval", action="store_true", help="skip the dense baseline perplexity")
    pr.add_argument("--no-model", action="store_true", help="do not export the pruned model (report only)")
    pr.add_argument("--max-shard-size", default="2GB", help="safetensors shard size (e.g. 500MB)")
    pr.add_argument("--data-dir", help="data directory for named datasets (default: PRUNE_DATA_DIR, ...)")
    pr.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    pr.add_argument("--quiet", action="store_true", help="no progress on stderr")

    pr.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=("dense", "compact", "int8", "compact-int8"),
        help="model artifact to write (repeat; default dense): docs/formats.md",
    )

    ins = sub.add_parser(
        "inspect", help="print what would be pruned (blocks, layers, experts), prune nothing"
    )
    ins.add_argument("--model", required=True, help="Hugging Face directory, .gguf file, or hub id (online)")
    ins.add_argument("--gguf-file", help="GGUF file name inside --model (a directory)")
    ins.add_argument("--ignore", action="append", default=[], help="fnmatch pattern of layers to keep dense")
    ins.add_argument("--prune-routers", action="store_true", help="count MoE routers/gates as pruned")
    ins.add_argument("--json", action="store_true", help="print the full description as JSON")

    un = sub.add_parser("unpack", help="restore a compact directory as a standard Hugging Face directory")
    un.add_argument("dir", help="compact (or compact-int8) directory")
    un.add_argument("out", help="output directory (must not exist or be empty)")

    ev = sub.add_parser("eval", help="perplexity of a model on a text")
    ev.add_argument("--model", required=True, help="Hugging Face directory, .gguf file, or hub id")
    ev.add_argument("--gguf-file")
    ev.add_argument("--data", default="wikitext2", help="wikitext2 | c4 | text file | folder | .jsonl")
    ev.add_argument("--text-field", default="text")
    ev.add_argument("--seqlen", type=int, help="window length (default min(2048, model context))")
    ev.add_argument("--windows", type=int, help="at most this many windows")
    ev.add_argument("--batch-size", type=int, default=1, help="windows per forward")
    ev.add_argument("--dtype", default="float32")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--data-dir")
    return p


def spec_from_args(args: argparse.Namespace) -> Any:
    """Build and validate the :class:`core.spec.RunSpec` of a ``prune`` command."""
    from core.spec import RunSpec, check_prunes_something

    spec = RunSpec.model_validate(
        {
            "model": {
                "source": args.model,
                "gguf_file": args.gguf_file,
                "dtype": args.dtype,
                "device": args.device,
                "stream": args.stream,
            },
            "prune": {
                "method": args.method,
                "sparsity": args.sparsity,
                "pattern": args.pattern,
                "variant": args.variant,
                "ignore": args.ignore,
                "batch_size": args.batch_size,
                "blocksize": args.blocksize,
                "percdamp": args.percdamp,
            },
            "calibration": {
                "source": args.calibration,
                "text_field": args.text_field,
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "seed": args.seed,
            },
            "evaluation": {
                "enabled": not args.no_eval,
                "source": args.eval_data,
                "text_field": args.text_field,
                "seqlen": args.eval_seqlen,
                "max_windows": args.eval_windows,
                "dense_baseline": not args.no_dense_eval,
            },
            "outputs": {
                "model": not args.no_model,
                "max_shard_size": args.max_shard_size,
                "formats": args.formats or ["dense"],
            },
        }
    )
    try:
        check_prunes_something(spec.prune)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return spec


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
    from core.export import check_out_dir

    if args.quiet:
        from core.quiet import silence_progress_bars

        silence_progress_bars()
    spec = spec_from_args(args)
    check_out_dir(args.out)
    from core.pipeline import run

    report = run(spec, args.out, on_progress=_progress_printer(args.quiet), data_dir=args.data_dir)
    print(json.dumps(report.to_json(), indent=2))
    return 0


def _cmd_unpack(args: argparse.Namespace) -> int:
    import time

    from core.export import staging_dir
    from core.formats import compact

    t0 = time.perf_counter()
    with staging_dir(args.out) as tmp:
        header = compact.unpack(args.dir, tmp)
    took = round(time.perf_counter() - t0, 3)
    print(json.dumps({"out": str(args.out), "tensors": len(header["tensors"]), "unpack_s": took}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from core.describe import describe_model, format_text
    from core.spec import ModelSpec

    desc = describe_model(
        ModelSpec(source=args.model, gguf_file=args.gguf_file), routers=args.prune_routers, ignore=args.ignore
    )
    print(json.dumps(desc, indent=2) if args.json else format_text(desc), end="\n" if args.json else "")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import time

    from core import data, evaluate
    from core.loading import load_model, model_context
    from core.spec import ModelSpec

    if args.windows is not None and args.windows < 1:
        raise UsageError("--windows must be at least 1")
    if args.seqlen is not None and args.seqlen < 2:
        raise UsageError("--seqlen must be at least 2")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    mspec = ModelSpec(source=args.model, gguf_file=args.gguf_file, dtype=args.dtype, device=args.device)
    t0 = time.perf_counter()
    loaded = load_model(mspec)
    seqlen = data.resolve_seqlen(args.seqlen, model_context(loaded.model))
    text, source = data.load_text(args.data, "evaluation", args.text_field, args.data_dir)
    ids = data.tokenize(loaded.tokenizer, text)
    t1 = time.perf_counter()
    res = evaluate.perplexity(loaded.model, ids, seqlen, args.windows, args.batch_size)
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
    from core.settings import ConfigError

    try:
        args = build_parser().parse_args(argv)
        if args.command == "prune":
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
