"""Artifact formats on SmolLM2-135M: size of each vs dense fp16, pack/unpack time, perplexity.

Prunes the real model with Wanda (``--pattern``: unstructured 50% or 2:4) through
``core.run.pipeline.run`` asking for every format (fp32 export, as the engine runs on the CPU),
then casts the dense export to fp16 tensor by tensor and packs that too, timing pack and
unpack and checking that unpack restores every tensor bit for bit. Prints one JSON object
(also written to ``--out``)::

    HF_HUB_OFFLINE=1 python bench/formats.py --pattern 2:4 --out docs/bench/formats-2-4.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import SMOLLM2_FILE, data_dir, machine, smollm2_dir, spec_flags

SPEC_DEFAULTS = {
    "prune.pattern": "2:4",
    "calibration.nsamples": 32,
    "calibration.seqlen": 512,
    "evaluation.max_windows": 40,
}
"""This benchmark's run-spec settings, each a flag (``--pattern``, ``--eval-windows``, ...)."""


def _fp16_copy(src: Path, dst: Path) -> None:
    """``src`` with every floating tensor cast to fp16 (one tensor at a time), other files as is."""
    import torch

    from core.artifacts.formats.shards import DTYPES, ShardWriter, dense_layout, iter_tensors

    dst.mkdir(parents=True)
    for shard, names in dense_layout(src).items():
        from safetensors import safe_open

        with safe_open(str(src / shard), "pt") as fh:
            meta = fh.metadata() or {"format": "pt"}
            declared = {}
            for n in names:
                sl = fh.get_slice(n)
                dt = {v: k for k, v in DTYPES.items()}[sl.get_dtype()]
                declared[n] = (torch.float16 if dt.is_floating_point else dt, len(sl.get_shape()))
        w = ShardWriter(dst / shard, declared, meta)
        order = w.order()
        pending = {}
        for n, t in iter_tensors(src / shard, names):
            pending[n] = t.half() if t.is_floating_point() else t
            while order and order[0] in pending:
                w.add(order[0], pending.pop(order.pop(0)))
        w.close()
    for p in src.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            shutil.copy2(p, dst / p.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = "float16"
    cfg.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def _stored_bytes(d: Path, names: set[str]) -> int:
    """Bytes of the stored tensors of ``names`` (``NAME``, ``NAME::*``, ``NAME_packed``...) in ``d``."""
    from safetensors import safe_open

    item = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
    mods = {n.removesuffix(".weight") for n in names}
    total = 0
    for f in d.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                base = k.split("::")[0]
                mod = k.rsplit(".", 1)[0]
                if base in names or (mod in mods and k.rsplit(".", 1)[1].startswith("weight")):
                    sl = fh.get_slice(k)
                    numel = 1
                    for x in sl.get_shape():
                        numel *= x
                    total += numel * item[sl.get_dtype()]
    return total


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    from core.artifacts.formats.shards import dense_layout

    la, lb = dense_layout(a), dense_layout(b)
    if la != lb:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    for shard, names in la.items():
        with safe_open(str(a / shard), "pt") as fa, safe_open(str(b / shard), "pt") as fb:
            for n in names:
                x, y = fa.get_tensor(n), fb.get_tensor(n)
                if (
                    x.dtype != y.dtype
                    or x.shape != y.shape
                    or not torch.equal(x.view(view[x.element_size()]), y.view(view[y.element_size()]))
                ):
                    return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    spec_flags(ap, SPEC_DEFAULTS, {"--windows": ["--eval-windows"]})
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()

    from core.artifacts import formats
    from core.artifacts.formats import compact, int8
    from core.run import pipeline
    from core.spec import RunSpec

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-formats-"))
    try:
        spec = RunSpec.model_validate(
            {
                "model": {"source": str(smollm2_dir() / SMOLLM2_FILE)},
                "prune": {"method": "wanda", "pattern": args.pattern},
                "calibration": {"source": "wikitext2", "nsamples": args.nsamples, "seqlen": args.seqlen},
                "evaluation": {"max_windows": args.eval_windows},
                "outputs": {"formats": ["dense", "compact", "int8", "compact-int8"]},
            }
        )
        t = time.perf_counter()
        report = pipeline.run(spec, work / "run", data_dir=data_dir()).to_json()
        run_s = time.perf_counter() - t
        run = work / "run"
        t = time.perf_counter()
        compact.unpack(run / "compact", work / "unpacked32")
        unpack32_s = time.perf_counter() - t
        exact32 = _same_tensors(run / "model", work / "unpacked32")

        fp16 = work / "fp16"
        _fp16_copy(run / "model", fp16)
        base = formats.dense_fp16_bytes(fp16)
        layers = list(report["sparsity"]["layers"])
        quant = {f"{n}.weight" for n in layers}
        total, weights = formats.dir_sizes(fp16)
        fp16_rows: dict = {"dense": {"bytes": total, "weights_bytes": weights}}
        for fmt in ("compact", "compact-int8", "int8"):
            d = work / f"fp16-{fmt}"
            t = time.perf_counter()
            if fmt == "int8":
                int8.write_int8(fp16, d, layers)
            else:
                compact.pack(fp16, d, quantize=quant if fmt == "compact-int8" else None)
            row = {"pack_s": round(time.perf_counter() - t, 2)}
            if fmt != "int8":
                t = time.perf_counter()
                compact.unpack(d, work / f"u-{fmt}")
                row["unpack_s"] = round(time.perf_counter() - t, 2)
                if fmt == "compact":
                    row["unpack_bit_exact"] = _same_tensors(fp16, work / f"u-{fmt}")
                shutil.rmtree(work / f"u-{fmt}")
            total, weights = formats.dir_sizes(d)
            row.update(bytes=total, weights_bytes=weights)
            linear_ratio = _stored_bytes(d, quant) / _stored_bytes(fp16, quant)
            row["pruned_linears_ratio_to_fp16"] = round(linear_ratio, 4)
            fp16_rows[fmt] = row
        for row in fp16_rows.values():
            row["ratio_to_dense_fp16"] = round(row["weights_bytes"] / base, 4)

        ev = report["evaluation"]
        result = {
            "bench": "formats",
            "model": SMOLLM2_FILE,
            "pattern": args.pattern,
            "sparsity": report["sparsity"]["overall"],
            "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
            "evaluation": {"windows": ev["windows"], "seqlen": ev["seqlen"]},
            "ppl": {
                "dense_fp32": ev["dense_ppl"],
                "pruned_fp32": ev["pruned_ppl"],
                "int8": report["artifacts"]["formats"]["int8"]["ppl"],
                "compact-int8": report["artifacts"]["formats"]["compact-int8"]["ppl"],
            },
            "fp32_export": {
                "formats": report["artifacts"]["formats"],
                "dense_fp16_bytes": report["artifacts"]["dense_fp16_bytes"],
                "compact_unpack_s": round(unpack32_s, 2),
                "compact_unpack_bit_exact": exact32,
            },
            "fp16_export": {"dense_fp16_bytes": base, "formats": fp16_rows},
            "run_s": round(run_s, 1),
            "export_s": report["timings"]["export_s"],
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "machine": (host := machine()),
            "cpu_model": host["host"]["cpu_model"],
        }
        for k in ("int8", "compact-int8"):
            result["ppl"][f"{k}_vs_pruned_fp32"] = round(result["ppl"][k] / ev["pruned_ppl"] - 1, 5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
