"""Engine vs THE BASELINE on the 2:4 headline, interleaved: robust to a machine whose speed drifts.

Usage: python bench/speed_ab.py [--rounds 3] [--nsamples 32] [--out docs/bench/speed_ab.json]

One process loads SmolLM2-135M once, then alternates baseline and engine runs (each on a fresh deep
copy of the dense model, the same calibration windows), ``--rounds`` times, and reports every time,
the medians and the ratio of medians. Masks of the first round are compared layer by layer. Run it
from a checkout (or a copy of this file placed in an older checkout) to compare engine versions
side by side in one benchmark slot.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.baseline_wanda import prune_wanda_baseline  # noqa: E402
from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir  # noqa: E402
from bench.speed import compare, timed, zero_patterns  # noqa: E402
from core import data, engine  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.spec import ModelSpec, PruneSpec  # noqa: E402


def commit() -> str:
    try:
        out = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True)
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    loaded = load_model(ModelSpec(source=str(smollm2_dir()), gguf_file=SMOLLM2_FILE, dtype="float32"))
    dense, tok = loaded.model.eval(), loaded.tokenizer
    cal, source = data.calibration_windows(
        "wikitext2", tok, args.nsamples, args.seqlen, seed=0, data_dir=data_dir()
    )
    spec = PruneSpec(method="wanda", pattern="2:4")
    base_s: list[float] = []
    eng_s: list[float] = []
    masks: dict | None = None
    for r in range(args.rounds):
        base = copy.deepcopy(dense)
        _, t = timed(prune_wanda_baseline, base, cal, spec.target_sparsity, 2, 4)
        base_s.append(round(t, 2))
        eng = copy.deepcopy(dense)
        _, t = timed(engine.prune, eng, cal, spec)
        eng_s.append(round(t, 2))
        if r == 0:
            masks = compare(zero_patterns(eng), zero_patterns(base))
        del base, eng
        print(f"round {r}: baseline {base_s[-1]} s, engine {eng_s[-1]} s", file=sys.stderr, flush=True)
    mb, me = statistics.median(base_s), statistics.median(eng_s)
    result = {
        "machine": machine(),
        "commit": commit(),
        "model": f"SmolLM2-135M ({SMOLLM2_FILE}, dequantised to fp32)",
        "calibration": {"source": source, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "pattern": "2:4",
        "rounds": args.rounds,
        "baseline_s": base_s,
        "engine_s": eng_s,
        "median_baseline_s": mb,
        "median_engine_s": me,
        "speedup_of_medians": round(mb / me, 3),
        "speedup_per_round": [round(b / e, 3) for b, e in zip(base_s, eng_s, strict=True)],
        "masks": masks,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
