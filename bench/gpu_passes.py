"""The measured passes of bench/gpu.py: the 8B-shape runs, their FLOP floor, the architecture matrix.

Kept apart from the script so that its pieces can be read (and tested on the CPU) one by one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from core.evaluation import block_eval, evaluate
from core.run import block_prune, engine
from core.spec import PruneSpec

RUNS = (("wanda", "2:4", None), ("sparsegpt", "unstructured", 0.5))
"""(method, pattern, sparsity) of the 8B-shape runs."""


@contextmanager
def timed_engine(totals: dict[str, float], sync: Callable[[], None]) -> Iterator[None]:
    """Adds the synchronised seconds of every statistics pass and block re-run to ``totals``."""
    saved = {"collect_stats": block_prune.collect_stats, "run_block": engine.run_block}

    def wrap(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*a: Any, **kw: Any) -> Any:
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            totals[key] += time.perf_counter() - t
            return out

        return timed

    block_prune.collect_stats = wrap("stats_s", saved["collect_stats"])  # type: ignore[assignment]
    engine.run_block = wrap("rerun_s", saved["run_block"])  # type: ignore[assignment]
    try:
        yield
    finally:
        block_prune.collect_stats = saved["collect_stats"]  # type: ignore[assignment]
        engine.run_block = saved["run_block"]  # type: ignore[assignment]


def llama_config(shape: dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["inter"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"], num_hidden_layers=shape["layers"], vocab_size=shape["vocab"],
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
    )  # fmt: skip


@torch.no_grad()
def build(shape: dict[str, int], device: str, seed: int = 0) -> nn.Module:
    """A LLaMA of ``shape`` with random bf16 weights, built directly on ``device``."""
    from transformers import LlamaForCausalLM

    cfg = llama_config(shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).to_empty(device=device)  # bf16 from the start: no fp32 transient
    g = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=g)
    # to_empty left every buffer uninitialised: build the rotary embedding (inv_freq) afresh
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg).to(device)
    return model.eval()


def block_params(shape: dict[str, int]) -> dict[str, tuple[int, int]]:
    """``{matrix: (out, in)}`` of one block."""
    h, kvd = shape["hidden"], shape["kv"] * (shape["hidden"] // shape["heads"])
    i = shape["inter"]
    return {
        "q": (h, h),
        "k": (kvd, h),
        "v": (kvd, h),
        "o": (h, h),
        "gate": (i, h),
        "up": (i, h),
        "down": (h, i),
    }


def flop_floor(shape: dict[str, int], tokens: int, seqlen: int, method: str) -> dict[str, float]:
    """FLOPs of the passes the engine must make: one statistics forward per block, one re-run
    per block but the last (linears + causal attention), and for SparseGPT one Hessian per matrix
    (``2 T in^2``) and its solve (``in^3 + out in^2``)."""
    mats = block_params(shape)
    lin = 2 * tokens * sum(o * i for o, i in mats.values())
    attn = 2 * tokens * seqlen * shape["hidden"]  # QK^T and AV, causal half
    n = shape["layers"]
    out = {"forward": (2 * n - 1) * (lin + attn)}
    if method == "sparsegpt":
        out["hessian"] = n * sum(2 * tokens * i * i for _, i in mats.values())
        out["solve"] = n * sum(i**3 + o * i * i for o, i in mats.values())
    return out


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def _onloaded(budget: int) -> dict[str, Any]:
    """Keyword arguments of ``engine.run_blocks`` for a run onloaded block by block from host
    memory (the model's weights on the host, compute on the device, ``budget`` bytes there)."""
    return {"max_device_memory": budget}


def one_run(
    shape: dict[str, int], cal: torch.Tensor, ev: torch.Tensor, method: str, pattern: str,
    sparsity: float | None, device: str, onload: bool, sync: Callable[[], None], nwin: int,
) -> dict[str, Any]:  # fmt: skip
    """Build, prune and evaluate once; every phase timed."""
    spec = PruneSpec(method=method, pattern=pattern, sparsity=sparsity)
    t = time.perf_counter()
    model = build(shape, device)
    extra: dict[str, Any] = {}
    if onload:
        model.to("cpu")
        extra = _onloaded(budget=8 * 2**30)
    sync()
    out: dict[str, Any] = {"method": method, "pattern": pattern, "sparsity": sparsity, "onload": onload}
    out["load_s"] = time.perf_counter() - t
    _peak_reset(device)  # the peaks below are the prune's and the evaluation's, not the build's
    totals: dict[str, float]
    t0 = time.perf_counter()
    print(f"{method} onload={onload}: built in {out['load_s']:.1f} s", flush=True)

    def progress(p: Any) -> None:
        print(f"  block {p.block}/{p.nblocks} at {time.perf_counter() - t0:.1f} s", flush=True)

    with timed_engine(totals := {"stats_s": 0.0, "rerun_s": 0.0}, sync):
        t = time.perf_counter()
        res = engine.run_blocks(model, cal, spec, on_progress=progress, device=device, **extra)
        sync()
        out["prune_s"] = time.perf_counter() - t
    out.update(totals, mask_s=res.mask_s, timings=res.timings, placement=getattr(res, "placement", None))
    out["other_prune_s"] = out["prune_s"] - totals["stats_s"] - totals["rerun_s"] - res.mask_s
    out["peak_prune_gib"] = _peak_gib(device)
    t = time.perf_counter()
    ppl = block_eval.perplexity(
        model, ev, ev.shape[-1], max_windows=nwin, batch_size=4, device=device, **extra
    )
    sync()
    out["eval_s"], out["pruned_ppl"], out["eval_placement"] = (
        time.perf_counter() - t,
        ppl["ppl"],
        ppl["placement"],
    )
    if not onload:  # the whole-model forward on the same windows: block-by-block must equal it
        t = time.perf_counter()
        whole = evaluate.perplexity(model, ev, ev.shape[-1], max_windows=nwin, batch_size=4)
        sync()
        out["whole_eval_s"], out["whole_ppl"] = time.perf_counter() - t, whole["ppl"]
        out["ppl_rel_diff"] = abs(whole["ppl"] - ppl["ppl"]) / whole["ppl"]
    out["peak_gib"] = _peak_gib(device)
    del model
    return out


def big_runs(
    shape: dict[str, int], ncal: int, seqlen: int, nwin: int, device: str, rate: float,
    left: Callable[[], float], sync_dev: Callable[[str], None], partial: Callable[[dict[str, Any]], None],
    onloads: tuple[bool, ...] = (False, True),
) -> dict[str, Any]:  # fmt: skip
    """Wanda 2:4 and SparseGPT 50% on the 8B shape, resident then onloaded, with their floors."""
    g = torch.Generator().manual_seed(0)
    cal = torch.randint(0, shape["vocab"], (ncal, seqlen), generator=g)
    ev = torch.randint(0, shape["vocab"], (nwin, seqlen), generator=g)
    runs: list[dict[str, Any]] = []
    floors: dict[str, dict[str, float]] = {}
    doc = {"shape": shape, "calibration": [ncal, seqlen], "eval_windows": nwin, "floors_tflop": floors,
           "runs": runs}  # fmt: skip
    for method, pattern, sparsity in RUNS:
        fl = flop_floor(shape, ncal * seqlen, seqlen, method)
        floors[method] = {k: v / 1e12 for k, v in fl.items()}
        if rate:
            floors[method]["forward_s_at_bf16_rate"] = fl["forward"] / (rate * 1e12)
        for onload in onloads:
            if left() < 45:
                runs.append({"method": method, "onload": onload, "skipped": "time budget"})
                continue
            try:
                r = one_run(shape, cal, ev, method, pattern, sparsity, device, onload,
                            lambda: sync_dev(device), nwin)  # fmt: skip
            except Exception as e:
                r = {"method": method, "onload": onload, "error": f"{type(e).__name__}: {e}"[:2000]}
            if rate and "prune_s" in r and method == "wanda":
                r["x_floor"] = r["prune_s"] / floors[method]["forward_s_at_bf16_rate"]
            runs.append(r)
            partial(doc)
    return doc


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p == 0).cpu() for n, p in model.named_parameters() if p.dim() >= 2}


def arch_matrix(device: str, left: Callable[[], float]) -> dict[str, Any]:
    """Every tiny model: masks of the CPU and of ``device`` (fp32, same ids) compared."""
    from tests import tiny_models

    g = torch.Generator().manual_seed(0)
    cal = torch.randint(1, tiny_models.VOCAB, (4, 48), generator=g)
    specs = {"wanda50": PruneSpec(sparsity=0.5), "wanda24": PruneSpec(pattern="2:4"),
             "sparsegpt50": PruneSpec(method="sparsegpt", sparsity=0.5)}  # fmt: skip
    rows = []
    for name in tiny_models.MATRIX:
        if left() < 10:
            rows.append({"family": name, "skipped": "time budget"})
            continue
        base = tiny_models.build(name)
        for label, spec in specs.items():
            row: dict[str, Any] = {"family": name, "run": label}
            try:
                a, b = copy.deepcopy(base), copy.deepcopy(base).to(device)
                engine.prune(a, cal, spec)
                engine.run_blocks(b, cal, spec, device=device)
                ma, mb = _masks(a), _masks(b)
                diff = {n: int((ma[n] != mb[n]).sum()) for n in ma}
                row.update(tensors=len(ma), differing_tensors=sum(1 for v in diff.values() if v),
                           differing_elements=sum(diff.values()),
                           elements=sum(int(m.numel()) for m in ma.values()))  # fmt: skip
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            rows.append(row)
    flips = sum(r.get("differing_elements", 0) for r in rows)
    return {"device": device, "rows": rows, "total_differing_elements": flips,
            "errors": sum(1 for r in rows if "error" in r)}  # fmt: skip


def profile_blocks(shape: dict[str, int], ncal: int, seqlen: int, device: str) -> dict[str, Any]:
    """Wanda 2:4 on a 2-block model of ``shape`` under torch.profiler: the top operators by device
    and by host time (where a slow block loop spends its time)."""
    from torch.profiler import ProfilerActivity, profile

    small = dict(shape, layers=2)
    model = build(small, device)
    cal = torch.randint(0, shape["vocab"], (ncal, seqlen), generator=torch.Generator().manual_seed(0))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        engine.run_blocks(model, cal, PruneSpec(pattern="2:4"), device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - t
    out: dict[str, Any] = {"blocks": 2, "wall_s": wall}
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.startswith("cuda") else [])
    for key in keys:
        out[key] = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60)
    del model
    return out
