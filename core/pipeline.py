"""One whole run: load → calibrate → dense eval → prune → pruned eval → export.

Progress is reported with overall fractions in [0, 1]; cancellation is checked between stages
and (inside the engine) between blocks. Artifacts appear in ``out_dir`` only when complete.

Streaming mode (``ModelSpec.stream``, see :func:`use_streaming`) prunes a local safetensors
checkpoint block by block with :func:`core.streaming.prune_streaming` instead: only the config
and tokenizer are loaded, there is no perplexity evaluation (the model is assumed not to fit in
memory), and the output has the same layout (``model/``, ``report.json``, ``report.md``,
``manifest.json``).
"""

from __future__ import annotations

import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any

from core import (
    baseline_cache,
    data,
    engine,
    evaluate,
    export,
    families,
    hostinfo,
    preflight,
    resume,
    streaming,
)
from core import report as report_doc
from core.errors import InvalidInput
from core.progress import CancelFn, Progress, ProgressFn, check_cancel
from core.report import generations
from core.spec import ModelSpec, RunSpec

__all__ = ["STAGE_WEIGHTS", "run", "use_streaming"]

STREAMING_EVAL_NOTE = (
    "not evaluated: streaming mode never holds the whole model in memory, so perplexity "
    "(dense or pruned) is not measured; evaluate the exported model separately if it fits"
)

# Relative share of the progress bar given to each stage (only enabled stages count).
STAGE_WEIGHTS: dict[str, float] = {
    "loading": 0.10,
    "calibrating": 0.05,
    "dense_eval": 0.15,
    "pruning": 0.45,
    "pruned_eval": 0.15,
    "exporting": 0.10,
}


class _PeakRSS:
    """Samples this process's RSS in a background thread (the worker is long-lived, so
    ``ru_maxrss`` alone would report the lifetime peak)."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import psutil

            self._proc: Any = psutil.Process()
        except ImportError:  # pragma: no cover
            self._proc = None

    def _sample(self) -> None:
        if self._proc is not None:
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> _PeakRSS:
        self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    @property
    def mb(self) -> float:
        if self._proc is None:  # pragma: no cover
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self.peak / 2**20


def _versions() -> dict[str, Any]:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        pkg = version("prune-service")
    except Exception:
        pkg = "unknown"
    return {
        "prune_service": pkg,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "host": hostinfo.describe(),
    }


class _Stages:
    """Maps a stage's local fraction to the overall progress fraction."""

    def __init__(self, enabled: list[str], on_progress: ProgressFn | None) -> None:
        total = sum(STAGE_WEIGHTS[s] for s in enabled)
        self.spans: dict[str, tuple[float, float]] = {}
        acc = 0.0
        for s in enabled:
            w = STAGE_WEIGHTS[s] / total
            self.spans[s] = (acc, acc + w)
            acc += w
        self.on_progress = on_progress

    def emit(self, key: str, local: float, stage: str, message: str = "", **kw: Any) -> None:
        if self.on_progress is None or key not in self.spans:
            return
        lo, hi = self.spans[key]
        frac = min(1.0, max(0.0, lo + (hi - lo) * local))
        self.on_progress(Progress(stage=stage, fraction=frac, message=message, **kw))


def _eval_batch(seqlen: int, vocab: int) -> int:
    """Windows per forward so that fp32 logits stay under ~256 MB."""
    return max(1, min(8, (256 * 2**20) // max(1, seqlen * vocab * 4)))


def use_streaming(model: ModelSpec) -> bool:
    """Whether to prune in streaming mode.

    ``never``: no. ``always``: yes, but only for a local directory of safetensors weights on the
    CPU (else :class:`InvalidInput`). ``auto``: for such a directory when
    :func:`core.streaming.should_stream` says the checkpoint is large for the available RAM.
    """
    if model.stream == "never":
        return False
    src = Path(model.source).expanduser()
    local = model.gguf_file is None and src.is_dir() and any(src.glob("*.safetensors"))
    if model.stream == "always":
        if not local:
            raise InvalidInput(
                "stream='always' needs a local Hugging Face directory with safetensors weights "
                f"(got {model.source!r})"
            )
        if model.device != "cpu":
            raise InvalidInput("streaming mode runs on the CPU: use device 'cpu' or stream 'never'")
        return True
    return local and model.device == "cpu" and streaming.should_stream(src)


def run(
    spec: RunSpec,
    out_dir: str | Path,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    data_dir: str | Path | None = None,
    reported_spec: RunSpec | None = None,
    resume_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``spec`` end to end and write its artifacts to ``out_dir``; return the report dict.

    ``resume_dir``: block checkpoints (:mod:`core.resume`, under ``resume_dir/blocks``): every
    pruned block and the next block's inputs are persisted; a later run of the same spec
    continues after the last finished block with bit-identical output. Cleared on success.

    ``reported_spec`` is what the report records as its ``spec`` when it differs from what ran
    (e.g. the ``s3://`` URIs whose local copies ``spec`` names); default ``spec``.
    ``out_dir`` must not exist or be an empty directory. Raises :class:`core.errors.CoreError`
    subclasses for user-facing failures (``Cancelled`` when ``should_cancel()`` turns True).
    """
    t_start = time.perf_counter()
    out = export.check_out_dir(out_dir)
    preflight.check(spec)  # what the config alone refuses, before any weight is read
    if spec.model.stream != "never":
        from core.loading import resolve_source

        resolve_source(spec.model)  # a missing source is reported as such, not as a streaming error
        if use_streaming(spec.model):
            return _run_streaming(
                spec, out, on_progress, should_cancel, data_dir, t_start, reported_spec, resume_dir
            )
    ev = spec.evaluation
    enabled = ["loading", "calibrating"]
    if ev.enabled and ev.dense_baseline:
        enabled.append("dense_eval")
    enabled.append("pruning")
    if ev.enabled:
        enabled.append("pruned_eval")
    enabled.append("exporting")
    stages = _Stages(enabled, on_progress)
    timings: dict[str, float] = {}

    with _PeakRSS() as rss:
        from core.loading import load_model, model_context

        check_cancel(should_cancel)
        stages.emit("loading", 0.0, "loading", f"loading {spec.model.source}")
        t = time.perf_counter()
        loaded = load_model(spec.model)
        model, tok = loaded.model, loaded.tokenizer
        timings["load_s"] = time.perf_counter() - t
        stages.emit("loading", 1.0, "loading", "model loaded")

        check_cancel(should_cancel)
        stages.emit("calibrating", 0.0, "calibrating", f"reading {spec.calibration.source}")
        t = time.perf_counter()
        context = model_context(model)
        cal = spec.calibration
        seqlen = data.resolve_seqlen(cal.seqlen, context)
        calibration, cal_source = data.calibration_windows(
            cal.source, tok, cal.nsamples, seqlen, cal.seed, cal.text_field, data_dir
        )
        eval_ids = None
        eval_seqlen = data.resolve_seqlen(ev.seqlen, context) if ev.seqlen is not None else seqlen
        eval_source = None
        if ev.enabled:
            text, eval_source = data.load_text(ev.source, "evaluation", ev.text_field, data_dir)
            eval_ids = data.tokenize(tok, text)
        timings["calibrate_s"] = time.perf_counter() - t
        stages.emit("calibrating", 1.0, "calibrating", f"{calibration.shape[0]} windows x {seqlen} tokens")

        vocab = int(getattr(model.config, "vocab_size", 50000))
        ebatch = _eval_batch(eval_seqlen, vocab)

        def _eval(key: str, label: str) -> dict[str, Any]:
            assert eval_ids is not None
            check_cancel(should_cancel)
            stages.emit(key, 0.0, "evaluating", f"{label} perplexity")

            def on_window(done: int, total: int) -> None:
                stages.emit(key, done / total, "evaluating", f"{label} perplexity: window {done}/{total}")
                check_cancel(should_cancel)

            return evaluate.perplexity(model, eval_ids, eval_seqlen, ev.max_windows, ebatch, on_window)

        def _eval_model(m: Any) -> dict[str, Any]:  # an exported artifact loaded back (core.formats)
            assert eval_ids is not None
            check_cancel(should_cancel)
            return evaluate.perplexity(m, eval_ids, eval_seqlen, ev.max_windows, ebatch)

        dense, dense_cached = None, False
        timings["eval_s"] = 0.0
        if ev.enabled and ev.dense_baseline:
            t = time.perf_counter()
            assert eval_ids is not None
            bkey = baseline_cache.key(model, eval_ids, eval_seqlen, ev.max_windows, ebatch)
            dense = baseline_cache.load(bkey)
            dense_cached = dense is not None
            if dense is None:
                dense = _eval("dense_eval", "dense")
                baseline_cache.store(bkey, dense)
            else:
                stages.emit("dense_eval", 1.0, "evaluating", "dense perplexity: cached baseline")
            timings["dense_eval_s"] = time.perf_counter() - t
            timings["eval_s"] += timings["dense_eval_s"]

        t = time.perf_counter()
        dense_text = generations.generate(model, tok, ev.generations) if ev.dense_baseline else None
        timings["generate_s"] = time.perf_counter() - t
        check_cancel(should_cancel)

        def on_block(p: Progress) -> None:
            stages.emit("pruning", p.fraction, "pruning", p.message, block=p.block, nblocks=p.nblocks)

        stages.emit("pruning", 0.0, "pruning", f"pruning with {spec.prune.method}")
        pruned_info = engine.prune(
            model,
            calibration,
            spec.prune,
            on_block,
            should_cancel,
            Path(resume_dir) / "blocks" if resume_dir is not None else None,
        )
        timings["prune_s"] = pruned_info.prune_s
        timings["mask_s"] = pruned_info.mask_s
        if pruned_info.owl:
            timings["owl_first_pass_s"] = pruned_info.owl["first_pass_s"]

        pruned = None
        if ev.enabled:
            t = time.perf_counter()
            pruned = _eval("pruned_eval", "pruned")
            timings["pruned_eval_s"] = time.perf_counter() - t
            timings["eval_s"] += timings["pruned_eval_s"]

        t = time.perf_counter()
        texts = generations.pair(dense_text, generations.generate(model, tok, ev.generations))
        timings["generate_s"] += time.perf_counter() - t
        sparsity = evaluate.sparsity_report(model, spec.prune)
        evaluation = None
        if ev.enabled:
            ref = pruned or dense or {}
            evaluation = {
                "dense_ppl": dense["ppl"] if dense else None,
                "dense_cached": dense_cached,
                "pruned_ppl": pruned["ppl"] if pruned else None,
                "windows": ref.get("windows"),
                "seqlen": eval_seqlen,
                "tokens": ref.get("tokens"),
                "formula": evaluate.FORMULA,
                "source": eval_source,
            }
        cfg = model.config
        report: dict[str, Any] = {
            "spec": (reported_spec or spec).model_dump(mode="json"),
            "versions": _versions(),
            "model": {
                "source": loaded.source,
                "family": loaded.family.name,
                "architecture": (getattr(cfg, "architectures", None) or [type(model).__name__])[0],
                "model_type": cfg.model_type,
                "nblocks": len(families.get_blocks(model, loaded.family)),
                "params": sum(p.numel() for p in model.parameters()),
                "dtype": spec.model.dtype,
                "device": spec.model.device,
                "gguf": loaded.gguf,
            },
            "calibration": {
                "source": cal_source,
                "nsamples": int(calibration.shape[0]),
                "seqlen": seqlen,
                "seed": cal.seed,
            },
            "sparsity": sparsity,
            "layers": pruned_info.layer_records,
            "allocation": pruned_info.owl,
            "evaluation": evaluation,
            "timings": timings,
            "generations": texts,
            "peak_rss_mb": None,
            "streaming": {"used": False, "mode": spec.model.stream},
            "experts": [e.model_dump(mode="json") for e in pruned_info.experts],
            "warnings": list(pruned_info.warnings),
        }

        check_cancel(should_cancel)
        stages.emit("exporting", 0.0, "exporting", f"writing {out}")
        t = time.perf_counter()
        with export.staging_dir(out) as tmp:
            export.save_model(tmp, model, tok, spec.outputs)
            report["artifacts"] = export.save_formats(
                tmp, report, spec.outputs, (lambda m: _eval_model(m)["ppl"]) if ev.enabled else None
            )
            timings["export_s"] = time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t_start
            rss._sample()
            report["peak_rss_mb"] = round(rss.mb, 1)
            _cuda_peak(report, spec.model.device)
            report_doc.finish(tmp, report, spec)
            export.write_reports(tmp, report, spec.outputs)
            check_cancel(should_cancel)
        stages.emit("exporting", 1.0, "exporting", "done")
    if resume_dir is not None:
        resume.clear(Path(resume_dir))
    return report


def _run_streaming(
    spec: RunSpec,
    out: Path,
    on_progress: ProgressFn | None,
    should_cancel: CancelFn | None,
    data_dir: str | Path | None,
    t_start: float,
    reported_spec: RunSpec | None = None,
    resume_dir: str | Path | None = None,
) -> dict[str, Any]:
    """:func:`run` in streaming mode: tokenizer-only calibration, ``prune_streaming``, reports."""
    import shutil

    import torch

    from core.loading import load_config_and_tokenizer, model_context

    stages = _Stages(["loading", "calibrating", "pruning", "exporting"], on_progress)
    timings: dict[str, float] = {}
    with _PeakRSS() as rss:
        check_cancel(should_cancel)
        stages.emit("loading", 0.0, "loading", f"reading config and tokenizer of {spec.model.source}")
        t = time.perf_counter()
        config, tok, family, where = load_config_and_tokenizer(spec.model)
        timings["load_s"] = time.perf_counter() - t
        stages.emit("loading", 1.0, "loading", "config and tokenizer loaded (streaming mode)")

        check_cancel(should_cancel)
        stages.emit("calibrating", 0.0, "calibrating", f"reading {spec.calibration.source}")
        t = time.perf_counter()
        cal = spec.calibration
        seqlen = data.resolve_seqlen(cal.seqlen, model_context(config))
        calibration, cal_source = data.calibration_windows(
            cal.source, tok, cal.nsamples, seqlen, cal.seed, cal.text_field, data_dir
        )
        timings["calibrate_s"] = time.perf_counter() - t
        stages.emit("calibrating", 1.0, "calibrating", f"{calibration.shape[0]} windows x {seqlen} tokens")

        def on_stream(p: Progress) -> None:
            if p.stage == "pruning":
                stages.emit("pruning", p.fraction, "pruning", p.message, block=p.block, nblocks=p.nblocks)
            else:
                stages.emit("exporting", 0.0, "exporting", p.message)

        check_cancel(should_cancel)
        stages.emit("pruning", 0.0, "pruning", f"pruning with {spec.prune.method} (streaming)")
        with export.staging_dir(out) as tmp:
            info = streaming.prune_streaming(
                spec.model.source,
                tmp / "streamed",
                calibration,
                spec.prune,
                on_stream,
                should_cancel,
                resume_dir=Path(resume_dir) / "blocks" if resume_dir is not None else None,
                dtype=getattr(torch, spec.model.dtype),
            )
            t = time.perf_counter()
            (tmp / "streamed" / "report.json").unlink()
            if spec.outputs.model:
                (tmp / "streamed" / "model").rename(tmp / "model")
            shutil.rmtree(tmp / "streamed")
            info = info.model_dump(mode="json")  # typed PruneResult -> the report's dict
            st = info["timings"]
            timings["prune_s"] = info["prune_s"]
            timings["mask_s"] = info["mask_s"]
            timings["eval_s"] = 0.0
            archs = getattr(config, "architectures", None) or ["?"]
            report: dict[str, Any] = {
                "spec": (reported_spec or spec).model_dump(mode="json"),
                "versions": _versions(),
                "model": {
                    "source": where,
                    "family": family.name,
                    "architecture": archs[0],
                    "model_type": config.model_type,
                    "nblocks": info["nblocks"],
                    "params": info["params"],
                    "dtype": spec.model.dtype,
                    "device": spec.model.device,
                    "gguf": False,
                },
                "calibration": {
                    "source": cal_source,
                    "nsamples": int(calibration.shape[0]),
                    "seqlen": seqlen,
                    "seed": cal.seed,
                },
                "sparsity": info["sparsity"],
                "evaluation": None,
                "timings": timings,
                "peak_rss_mb": None,
                "streaming": {
                    "used": True,
                    "mode": spec.model.stream,
                    "evaluation": STREAMING_EVAL_NOTE if spec.evaluation.enabled else "disabled",
                    "checkpoint_bytes": info["checkpoint_bytes"],
                    "output_bytes": info["output_bytes"],
                    "spilled": info["spilled"],
                    "capture_s": st["capture_s"],
                    "blocks_s": st["blocks_s"],
                },
            }
            report["artifacts"] = export.save_formats(tmp, report, spec.outputs)
            check_cancel(should_cancel)
            timings["export_s"] = st["export_s"] + time.perf_counter() - t
            timings["total_s"] = time.perf_counter() - t_start
            rss._sample()
            report["peak_rss_mb"] = round(rss.mb, 1)
            report_doc.finish(tmp, report, spec)
            export.write_reports(tmp, report, spec.outputs)
            check_cancel(should_cancel)
        stages.emit("exporting", 1.0, "exporting", "done")
    if resume_dir is not None:
        resume.clear(Path(resume_dir))
    return report


def _cuda_peak(report: dict[str, Any], device: str) -> None:
    if device != "cuda":
        return
    import torch

    report["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
