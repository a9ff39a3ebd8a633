"""Recovery after 2:4 pruning on SmolLM2-135M: perplexity against recovery tokens (issue 22).

Usage: python bench/recovery.py [--method wanda] [--mode masked] [--lr 1e-4] [--steps 64]
       [--points 8 16 32 64] [--heldout] [--out docs/bench/recovery_wanda.json]
       python bench/recovery.py --plot docs/bench/recovery_curve.png --curves a.json b.json

One process: load the GGUF model (fp32), 32 x 512 calibration windows of WikiText-2 valid (seed 0,
as bench/quality.py), prune, measure the pruned perplexity, then run :func:`core.run.recovery.recover`
and measure the perplexity again after the steps in ``--points`` (inside the progress callback,
on the weights being trained; evaluation time is excluded from the recovery time reported).

Training text: WikiText-2 valid.txt without its last 10% (``valid_head.txt`` written to a temp
dir). ``--heldout`` measures perplexity on that last 10% of valid.txt instead of test.txt: the
setting used to choose the learning rate, so test.txt never steers a choice.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir

DENSE_PPL = 24.94
"""Dense perplexity of the same evaluation (docs/results.md), drawn for reference."""


def split_valid(tmp: Path) -> tuple[Path, str]:
    """``valid_head.txt`` (first 90% of valid.txt, cut at a line) and the held-out tail's text."""
    text = (data_dir() / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n", 0, int(len(text) * 0.9)) + 1
    head = tmp / "valid_head.txt"
    head.write_text(text[:cut], encoding="utf-8")
    return head, text[cut:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="wanda", choices=["wanda", "sparsegpt"])
    ap.add_argument("--mode", default="masked", choices=["masked", "lora"])
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--points", type=int, nargs="*", default=[], help="steps after which to measure ppl")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--heldout", action="store_true", help="evaluate on valid.txt's held-out tail")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path, help="only draw ppl against recovery tokens from --curves")
    ap.add_argument("--curves", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    if args.plot:
        plot_curves([json.loads(f.read_text()) for f in args.curves], args.plot)
        return

    import torch

    from core.evaluation import evaluate
    from core.model import data
    from core.model.loading import load_model
    from core.run import engine
    from core.run.pipeline import _eval_batch
    from core.run.recovery import TrainText, recover
    from core.spec import ModelSpec, PruneSpec, RecoverySpec

    tmp = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    head, tail = split_valid(tmp)
    loaded = load_model(ModelSpec(source=str(smollm2_dir() / SMOLLM2_FILE), dtype="float32"))
    model, tok = loaded.model, loaded.tokenizer
    cal, _ = data.calibration_windows("wikitext2", tok, 32, 512, 0)
    if args.heldout:
        eval_ids, eval_name = data.tokenize(tok, tail), "valid.txt held-out last 10%"
    else:
        eval_ids, eval_name = data.tokenize(tok, data.load_text("wikitext2", "evaluation")[0]), "test.txt"
    ebatch = _eval_batch(512, int(model.config.vocab_size))

    def ppl() -> float:
        return float(evaluate.perplexity(model, eval_ids, 512, args.eval_windows, ebatch)["ppl"])

    prune = PruneSpec(method=args.method, pattern="2:4")
    t = time.perf_counter()
    engine.prune(model, cal, prune)
    prune_s = time.perf_counter() - t
    pruned = ppl()
    print(json.dumps({"pruned_ppl": pruned, "prune_s": prune_s}), file=sys.stderr, flush=True)

    lora = {"rank": args.rank} if args.mode == "lora" else {}
    spec = RecoverySpec(
        enabled=True,
        mode=args.mode,
        lr=args.lr,
        steps=args.steps,
        batch=args.batch,
        seqlen=args.seqlen,
        warmup_steps=args.warmup,
        **lora,
    )
    curve = [{"step": 0, "tokens": 0, "ppl": pruned, "recovery_s": 0.0}]
    eval_time = [0.0]
    t_start = time.perf_counter()

    def on_progress(p) -> None:
        step = round(p.fraction * args.steps)
        if step in args.points and step != args.steps:
            t_eval = time.perf_counter()
            row = {
                "step": step,
                "tokens": step * args.batch * args.seqlen,
                "ppl": ppl(),
                "recovery_s": round(t_eval - t_start - eval_time[0], 1),
                "loadavg": os.getloadavg(),
            }
            eval_time[0] += time.perf_counter() - t_eval
            curve.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)

    where = TrainText(str(head), eval_source=None if args.heldout else "wikitext2")
    info = recover(model, tok, spec, prune, where, args.seqlen, on_progress=on_progress)
    train_s = time.perf_counter() - t_start - eval_time[0]
    final = ppl()
    curve.append(
        {
            "step": info.steps,
            "tokens": info.tokens,
            "ppl": final,
            "recovery_s": round(train_s, 1),
            "loadavg": os.getloadavg(),
        }
    )
    out = {
        "bench": "recovery",
        "model": SMOLLM2_FILE,
        "method": f"{args.method} 2:4",
        "eval": f"{eval_name}, {args.eval_windows} x 512 windows",
        "recovery": spec.model_dump(mode="json"),
        "pruned_ppl": pruned,
        "recovered_ppl": final,
        "ratio": final / pruned,
        "recovery_s": round(train_s, 1),
        "s_per_step": round(train_s / max(1, info.steps), 2),
        "tokens": info.tokens,
        "trainable_params": info.trainable_params,
        "gradient_checkpointing": info.gradient_checkpointing,
        "check": info.check.model_dump(),
        "curve": curve,
        "losses": info.losses,
        "threads": torch.get_num_threads(),
        "machine": machine(),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def plot_curves(runs: list[dict], path: Path) -> None:
    """Perplexity against recovery tokens, one line per run, the dense perplexity dashed."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for run in runs:
        pts = [(c["tokens"], c["ppl"]) for c in run["curve"]]
        ax.plot(
            [t for t, _ in pts],
            [p for _, p in pts],
            "o-",
            label=f"{run['method']} + {run['recovery']['mode']}",
        )
    ax.axhline(DENSE_PPL, color="#555", linestyle="--", label=f"dense {DENSE_PPL}")
    ax.set_yscale("log")
    ax.set_xlabel("recovery tokens (WikiText-2 valid, 512-token windows)")
    ax.set_ylabel("perplexity (WikiText-2 test, 32 x 512)")
    ax.set_title("SmolLM2-135M 2:4: perplexity against recovery tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
