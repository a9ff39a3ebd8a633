"""Perplexity of SmolLM2-135M under each method and pattern (issue #3's quality table).

Usage: python bench/quality.py --out docs/bench/quality.json [--plot docs/bench/quality.png]

Each configuration runs in its own child process so that its peak resident memory is its own.
Calibration: WikiText-2 valid.txt; evaluation: WikiText-2 test.txt (non-overlapping windows).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SMOLLM2_FILE, data_dir, machine, run_child, smollm2_dir


def configs(quick: bool) -> list[dict]:
    """The runs of the table: (label, method, pattern, sparsity, variant, nsamples)."""
    rows: list[dict] = [{"label": "dense", "method": "magnitude", "pattern": "unstructured", "sparsity": 0.0}]
    for method in ("magnitude", "wanda", "sparsegpt"):
        for pattern in ("unstructured", "4:8", "2:4"):
            sparsity = 0.5 if pattern == "unstructured" else None
            rows.append({"method": method, "pattern": pattern, "sparsity": sparsity})
    for sparsity in (0.6, 0.7):
        rows.append({"method": "wanda", "pattern": "unstructured", "sparsity": sparsity})
    for sparsity in (0.5, 0.6, 0.7):
        rows.append({"method": "wanda", "pattern": "unstructured", "sparsity": sparsity, "variant": True})
    for n in (1, 4, 16, 64):
        rows.append(
            {"method": "wanda", "pattern": "unstructured", "sparsity": 0.5, "nsamples": n, "group": "calib"}
        )
    if quick:
        rows = rows[:3]
    for r in rows:
        r.setdefault("variant", False)
        r.setdefault("group", "main")
        r.setdefault(
            "label",
            f"{r['method']}{'-variant' if r['variant'] else ''} {r['pattern']}"
            + (f" {r['sparsity']:.0%}" if r["pattern"] == "unstructured" else "")
            + (f" n={r['nsamples']}" if "nsamples" in r else ""),
        )
    return rows


def one(spec_json: str) -> None:
    """Child mode: run the pipeline once and print its report as one JSON line."""
    from core.pipeline import run
    from core.spec import RunSpec

    spec = RunSpec.model_validate_json(spec_json)
    with tempfile.TemporaryDirectory() as tmp:
        report = run(spec, Path(tmp) / "out")
    print(json.dumps(report, default=str))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/quality.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/bench/quality.png"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="three runs only (smoke test)")
    ap.add_argument("--partial", type=Path, help="JSON lines of finished rows: skip them, append new ones")
    ap.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--render", type=Path, help="only re-render --results-md from this JSON file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        one(args.one)
        return
    if args.render:
        render_markdown(json.loads(args.render.read_text()), args.results_md)
        return

    results = []
    done: dict[str, dict] = {}
    if args.partial and args.partial.exists():
        for line in args.partial.read_text().splitlines():
            row = json.loads(line)
            done[row["label"]] = row
    for cfg in configs(args.quick):
        if cfg["label"] in done:
            results.append(done[cfg["label"]])
            continue
        dense = cfg["label"] == "dense"
        spec = {
            "model": {"source": str(smollm2_dir() / SMOLLM2_FILE), "dtype": "float32"},
            "prune": {
                "method": cfg["method"],
                "pattern": cfg["pattern"],
                "sparsity": cfg["sparsity"],
                "variant": cfg["variant"],
            },
            "calibration": {
                "source": "wikitext2",
                "nsamples": cfg.get("nsamples", args.nsamples),
                "seqlen": args.seqlen,
                "seed": args.seed,
            },
            "evaluation": {
                "source": "wikitext2",
                "seqlen": args.seqlen,
                "max_windows": args.eval_windows,
                "dense_baseline": False,
            },
            "outputs": {"model": False},
        }
        report, wall, rss = run_child(["bench/quality.py", "--one", json.dumps(spec)])
        ev, tm = report["evaluation"], report["timings"]
        row = {
            **cfg,
            "ppl": ev["pruned_ppl"],
            "sparsity_measured": report["sparsity"]["overall"],
            "nm_ok": report["sparsity"].get("nm_ok"),
            "wall_s": round(wall, 2),
            "prune_s": tm.get("prune_s"),
            "mask_s": tm.get("mask_s"),
            "peak_rss_mb": round(rss, 1),
            "eval_windows": ev["windows"],
            "eval_tokens": ev.get("tokens"),
            "dense": dense,
        }
        results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.partial:
            with args.partial.open("a") as fh:
                fh.write(json.dumps(row) + "\n")

    out = {
        "benchmark": "quality",
        "model": f"SmolLM2-135M-Instruct ({SMOLLM2_FILE}, dequantized to float32)",
        "calibration": {
            "file": str(data_dir() / "wikitext-2" / "valid.txt"),
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
        },
        "evaluation": {
            "file": str(data_dir() / "wikitext-2" / "test.txt"),
            "windows": args.eval_windows,
            "seqlen": args.seqlen,
            "note": "first `windows` non-overlapping windows of the tokenized test split",
        },
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    if args.results_md:
        render_markdown(out, args.results_md)
    print(json.dumps(out))


BEGIN, END = "<!-- quality-table:begin -->", "<!-- quality-table:end -->"


def table(out: dict) -> str:
    """The results as a Markdown table (perplexity, sparsity, times, memory)."""
    lines = [
        "| run | calib. n | ppl | measured sparsity | N:M ok | wall s | prune s | mask s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in out["results"]:
        n = r.get("nsamples", out["calibration"]["nsamples"]) if not r["dense"] else "-"
        nm = {True: "yes", False: "NO", None: "-"}[r.get("nm_ok")]
        mask = f"{r['mask_s']:.1f}" if r.get("mask_s") is not None else "-"
        prune = f"{r['prune_s']:.1f}" if r.get("prune_s") is not None else "-"
        lines.append(
            f"| {r['label']} | {n} | {r['ppl']:.2f} | {r['sparsity_measured']:.4f} | {nm} "
            f"| {r['wall_s']:.0f} | {prune} | {mask} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def render_markdown(out: dict, path: Path) -> None:
    """Replace the generated table between the markers in `path` (create the file if needed)."""
    block = f"{BEGIN}\n{table(out)}\n{END}"
    text = path.read_text() if path.exists() else f"# Quality results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(head + block + tail)


def plot(results: list[dict], path: Path) -> None:
    """Left: perplexity against unstructured sparsity per method. Right: 50% by pattern (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next((r["ppl"] for r in results if r["dense"]), None)
    main = [r for r in results if not r["dense"] and r["group"] == "main"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in main:
        if r["pattern"] == "unstructured":
            name = r["method"] + (" (variant)" if r["variant"] else "")
            series.setdefault(name, []).append((r["sparsity"], r["ppl"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    patterns = ["unstructured", "4:8", "2:4"]
    methods = ["magnitude", "wanda", "sparsegpt"]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        vals = []
        for pattern in patterns:
            hit = [
                r["ppl"]
                for r in main
                if r["method"] == method
                and r["pattern"] == pattern
                and not r["variant"]
                and (pattern != "unstructured" or r["sparsity"] == 0.5)
            ]
            vals.append(hit[0] if hit else float("nan"))
        bx.bar([j + i * width for j in range(len(patterns))], vals, width, label=method)
    bx.set_xticks([j + width for j in range(len(patterns))], ["50% unstructured", "4:8", "2:4"])
    for a in (ax, bx):
        if dense:
            a.axhline(dense, color="grey", linestyle="--", label=f"dense ({dense:.1f})")
        a.set_yscale("log")
        a.set_ylabel("WikiText-2 test perplexity (log)")
        a.legend(fontsize=8)
    ax.set_xlabel("unstructured sparsity")
    ax.set_title("perplexity vs sparsity")
    bx.set_title("50% sparsity by pattern")
    fig.suptitle("SmolLM2-135M, calibrated on WikiText-2 valid, evaluated on test")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
