"""Diagnostic: how much of SparseGPT's lead over Wanda comes from its weight update?

Runs SparseGPT's mask selection *without* the OBS weight update (the mask is chosen on a copy of
each weight, then applied to the original dense weight) on SmolLM2-135M with the same
calibration and evaluation as bench/quality.py, and prints the perplexity as JSON.

Usage: python bench/sparsegpt_update.py --pattern 2:4 [--out docs/bench/sparsegpt_update.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SMOLLM2_FILE, machine, smollm2_dir, spec_flags

SPEC_DEFAULTS = {
    "prune.pattern": "2:4",
    "calibration.nsamples": 32,
    "calibration.seqlen": 512,
    "evaluation.max_windows": 32,
}
"""This benchmark's run-spec settings, each a flag (``--pattern``, ``--eval-windows``, ...)."""


class MaskOnly:
    """Wraps a method so that it chooses its mask on a copy and never updates the weight."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[attr-defined]
        self.needs = inner.needs  # type: ignore[attr-defined]

    def prune(self, weight, stats, spec):  # same signature as Method.prune
        return self.inner.prune(weight.clone(), stats, spec)  # type: ignore[attr-defined]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    spec_flags(ap, SPEC_DEFAULTS)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from core import methods
    from core.run.pipeline import run
    from core.spec import RunSpec

    methods.REGISTRY["sparsegpt"] = MaskOnly(methods.REGISTRY["sparsegpt"])  # this process only
    spec = RunSpec.model_validate(
        {
            "model": {"source": str(smollm2_dir() / SMOLLM2_FILE)},
            "prune": {"method": "sparsegpt", "pattern": args.pattern},
            "calibration": {
                "source": "wikitext2",
                "nsamples": args.nsamples,
                "seqlen": args.seqlen,
                "seed": 0,
            },
            "evaluation": {"seqlen": args.seqlen, "max_windows": args.eval_windows, "dense_baseline": False},
            "outputs": {"model": False},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        report = run(spec, Path(tmp) / "out").to_json()
    out = {
        "benchmark": "sparsegpt mask without weight update",
        "pattern": args.pattern,
        "ppl": report["evaluation"]["pruned_ppl"],
        "sparsity": report["sparsity"]["overall"],
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "eval_windows": args.eval_windows,
        "machine": machine(),
    }
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
