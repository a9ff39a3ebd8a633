"""Mask regression on the real SmolLM2-135M: save or compare every pruned layer's zero pattern.

Usage (the engine under test is whatever ``core`` resolves to, i.e. ``PYTHONPATH``):

    PYTHONPATH=/path/to/reference python bench/masks_regression.py --save ref.pt
    PYTHONPATH=$PWD python bench/masks_regression.py --compare ref.pt [--out docs/bench/masks_regression.json]
    python bench/masks_regression.py --compare ref.pt --now now.pt   # two saved dumps, no model run

Runs Wanda unstructured 50%, Wanda 2:4 and SparseGPT 2:4 (same calibration: WikiText-2 valid.txt,
``--nsamples`` x ``--seqlen``, seed 0) from fresh copies of the dense model, and records each
layer's zero pattern (packed bits). Only ``core.run.engine.prune`` and ``core.model.families``'
``prunable_linears`` / ``get_weight`` are used, which every engine version provides.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from core.model import data, families
from core.model.loading import load_model
from core.run import engine
from core.spec import ModelSpec, PruneSpec

SPECS = {
    "wanda-unstructured": PruneSpec(method="wanda"),
    "wanda-2:4": PruneSpec(method="wanda", pattern="2:4"),
    "sparsegpt-2:4": PruneSpec(method="sparsegpt", pattern="2:4"),
}


def patterns(model: torch.nn.Module) -> dict[str, bytes]:
    return {
        n: np.packbits((families.get_weight(m) == 0).numpy()).tobytes()
        for n, m in families.prunable_linears(model).items()
    }


def compare(ref: dict, got: dict, args: argparse.Namespace) -> dict:
    """Per run: layer counts and how many layers have the very same zero pattern."""
    result = {"reference": args.compare, "nsamples": args.nsamples, "seqlen": args.seqlen, "runs": {}}
    for key in SPECS:
        a, b = ref[key], got[key]
        same = [n for n in a if n in b and a[n] == b[n]]
        result["runs"][key] = {
            "layers_reference": len(a),
            "layers_now": len(b),
            "layers_identical": len(same),
            "identical": len(same) == len(a) == len(b),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--save")
    p.add_argument("--compare")
    p.add_argument("--now", help="with --compare: a dump saved by --save instead of running the engine")
    p.add_argument("--out")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    args = p.parse_args()
    if args.compare and args.now:
        _report(
            compare(
                torch.load(args.compare, weights_only=False), torch.load(args.now, weights_only=False), args
            ),
            args,
        )
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench.common import SMOLLM2_FILE, data_dir, smollm2_dir

    loaded = load_model(ModelSpec(source=str(smollm2_dir() / SMOLLM2_FILE)))
    cal, _ = data.calibration_windows(
        "wikitext2", loaded.tokenizer, args.nsamples, args.seqlen, 0, "text", data_dir()
    )
    got = {}
    for key, spec in SPECS.items():
        model = copy.deepcopy(loaded.model)
        engine.prune(model, cal, spec)
        got[key] = patterns(model)
        del model
    if args.save:
        torch.save(got, args.save)
        print(json.dumps({"saved": args.save, "layers": {k: len(v) for k, v in got.items()}}))
        return
    _report(compare(torch.load(args.compare, weights_only=False), got, args), args)


def _report(result: dict, args: argparse.Namespace) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
