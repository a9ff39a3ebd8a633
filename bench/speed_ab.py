"""Engine vs THE BASELINE on the 2:4 headline, interleaved: robust to a machine whose speed drifts.

Usage: python bench/speed_ab.py [--rounds 3] [--nsamples 32] [--old-rev 24c91af] [--out FILE]

One process loads SmolLM2-135M once, then alternates baseline and engine runs (each on a fresh deep
copy of the dense model, the same calibration windows), ``--rounds`` times, and reports every time,
the medians and the ratio of medians. Masks of the first round are compared layer by layer.

``--old-rev REV``: also time the engine of an earlier commit in the same rounds. Its ``core/`` is
extracted with ``git archive`` into a temporary directory as the package ``core_old`` (its
``core`` imports rewritten), so both engines run in one process on the same copies and windows;
the order of the runs rotates from round to round.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.baseline_wanda import prune_wanda_baseline  # noqa: E402
from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir, spec_flags  # noqa: E402
from bench.speed import compare, timed, zero_patterns  # noqa: E402
from core.model import data  # noqa: E402
from core.model.loading import load_model  # noqa: E402
from core.run import engine  # noqa: E402
from core.spec import ModelSpec, PruneSpec  # noqa: E402


def commit() -> str:
    try:
        out = subprocess.check_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], text=True)
        return out.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def old_engine(rev: str, root: Path):
    """``prune`` of commit ``rev``'s engine, imported as the package ``core_old`` from ``root``."""
    tar = root / "core.tar"
    with tar.open("wb") as f:
        subprocess.run(["git", "-C", str(REPO), "archive", rev, "core"], stdout=f, check=True)
    with tarfile.open(tar) as t:
        t.extractall(root, filter="data")
    (root / "core").rename(root / "core_old")
    pattern = re.compile(r"^(\s*)(from|import) core(\b)", re.M)
    for py in (root / "core_old").rglob("*.py"):
        py.write_text(pattern.sub(r"\1\2 core_old\3", py.read_text()))
    sys.path.insert(0, str(root))
    nested = (root / "core_old" / "run" / "engine.py").exists()  # today's sub-packages or the flat layout
    return importlib.import_module("core_old.run.engine" if nested else "core_old.engine").prune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    spec_flags(ap, {"calibration.nsamples": 32, "calibration.seqlen": 512})
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--old-rev", default=None, help="also time this commit's engine (e.g. 24c91af)")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    prune_old = old_engine(args.old_rev, Path(tmp.name)) if args.old_rev else None

    loaded = load_model(ModelSpec(source=str(smollm2_dir()), gguf_file=SMOLLM2_FILE, dtype="float32"))
    dense, tok = loaded.model.eval(), loaded.tokenizer
    cal, source = data.calibration_windows(
        "wikitext2", tok, args.nsamples, args.seqlen, seed=0, data_dir=data_dir()
    )
    spec = PruneSpec(method="wanda", pattern="2:4")
    runs = {
        "baseline": lambda m: prune_wanda_baseline(m, cal, spec.target_sparsity, 2, 4),
        "engine": lambda m: engine.prune(m, cal, spec),
    }
    if prune_old is not None:
        runs["old_engine"] = lambda m: prune_old(m, cal, spec)
    times: dict[str, list[float]] = {k: [] for k in runs}
    masks: dict[str, dict] = {}
    names = list(runs)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        patterns = {}
        for name in order:
            model = copy.deepcopy(dense)
            _, t = timed(runs[name], model)
            times[name].append(round(t, 2))
            if r == 0:
                patterns[name] = zero_patterns(model)
            del model
        if r == 0:
            masks = {k: compare(v, patterns["baseline"]) for k, v in patterns.items() if k != "baseline"}
        del patterns
        print(f"round {r}: " + ", ".join(f"{k} {times[k][-1]} s" for k in order), file=sys.stderr, flush=True)
    base_s, eng_s, old_s = times["baseline"], times["engine"], times.get("old_engine", [])
    mb, me = statistics.median(base_s), statistics.median(eng_s)

    def per_round(num: list[float], den: list[float]) -> list[float]:
        return [n / d for n, d in zip(num, den, strict=True)]

    def rounded(xs: list[float]) -> list[float]:
        return [round(x, 3) for x in xs]

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
        "speedup_per_round": rounded(per_round(base_s, eng_s)),
        "masks": masks,
        "old_engine": (
            {
                "rev": args.old_rev,
                "engine_s": old_s,
                "median_engine_s": statistics.median(old_s),
                "speedup_of_medians": round(mb / statistics.median(old_s), 3),
                "speedup_per_round": rounded(per_round(base_s, old_s)),
                # paired by round, which cancels the machine's drift: > 1 means the current engine
                # was slower than the old one in that round
                "current_over_old_per_round": rounded(per_round(eng_s, old_s)),
                "median_current_over_old": round(statistics.median(per_round(eng_s, old_s)), 3),
            }
            if prune_old is not None
            else None
        ),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
