"""One whole run: load → calibrate → dense eval → prune → pruned eval → export.

Progress is reported with overall fractions in [0, 1]; cancellation is checked between stages
and (inside the engine) between blocks. Artifacts appear in ``out_dir`` only when complete.

One code path for every placement of the weights: on the compute device, in host memory
(onloaded block by block by the engine), or on disk — streaming mode (``ModelSpec.stream``, see
:func:`use_streaming`), where each variant is pruned from the local safetensors checkpoint into a
staged output by :func:`core.run.streaming.prune_streaming`. Perplexity is always computed block by
block (:mod:`core.evaluation.block_eval`); the output has the same layout in every case (``model/``,
``report.json``, ``report.md``, ``manifest.json``).
"""

from __future__ import annotations

import platform
import resource
import threading
import time
from pathlib import Path
from typing import Any

from core.artifacts import export
from core.artifacts import report as report_doc
from core.artifacts.report import generations
from core.errors import InvalidInput
from core.evaluation import baseline_cache, block_eval, evaluate
from core.model import data, families, loading
from core.progress import CancelFn, Progress, ProgressFn, check_cancel
from core.result import (
    CalibrationInfo,
    Evaluation,
    Generation,
    ModelInfo,
    PruneResult,
    RunReport,
    SparsityInfo,
    TaskScore,
)
from core.run import engine, hostinfo, preflight, recovery_stage, resume, streaming, sweep
from core.spec import ModelSpec, PruneSpec, RunSpec

__all__ = ["STAGE_WEIGHTS", "run", "use_streaming"]

STREAMING_EVAL_NOTE = (
    "block by block from the checkpoint (core.evaluation.block_eval): "
    "the dense input's and the pruned output's "
    "safetensors, one decoder block in memory at a time; no dense-baseline cache, no generations"
)

# Relative share of the progress bar given to each stage (only enabled stages count).
STAGE_WEIGHTS: dict[str, float] = {
    "loading": 0.10,
    "calibrating": 0.05,
    "dense_eval": 0.15,
    "pruning": 0.45,
    "pruned_eval": 0.15,
    "recovering": 0.60,
    "tasks": 0.10,
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
    """Maps a stage's local fraction to the overall progress fraction.

    ``enabled``: ``(key, weight)`` in run order; a sweep repeats the per-variant keys with a suffix.
    """

    def __init__(self, enabled: list[tuple[str, float]], on_progress: ProgressFn | None) -> None:
        total = sum(w for _, w in enabled)
        self.spans: dict[str, tuple[float, float]] = {}
        acc = 0.0
        for key, weight in enabled:
            w = weight / total
            self.spans[key] = (acc, acc + w)
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
    :func:`core.run.streaming.should_stream` says the checkpoint is large for the available RAM.
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
    variant: str | None = None,
) -> RunReport:
    """Run ``spec`` end to end and write its artifacts to ``out_dir``; return the report.

    ``resume_dir``: block checkpoints (:mod:`core.run.resume`, under ``resume_dir/blocks``; a sweep's
    variants under ``resume_dir/variants/<label>/blocks``): every pruned block and the next block's
    inputs are persisted; a later run of the same spec continues after the last finished block with
    bit-identical output. Cleared on success.

    A sweep (``spec.sweep``) loads, calibrates and measures the dense model once, then prunes each
    variant from the dense weights into ``out_dir/variants/<label>/`` (artifacts and its own report);
    the top-level report has the sweep table and curve and describes the headline variant.
    ``variant`` (a label of the sweep) runs that variant alone, as one unit of a sweep fanned out over
    workers: ``out_dir`` gets what the whole sweep writes under ``variants/<label>/`` (its artifacts and
    report, identical but for timings, which here include loading and the dense evaluation);
    :func:`core.run.sweep.gather` then writes the sweep's top-level report.

    ``reported_spec`` is what the report records as its ``spec`` when it differs from what ran
    (e.g. the ``s3://`` URIs whose local copies ``spec`` names); default ``spec``.
    ``out_dir`` must not exist or be an empty directory. Raises :class:`core.errors.CoreError`
    subclasses for user-facing failures (``Cancelled`` when ``should_cancel()`` turns True).
    """
    t_start = time.perf_counter()
    out = export.check_out_dir(out_dir)
    checked = loading.check_source(spec.model)  # resolved and checked once, handed down
    preflight.check(spec, checked)  # what the config alone refuses, before any weight is read
    disk = use_streaming(spec.model)
    if disk and spec.recovery.enabled:
        raise InvalidInput(
            "this checkpoint would be pruned with its weights on disk (too large for the RAM): recovery "
            "trains the model in memory (model.stream 'never')"
        )
    labels = [label for label, _ in spec.variants()]
    if variant is not None and (spec.sweep is None or variant not in labels):
        raise InvalidInput(f"variant {variant!r} is not one of this spec's sweep variants {labels}")
    only = labels.index(variant) if variant is not None else None
    return _Run(spec, on_progress, should_cancel, data_dir, reported_spec or spec, checked, disk, only).run(
        out, t_start, Path(resume_dir) if resume_dir is not None else None
    )


class _Run:
    """:func:`run`: one load, one calibration and one dense evaluation, then every variant (one
    outside sweeps) pruned from the dense weights, evaluated and exported.

    The weights are in memory (on the device, or in host memory and onloaded block by block by the
    engine) or, in streaming mode (``disk``), on disk: each variant is then pruned block by block
    from the input checkpoint into a staged output checkpoint (:func:`core.run.streaming.prune_streaming`)
    and both are evaluated block by block from disk; there are no generations and no baseline cache.
    """

    def __init__(
        self,
        spec: RunSpec,
        on_progress: ProgressFn | None,
        should_cancel: CancelFn | None,
        data_dir: str | Path | None,
        reported: RunSpec,
        checked: loading.Checked,
        disk: bool,
        only: int | None = None,
    ) -> None:
        self.spec, self.should_cancel, self.data_dir, self.reported = spec, should_cancel, data_dir, reported
        self.checked = checked
        self.disk = Path(checked.src.path) if disk else None
        """The input checkpoint when the weights stay on disk (streaming mode)."""
        self.staged: dict[int, Path] = {}
        self.tmp = Path()
        self.eval_read_s = 0.0
        """Seconds the evaluations spent reading weights from disk (streaming mode)."""
        self.variants = spec.variants()
        self.sweep = spec.sweep is not None
        self.only = only
        """The one variant this run prunes (a sweep fanned out over workers), else None: all."""
        self.indices = [only] if only is not None else list(range(len(self.variants)))
        ev = spec.evaluation
        self.dense_eval = ev.enabled and ev.dense_baseline
        enabled = [("loading", STAGE_WEIGHTS["loading"]), ("calibrating", STAGE_WEIGHTS["calibrating"])]
        if self.dense_eval:
            enabled.append(("dense_eval", STAGE_WEIGHTS["dense_eval"]))
        if ev.tasks and ev.dense_baseline:
            enabled.append(("dense_tasks", STAGE_WEIGHTS["tasks"]))
        for i in self.indices:
            enabled.append((f"pruning{i}", STAGE_WEIGHTS["pruning"]))
            if ev.enabled:
                enabled.append((f"pruned_eval{i}", STAGE_WEIGHTS["pruned_eval"]))
            if spec.recovery.enabled:  # core.run.recovery_stage
                enabled.append((f"recovering{i}", STAGE_WEIGHTS["recovering"]))
                if ev.enabled:
                    enabled.append((f"recovered_eval{i}", STAGE_WEIGHTS["pruned_eval"]))
            if ev.tasks:
                enabled.append((f"pruned_tasks{i}", STAGE_WEIGHTS["tasks"]))
            enabled.append((f"exporting{i}", STAGE_WEIGHTS["exporting"]))
        self.stages = _Stages(enabled, on_progress)
        self.timings: dict[str, float] = {}

    def _add(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def _tag(self, i: int) -> tuple[str | None, str]:
        """(variant label or None, message prefix) of variant ``i``."""
        if not self.sweep:
            return None, ""
        label = self.variants[i][0]
        return label, f"[{label} {i + 1}/{len(self.variants)}] "

    def _setup(self) -> None:
        """Load the model, read calibration windows and evaluation tokens, resolve the tasks."""
        from core.model.loading import hub_online, model_context

        spec, ev = self.spec, self.spec.evaluation
        self.tasks: list[Any] = []
        if ev.tasks:  # a missing task fails the run before any weight is read
            from core.evaluation import zeroshot

            root = data.default_data_dir(self.data_dir)
            self.tasks = [zeroshot.resolve(name, root, hub_online()) for name in ev.tasks]
        check_cancel(self.should_cancel)
        self.stages.emit("loading", 0.0, "loading", f"loading {spec.model.source}")
        t = time.perf_counter()
        self.loaded = self._load()
        self.model, self.tok = self.loaded.model, self.loaded.tokenizer
        self.timings["load_s"] = time.perf_counter() - t
        self.stages.emit("loading", 1.0, "loading", "model loaded" if self.disk is None else
                         "config and tokenizer loaded (weights stay on disk: streaming mode)")  # fmt: skip

        check_cancel(self.should_cancel)
        self.stages.emit("calibrating", 0.0, "calibrating", f"reading {spec.calibration.source}")
        t = time.perf_counter()
        context = model_context(self.model)
        cal = spec.calibration
        self.seqlen = data.resolve_seqlen(cal.seqlen, context)
        self.calibration, self.cal_source = data.calibration_windows(
            cal.source, self.tok, cal.nsamples, self.seqlen, cal.seed, cal.text_field, self.data_dir
        )
        self.eval_ids = None
        self.eval_seqlen = data.resolve_seqlen(ev.seqlen, context) if ev.seqlen is not None else self.seqlen
        self.eval_source = None
        if ev.enabled:
            text, self.eval_source = data.load_text(ev.source, "evaluation", ev.text_field, self.data_dir)
            self.eval_ids = data.tokenize(self.tok, text)
        self.timings["calibrate_s"] = time.perf_counter() - t
        shape = f"{self.calibration.shape[0]} windows x {self.seqlen} tokens"
        self.stages.emit("calibrating", 1.0, "calibrating", shape)
        vocab = int(getattr(self.model.config, "vocab_size", 50000))
        self.ebatch = _eval_batch(self.eval_seqlen, vocab)

    def _load(self) -> loading.Loaded:
        """The model in memory, or (streaming mode) its meta skeleton and the tokenizer."""
        if self.disk is None:
            return loading.load_model(self.spec.model, self.checked)
        import torch

        ck = self.checked
        _config, skel = streaming.skeleton(self.disk, getattr(torch, self.spec.model.dtype), ck.config)
        return loading.Loaded(model=skel, tokenizer=loading.load_tokenizer(ck), family=ck.family,
                              source=ck.where, gguf=False, resident=False)  # fmt: skip

    def _ppl(self, key: str, label: str, i: int | None = None, **kw: Any) -> dict[str, Any]:
        """Perplexity block by block (:mod:`core.evaluation.block_eval`) on the run's device: of the model in
        memory, or (weights on disk) of the input (``i`` None: dense) or variant ``i``'s staged output."""
        assert self.eval_ids is not None
        check_cancel(self.should_cancel)
        ev, ms = self.spec.evaluation, self.spec.model
        self.stages.emit(key, 0.0, "evaluating", f"{label} perplexity", **kw)

        def on_step(done: int, total: int) -> None:
            what = f"block {done}/{total - 1}" if done < total else "final norm and head"
            self.stages.emit(key, done / total, "evaluating", f"{label} perplexity: {what}", **kw)

        source = self._source(i)
        res = block_eval.perplexity(
            self.model, self.eval_ids, self.eval_seqlen, ev.max_windows, self.ebatch, on_step,
            device=ms.device, source=source, max_device_memory=ms.max_device_memory,
            max_host_memory=ms.max_host_memory, should_cancel=self.should_cancel,
        )  # fmt: skip
        self.eval_read_s += res.get("read_s", 0.0)
        return res

    def _source(self, i: int | None) -> Any:
        """Where block-by-block passes read the weights: None (the model in memory), else (weights on
        disk) the input checkpoint (``i`` None: dense) or variant ``i``'s staged output."""
        if self.disk is None:
            return None
        import torch

        where = self.disk if i is None else self.staged[i] / "model"
        return streaming.CheckpointSource(self.model, where, getattr(torch, self.spec.model.dtype))

    def _task_forward(self, i: int | None) -> Any:
        """The zero-shot tasks' model call: None (whole-model forward) when every weight is on the
        compute device, else the logits block by block (:func:`block_eval.forward_rows`)."""
        if self.disk is None and self.loaded.resident:
            return None
        import torch

        ms, source = self.spec.model, self._source(i)

        def forward(ids: Any) -> Any:
            parts: list[Any] = []
            block_eval.forward_rows(
                self.model, ids, ids.shape[0], lambda _b, logits: parts.append(logits), device=ms.device,
                source=source, max_device_memory=ms.max_device_memory, max_host_memory=ms.max_host_memory,
                should_cancel=self.should_cancel,
            )  # fmt: skip
            return torch.cat(parts)

        return forward

    def _format_ppl(self, model: Any) -> float:
        """Perplexity of an exported format loaded back (:mod:`core.artifacts.formats`): whole-model forwards,
        as the format's loader builds it (with its own hooks and packed weights)."""
        assert self.eval_ids is not None
        check_cancel(self.should_cancel)
        ev = self.spec.evaluation
        return evaluate.perplexity(model, self.eval_ids, self.eval_seqlen, ev.max_windows, self.ebatch)["ppl"]

    def _dense(self) -> None:
        """Dense perplexity (or the cached baseline), dense generations and dense task scores."""
        ev = self.spec.evaluation
        self.dense, self.dense_cached = None, False
        self.timings["eval_s"] = 0.0
        if self.dense_eval:
            t = time.perf_counter()
            assert self.eval_ids is not None
            bkey = (  # not for weights on disk: the key would read them all
                baseline_cache.key(self.model, self.eval_ids, self.eval_seqlen, ev.max_windows, self.ebatch)
                if self.disk is None
                else None
            )
            self.dense = baseline_cache.load(bkey) if bkey else None
            self.dense_cached = self.dense is not None
            if self.dense is None:
                self.dense = self._ppl("dense_eval", "dense")
                if bkey:
                    baseline_cache.store(bkey, self.dense)
            else:
                self.stages.emit("dense_eval", 1.0, "evaluating", "dense perplexity: cached baseline")
            self.timings["dense_eval_s"] = time.perf_counter() - t
            self.timings["eval_s"] += self.timings["dense_eval_s"]
        t = time.perf_counter()
        self.dense_text = (
            generations.generate(self.model, self.tok, ev.generations)
            if ev.dense_baseline and self.disk is None
            else None
        )
        self._add("generate_s", time.perf_counter() - t)
        self.dense_scores: dict[str, Any] = {}
        if self.tasks and ev.dense_baseline:
            self.dense_scores = self._run_tasks("dense_tasks", "dense")

    def _run_tasks(self, key: str, label: str, **kw: Any) -> dict[str, Any]:
        from core.evaluation import zeroshot

        check_cancel(self.should_cancel)
        self.stages.emit(
            key, 0.0, "evaluating", f"{label} zero-shot tasks: {', '.join(t.name for t in self.tasks)}", **kw
        )
        t = time.perf_counter()
        forward = self._task_forward(None if key == "dense_tasks" else int(key.removeprefix("pruned_tasks")))
        scores = zeroshot.evaluate(self.model, self.tok, self.tasks, self.spec.evaluation.task_limit,
                                   forward=forward, device=self.spec.model.device)  # fmt: skip
        self._add("tasks_s", time.perf_counter() - t)
        self.stages.emit(key, 1.0, "evaluating", f"{label} zero-shot tasks done", **kw)
        return scores

    def _task_scores(self, pruned: dict[str, Any]) -> list[TaskScore]:
        out = []
        for task in self.tasks:
            d, p = self.dense_scores.get(task.name), pruned[task.name]
            out.append(
                TaskScore(
                    task=task.name,
                    metric=p.metric,
                    dense=d.value if d else None,
                    pruned=p.value,
                    stderr_dense=d.stderr if d else None,
                    stderr_pruned=p.stderr,
                    samples=p.samples,
                    source=task.source,
                )
            )
        return out

    def _prune(self, i: int, prune: PruneSpec, resume_dir: Path | None, cache: Any) -> PruneResult:
        """Prune variant ``i``: in memory (resident or onloaded by the engine), or from the input
        checkpoint into the staged output ``self.staged[i]`` (weights on disk)."""
        label, tag = self._tag(i)

        def on_block(p: Progress) -> None:
            if p.stage != "pruning":  # streaming writes the rest of the checkpoint after the blocks
                self.stages.emit(f"pruning{i}", 1.0, p.stage, tag + p.message, variant=label)
                return
            self.stages.emit(f"pruning{i}", p.fraction, "pruning", tag + p.message, block=p.block,
                             nblocks=p.nblocks, variant=label)  # fmt: skip

        ms = self.spec.model
        if self.disk is None:
            return engine.prune(self.model, self.calibration, prune, on_block, self.should_cancel, resume_dir,
                                capture_cache=cache, device=ms.device, max_device_memory=ms.max_device_memory,
                                max_host_memory=ms.max_host_memory)  # fmt: skip
        import torch

        self.staged[i] = self.tmp / f".streamed-{i}"
        info = streaming.prune_streaming(self.disk, self.staged[i], self.calibration, prune, on_block,
                                         self.should_cancel, resume_dir=resume_dir,
                                         dtype=getattr(torch, ms.dtype))  # fmt: skip
        (self.staged[i] / "report.json").unlink()
        return info

    def _prune_variant(self, i: int, prune: PruneSpec, resume_dir: Path | None, cache: Any) -> RunReport:
        """Prune the (dense) model with ``prune`` and evaluate it; the variant's report."""
        label, tag = self._tag(i)
        ev = self.spec.evaluation

        check_cancel(self.should_cancel)
        self.stages.emit(f"pruning{i}", 0.0, "pruning", f"{tag}pruning with {prune.method}", variant=label)
        if resume_dir is not None:
            resume_dir = resume_dir / (f"variants/{label}/blocks" if self.sweep else "blocks")
        info = self._prune(i, prune, resume_dir, cache)
        own: dict[str, float] = {"prune_s": info.prune_s, "mask_s": info.mask_s}
        if info.owl:
            own["owl_first_pass_s"] = info.owl["first_pass_s"]
        pruned = None
        if ev.enabled:
            t = time.perf_counter()
            pruned = self._ppl(f"pruned_eval{i}", f"{tag}pruned", i, variant=label)
            own["pruned_eval_s"] = time.perf_counter() - t
        recovered = recovery_stage.run(self, i, resume_dir, pruned, own)  # None unless spec.recovery.enabled
        t = time.perf_counter()
        after = generations.generate(self.model, self.tok, ev.generations) if self.disk is None else []
        texts = generations.pair(self.dense_text, after)
        own["generate_s"] = time.perf_counter() - t
        scores = self._run_tasks(f"pruned_tasks{i}", f"{tag}pruned", variant=label) if self.tasks else {}
        for k, v in own.items():
            self._add(k, v)
        if "pruned_eval_s" in own:
            self.timings["eval_s"] += own["pruned_eval_s"]
        evaluation = None
        if ev.enabled:
            ref = pruned or self.dense or {}
            evaluation = Evaluation(
                dense_ppl=self.dense["ppl"] if self.dense else None,
                dense_cached=self.dense_cached,
                pruned_ppl=pruned["ppl"] if pruned else None,
                windows=ref.get("windows"),
                seqlen=self.eval_seqlen,
                tokens=ref.get("tokens"),
                formula=evaluate.FORMULA,
                source=self.eval_source,
                tasks=self._task_scores(scores),
                recovered_ppl=recovered.recovered_ppl if recovered else None,
            )
        model, spec = self.model, self.spec
        shown = (
            self.reported.model_copy(update={"prune": prune, "sweep": None}) if self.sweep else self.reported
        )
        return RunReport(
            spec=shown.model_dump(mode="json"),
            versions=_versions(),
            model=self._model_info(),
            calibration=CalibrationInfo(
                source=self.cal_source,
                nsamples=int(self.calibration.shape[0]),
                seqlen=self.seqlen,
                seed=spec.calibration.seed,
            ),
            sparsity=SparsityInfo(**(info.sparsity or evaluate.sparsity_report(model, prune))),
            layers=info.layer_records,
            allocation=info.owl,
            evaluation=evaluation,
            timings=own,
            generations=[Generation(**g) for g in texts],
            placement=info.placement,
            streaming=self._streaming(info),
            experts=info.experts,
            warnings=list(info.warnings),
            variant=label,
            recovery=recovered,
        )

    def _model_info(self) -> ModelInfo:
        """The report's description of the (pruned) model."""
        model, cfg, spec = self.model, self.model.config, self.spec
        return ModelInfo(
            source=self.loaded.source,
            family=self.loaded.family.name,
            architecture=(getattr(cfg, "architectures", None) or [type(model).__name__])[0],
            model_type=cfg.model_type,
            nblocks=len(families.get_blocks(model, self.loaded.family)),
            params=sum(p.numel() for p in model.parameters()),
            dtype=spec.model.dtype,
            device=spec.model.device,
            gguf=self.loaded.gguf,
            gguf_cache=self.loaded.gguf_cache,
        )

    def _streaming(self, info: PruneResult) -> dict[str, Any]:
        """The report's ``streaming`` record."""
        if self.disk is None:
            return {"used": False, "mode": self.spec.model.stream}
        return {
            "used": True,
            "mode": self.spec.model.stream,
            "evaluation": STREAMING_EVAL_NOTE if self.spec.evaluation.enabled else "disabled",
            "checkpoint_bytes": info.checkpoint_bytes,
            "output_bytes": info.output_bytes,
            "spilled": info.spilled,
            "capture_s": info.timings["capture_s"],
            "blocks_s": info.timings["blocks_s"],
            "read_s": info.timings.get("read_s"),
            "write_s": info.timings.get("write_s"),
            "eval_read_s": self.eval_read_s,
        }

    def _export(self, i: int, root: Path, report: RunReport, shown: Path | str) -> float:
        """Write variant ``i``'s model artifacts under ``root`` (``shown`` in messages); seconds taken."""
        label, tag = self._tag(i)
        check_cancel(self.should_cancel)
        self.stages.emit(f"exporting{i}", 0.0, "exporting", f"{tag}writing {shown}", variant=label)
        t = time.perf_counter()
        root.mkdir(parents=True, exist_ok=True)
        outputs = self.spec.outputs
        ppl = self._format_ppl if self.spec.evaluation.enabled else None
        if self.disk is None:
            export.save_model(root, self.model, self.tok, outputs)
        else:  # the staged checkpoint is the output; formats are not loaded back whole to evaluate
            import shutil

            stage, ppl = self.staged.pop(i), None
            if outputs.model:
                (stage / "model").rename(root / "model")
            shutil.rmtree(stage)
        report.artifacts = export.save_formats(root, report, outputs, ppl)
        return time.perf_counter() - t

    def run(self, out: Path, t_start: float, resume_dir: Path | None) -> RunReport:
        spec = self.spec
        with _PeakRSS() as rss:
            self._setup()
            self._dense()
            blocks = families.get_blocks(self.model, self.loaded.family)
            restore = len(self.indices) > 1 and self.disk is None  # on disk each variant reads the input
            snapshot = sweep.DenseSnapshot(blocks) if restore else None
            cache = engine.CaptureCache()
            with export.staging_dir(out) as tmp:
                self.tmp = tmp
                if len(self.indices) == 1:  # no sweep, or one variant of a fanned-out sweep
                    i = self.indices[0]
                    report = self._prune_variant(i, self.variants[i][1], resume_dir, cache)
                    self.timings["export_s"] = self._export(i, tmp, report, out)
                    report.timings = self.timings
                    if self.only is not None:  # written as the serial sweep writes the variant
                        spec = spec.model_copy(update={"prune": self.variants[i][1], "sweep": None})
                else:
                    report = self._sweep(tmp, snapshot, resume_dir, cache)
                self.timings["total_s"] = time.perf_counter() - t_start
                rss._sample()
                report.peak_rss_mb = round(rss.mb, 1)
                report.peak_cuda_mb = _cuda_peak(spec.model.device)
                report_doc.finish(tmp, report, spec)
                export.write_reports(tmp, report, spec.outputs)
                check_cancel(self.should_cancel)
            last = self.indices[-1]
            label, tag = self._tag(last) if self.only is not None else (None, "")
            self.stages.emit(f"exporting{last}", 1.0, "exporting", f"{tag}exported" if tag else "done",
                             variant=label)  # fmt: skip
        if resume_dir is not None:
            resume.clear(resume_dir)
        return report

    def _sweep(
        self, tmp: Path, snapshot: sweep.DenseSnapshot | None, resume_dir: Path | None, cache: Any
    ) -> RunReport:
        """Every variant into ``tmp/variants/<label>/``; the top-level report (headline variant)."""
        reports: dict[str, RunReport] = {}
        for i, (label, prune) in enumerate(self.variants):
            if i and snapshot is not None:
                t = time.perf_counter()
                snapshot.restore()
                self._add("restore_s", time.perf_counter() - t)
            rep = self._prune_variant(i, prune, resume_dir, cache)
            vroot = tmp / sweep.VARIANTS_DIR / label
            rep.timings["export_s"] = self._export(i, vroot, rep, f"{sweep.VARIANTS_DIR}/{label}")
            vspec = self.spec.model_copy(update={"prune": prune, "sweep": None})
            report_doc.finish(vroot, rep, vspec)
            export.write_reports(vroot, rep, self.spec.outputs)
            self._add("export_s", rep.timings["export_s"])
            reports[label] = rep
            self.stages.emit(f"exporting{i}", 1.0, "exporting", f"{self._tag(i)[1]}exported", variant=label)
        ordered = [reports[label] for label, _ in self.variants]
        return sweep.sweep_report(self.spec, self.reported, ordered, self.timings, cache.captures)


def _cuda_peak(device: str) -> float | None:
    if device != "cuda":
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**20, 1)
