"""The run specification shared by the engine, its CLI, the worker and the API.

Pure pydantic: importing this module never imports torch, so the API can validate
job bodies with exactly the rules the engine enforces.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

METHODS: tuple[str, ...] = ("wanda", "magnitude", "sparsegpt", "ria", "alps")
"""Method names; `core.methods.REGISTRY` must hold exactly these (a test checks)."""

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
NAMED_DATASETS: tuple[str, ...] = ("wikitext2", "c4")

_NM = re.compile(r"([1-9][0-9]*):([1-9][0-9]*)")
"""N:M in ASCII digits without leading zeros, matched whole (`re.fullmatch`: no trailing newline)."""
MAX_NM_M = 64
"""Largest M of an N:M pattern. Hardware formats use M = 4 or 8; 64 leaves room for experiments while
refusing nonsense like 1:1000000000000 at submit time."""
_SHARD = re.compile(r"([1-9][0-9]{0,5})(KB|MB|GB)")
CPU_BATCH_TOKENS = 1024
"""Tokens per calibration forward on the CPU when ``PruneSpec.batch_size`` is unset (measured
fastest on SmolLM2-135M: 1 or 2 samples of 512 tokens beat 8; docs/benchmarks.md)."""
GPU_BATCH_TOKENS = 16384
"""Tokens per calibration forward a CUDA run aims at when ``PruneSpec.batch_size`` is unset (8 samples
of 2048 tokens); :func:`core.model.placement.plan_run` halves it until it fits the free device memory."""


OWL_M, OWL_LAMBDA = 5.0, 0.08
DSNOT_ITERS, DSNOT_THRESHOLD, DSNOT_VAR_POWER = 50, 0.1, 1.0
RIA_ALPHA = 0.5
RECON_TOKENS = 256
RECONSTRUCT_ITERS, RECONSTRUCT_TOL = 10, 1e-4
ALPS_ITERS, ALPS_RHO, ALPS_RHO_MAX, ALPS_RHO_VALUES = 12, 0.1, 10.0, 6
MAX_VARIANTS = 16
"""Most variants one sweep may ask for."""
MAX_TASKS = 8
MAX_IGNORE = 128
"""Most `prune.ignore` patterns (a stored job is validated on every read, so its size is bounded)."""
MAX_IGNORE_CHARS = 256
"""Longest `prune.ignore` pattern (a qualified layer name with wildcards)."""
TASK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""A zero-shot task name: also the folder name under ``$PRUNE_DATA_DIR/lm_eval_tasks/``."""
MethodName = Literal["wanda", "magnitude", "sparsegpt", "ria", "alps"]


class _Strict(BaseModel):
    """Unknown fields refused; strict types (no "0.5" string for a float, no 1.0 for an int)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)  # no inf/NaN


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """Return (N, M) for an "N:M" pattern, None for "unstructured"; raise ValueError otherwise."""
    if pattern == "unstructured":
        return None
    m = _NM.fullmatch(pattern)
    if not m:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' (e.g. '2:4'), got {pattern!r}")
    if len(m.group(2)) > 3 or int(m.group(2)) > MAX_NM_M:
        raise ValueError(f"N:M pattern needs M <= {MAX_NM_M}, got {pattern!r}")
    n, mm = int(m.group(1)), int(m.group(2))
    if not 0 < n < mm:
        raise ValueError(f"N:M pattern needs 1 <= N < M, got {pattern!r}")
    return n, mm


def shard_bytes(size: str) -> int:
    """Bytes of a ``max_shard_size`` such as "500MB" (ASCII digits, > 0); ValueError otherwise."""
    m = _SHARD.fullmatch(size)
    if not m:
        raise ValueError(f"max_shard_size must be a positive size such as '500MB' or '2GB', got {size!r}")
    return int(m.group(1)) * {"KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)]


def check_prunes_something(prune: PruneSpec) -> None:
    """Refuse a job that would prune nothing: sparsity 0, or ignore patterns matching every name.
    (Patterns that match every layer of one particular model are refused by `core.run.preflight`.)"""
    if prune.target_sparsity == 0.0:
        raise ValueError("sparsity 0 prunes nothing; use a sparsity in (0, 1)")
    probes = ("model.layers.0.self_attn.q_proj", "transformer.h.0.mlp.c_fc", "x")
    hit = [p for p in prune.ignore if all(fnmatch.fnmatchcase(name, p) for name in probes)]
    if hit:
        raise ValueError(f"ignore pattern {hit[0]!r} matches every layer: nothing would be pruned")


class PruneSpec(_Strict):
    """What to prune and how. Validated once, here, for every entry point."""

    method: MethodName = Field(default="wanda", description="Pruning method (docs/methods.md).")
    sparsity: float | None = Field(
        default=None,
        description="Fraction of weights zeroed in each pruned layer, in [0, 1). "
        "Defaults to 0.5 for unstructured and to 1 - N/M for N:M.",
    )
    pattern: str = Field(default="unstructured", description="'unstructured' or 'N:M' (keep N of every M).")
    variant: bool = Field(default=False, description="Wanda's appendix variant (unstructured wanda only).")
    ignore: list[Annotated[str, StringConstraints(max_length=MAX_IGNORE_CHARS)]] = Field(
        default_factory=list,
        max_length=MAX_IGNORE,
        description="fnmatch patterns over qualified layer names (e.g. 'model.layers.0.*') to leave dense "
        f"(at most {MAX_IGNORE}, each at most {MAX_IGNORE_CHARS} characters).",
    )
    prune_routers: bool = Field(
        default=False,
        description="Also prune MoE routers/gates (modules named gate/router beside an experts module); "
        "kept dense by default.",
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Calibration samples per forward pass. Default: about 1024 tokens per forward on the "
        "CPU (cache-sized activations run fastest there); on CUDA about 16384 tokens, halved until the "
        "batch's working set fits the free device memory beside the weights and activations.",
    )
    blocksize: int = Field(default=128, ge=1, le=8192, description="SparseGPT column block size.")
    percdamp: float = Field(default=0.01, gt=0, lt=1, description="SparseGPT Hessian dampening fraction.")
    allocation: Literal["uniform", "owl"] = Field(
        default="uniform",
        description="Per-block sparsity: 'uniform' (every layer at the target) or 'owl' (outlier-weighted, "
        "unstructured only; the whole model's counted sparsity still equals the target; docs/methods.md).",
    )
    owl_m: float = Field(
        default=OWL_M, gt=0, le=1000, description="OWL: outlier = Wanda score > M x block mean."
    )
    owl_lambda: float = Field(
        default=OWL_LAMBDA,
        ge=0,
        lt=0.5,
        description="OWL: block sparsities lie in [target - lambda, target + lambda].",
    )
    refine: Literal["none", "dsnot"] = Field(
        default="none",
        description="Mask refinement after the method: 'dsnot' = training-free prune-and-grow swaps "
        "(each row's sparsity and the N:M pattern stay exact).",
    )
    dsnot_iters: int = Field(
        default=DSNOT_ITERS, ge=1, le=10000, description="DSnoT: maximum swap cycles per layer."
    )
    dsnot_threshold: float = Field(
        default=DSNOT_THRESHOLD,
        ge=0,
        le=1e6,
        description="DSnoT: a row stops when |expected output error| <= this.",
    )
    dsnot_var_power: float = Field(
        default=DSNOT_VAR_POWER,
        ge=0,
        le=8,
        description="DSnoT: growing score divided by input variance ** this.",
    )
    ria_alpha: float = Field(
        default=RIA_ALPHA, ge=0, le=8, description="RIA: exponent a of ||X_j|| in the score."
    )
    ria_permute: bool = Field(
        default=False,
        description="RIA, N:M only: choose N:M groups over a channel permutation (exported weights stay "
        "in the original column order; the report lists each layer's permutation).",
    )
    reconstruct: Literal["none", "pcg", "admm"] = Field(
        default="none",
        description="Weight reconstruction after the mask (any method, refinement or allocation): solve "
        "the kept weights for min ||WX - W'X||^2 on the layer's calibration Gram, mask unchanged; 'pcg' = "
        "conjugate gradient on the kept support, 'admm' = fixed-mask ADMM then CG (docs/methods.md).",
    )
    reconstruct_iters: int = Field(
        default=RECONSTRUCT_ITERS,
        ge=1,
        le=1000,
        description="Reconstruction (and ALPS's refinement): most conjugate-gradient iterations per layer.",
    )
    reconstruct_tol: float = Field(
        default=RECONSTRUCT_TOL,
        gt=0,
        lt=1,
        description="Reconstruction: a row's CG stops at residual <= tol x its right-hand side.",
    )
    alps_iters: int = Field(
        default=ALPS_ITERS, ge=1, le=1000, description="ALPS: ADMM iterations with support updates per layer."
    )
    alps_rho: float = Field(
        default=ALPS_RHO, gt=0, le=1e6, description="ALPS: initial ADMM penalty (normalised Gram)."
    )
    alps_rho_max: float = Field(
        default=ALPS_RHO_MAX, gt=0, le=1e6, description="ALPS: final ADMM penalty (geometric schedule)."
    )
    alps_rho_values: int = Field(
        default=ALPS_RHO_VALUES,
        ge=1,
        le=1000,
        description="ALPS: penalty values from alps_rho to alps_rho_max, each held for an equal share of "
        "the iterations (one Cholesky factorisation each; at most alps_iters are used).",
    )
    recon_tokens: int = Field(
        default=RECON_TOKENS,
        ge=1,
        le=10**7,
        description="Calibration tokens per layer, spread evenly over the calibration set, on which the "
        "report's reconstruction error ||WX - W'X|| / ||WX|| is measured.",
    )

    def batch_for(self, seqlen: int, device_type: str) -> int:
        """The batch size to use: ``batch_size`` if set, else the default for the device."""
        if self.batch_size is not None:
            return self.batch_size
        if device_type == "cpu":
            return max(1, CPU_BATCH_TOKENS // max(1, seqlen))
        return max(1, GPU_BATCH_TOKENS // max(1, seqlen))

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, v: str) -> str:
        parse_pattern(v)
        return v

    @field_validator("sparsity")
    @classmethod
    def _check_sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _check_consistency(self) -> PruneSpec:
        nm = parse_pattern(self.pattern)
        if nm is None:
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)
        else:
            n, m = nm
            implied = 1.0 - n / m
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", implied)
            elif abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity {self.sparsity} contradicts pattern {self.pattern} (which means {implied:g})"
                )
            if self.variant:
                raise ValueError("variant=true is defined for unstructured sparsity only, not N:M")
        if self.variant and self.method != "wanda":
            raise ValueError("variant=true applies to method 'wanda' only")
        self._check_options(nm)
        return self

    def _check_options(self, nm: tuple[int, int] | None) -> None:
        """Refuse OWL/DSnoT/RIA combinations that are undefined or whose options would be ignored."""
        if self.allocation == "owl":
            if nm is not None:
                raise ValueError(
                    "allocation 'owl' is defined for unstructured sparsity only: "
                    f"pattern {self.pattern} fixes every layer's sparsity at 1 - N/M, "
                    "so there is nothing to allocate"
                )
            if self.variant:
                raise ValueError(
                    "allocation 'owl' needs exact per-layer counts; variant=true chooses its own"
                )
            s, lam = self.target_sparsity, self.owl_lambda
            if s - lam < 0 or s + lam >= 1:
                raise ValueError(
                    f"allocation 'owl': block sparsities must stay in [0, 1), but target {s:g} +/- lambda "
                    f"{lam:g} leaves that range; lower owl_lambda"
                )
        elif self.owl_m != OWL_M or self.owl_lambda != OWL_LAMBDA:
            raise ValueError("owl_m / owl_lambda only apply with allocation 'owl'")
        dsnot_set = (self.dsnot_iters, self.dsnot_threshold, self.dsnot_var_power) != (
            DSNOT_ITERS,
            DSNOT_THRESHOLD,
            DSNOT_VAR_POWER,
        )
        if self.refine != "dsnot" and dsnot_set:
            raise ValueError("dsnot_iters / dsnot_threshold / dsnot_var_power only apply with refine 'dsnot'")
        if self.method != "ria" and (self.ria_alpha != RIA_ALPHA or self.ria_permute):
            raise ValueError("ria_alpha / ria_permute only apply to method 'ria'")
        self._check_reconstruct()
        if self.ria_permute and nm is None:
            raise ValueError(
                "ria_permute is the channel permutation for N:M patterns; it needs pattern 'N:M'"
            )

    def _check_reconstruct(self) -> None:
        """Refuse reconstruction/ALPS options that would be ignored."""
        if self.reconstruct == "none" and self.method != "alps":
            if (self.reconstruct_iters, self.reconstruct_tol) != (RECONSTRUCT_ITERS, RECONSTRUCT_TOL):
                raise ValueError(
                    "reconstruct_iters / reconstruct_tol only apply with reconstruct or method 'alps'"
                )
        alps = (self.alps_iters, self.alps_rho, self.alps_rho_max, self.alps_rho_values)
        if self.method != "alps" and alps != (ALPS_ITERS, ALPS_RHO, ALPS_RHO_MAX, ALPS_RHO_VALUES):
            raise ValueError("alps_iters, alps_rho(_max), alps_rho_values only apply to method 'alps'")
        if self.alps_rho_max < self.alps_rho:
            raise ValueError(f"alps_rho_max ({self.alps_rho_max:g}) must be >= alps_rho ({self.alps_rho:g})")

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) or None for unstructured."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """Sparsity as a float (never None after validation)."""
        assert self.sparsity is not None
        return self.sparsity


class ModelSpec(_Strict):
    """Where the model comes from and how it is loaded."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description="Local Hugging Face directory, a .gguf file, or a hub id (when online).",
    )
    gguf_file: str | None = Field(default=None, max_length=512, description="GGUF file name inside `source`.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(default="float32", description="Weights' dtype.")
    device: Literal["cpu", "cuda"] = Field(default="cpu", description="Where the model runs.")
    stream: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="Prune block by block from the safetensors files without loading the model whole. "
        "'auto': when a local safetensors checkpoint exceeds 40% of available RAM (CPU only). "
        "Streaming runs evaluate perplexity block by block from the checkpoints.",
    )
    max_device_memory: int | None = Field(
        default=None,
        ge=0,
        description="Bytes of the compute device's memory the run may use; when the weights do not fit, "
        "blocks are onloaded one at a time from host memory. Default: the worker's "
        "PRUNE_MAX_DEVICE_MEMORY, else 90% of the device's free memory.",
    )
    max_host_memory: int | None = Field(
        default=None,
        ge=0,
        description="Bytes of host memory the run may use; calibration activations beyond it spill to "
        "disk. Default: the worker's PRUNE_MAX_HOST_MEMORY, else 90% of the available memory.",
    )


class CalibrationSpec(_Strict):
    """Calibration text and how windows are drawn from it."""

    source: str = Field(
        default="wikitext2",
        min_length=1,
        max_length=1024,
        description="Named dataset (wikitext2, c4), a text file, a folder of .txt files, or a .jsonl file.",
    )
    text_field: str = Field(default="text", max_length=128, description="Field holding the text in JSONL.")
    nsamples: int = Field(default=128, ge=1, le=4096, description="Calibration windows.")
    seqlen: int | None = Field(
        default=None, ge=8, le=131072, description="Default: min(2048, model context)."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="Seed of the random calibration windows.")


class EvalSpec(_Strict):
    """Perplexity evaluation over non-overlapping windows."""

    enabled: bool = Field(default=True, description="Measure perplexity (dense and pruned).")
    source: str = Field(
        default="wikitext2",
        min_length=1,
        max_length=1024,
        description="Evaluation text: named dataset (wikitext2, c4), a text file, a folder or a .jsonl file.",
    )
    text_field: str = Field(default="text", max_length=128, description="Field holding the text in JSONL.")
    seqlen: int | None = Field(default=None, ge=8, le=131072, description="Default: the calibration seqlen.")
    max_windows: int | None = Field(default=None, ge=1, le=100000, description="Default: every full window.")
    dense_baseline: bool = Field(default=True, description="Also measure the dense model's perplexity.")
    generations: int = Field(
        default=3, ge=0, le=3, description="Fixed prompts continued greedily by the dense and pruned model."
    )
    tasks: list[str] = Field(
        default_factory=list,
        max_length=MAX_TASKS,
        description="Zero-shot tasks run with lm-evaluation-harness on the dense and the pruned model "
        "(block by block when the weights are not all on the device): a task folder "
        "$PRUNE_DATA_DIR/lm_eval_tasks/<task>/ (YAML + local data files), "
        "else the harness's own task of that name from the hub when online.",
    )
    task_limit: int | None = Field(
        default=None, ge=1, le=100000, description="Examples per task (default: all of them)."
    )

    @field_validator("tasks")
    @classmethod
    def _check_tasks(cls, v: list[str]) -> list[str]:
        for name in v:
            if not TASK_NAME.fullmatch(name):
                raise ValueError(f"task name {name!r} must be letters, digits, '_', '.' or '-' (<= 64)")
        if len(set(v)) != len(v):
            raise ValueError(f"tasks must not repeat, got {v}")
        return v


class OutputSpec(_Strict):
    """Which artifacts to produce."""

    model: bool = Field(default=True, description="Export the pruned Hugging Face directory.")
    report: bool = Field(default=True, description="Write report.md (report.json is always written).")
    max_shard_size: str = Field(default="2GB", description="Safetensors shard size: a positive KB, MB or GB.")

    @field_validator("max_shard_size")
    @classmethod
    def _check_shard(cls, v: str) -> str:
        shard_bytes(v)
        return v

    formats: list[Literal["dense", "compact", "int8", "compact-int8"]] = Field(
        default_factory=lambda: ["dense"],
        min_length=1,
        description="Model artifacts to write (docs/formats.md): 'dense' (model/, safetensors with zeros), "
        "'compact' (compact/, lossless sparse), 'int8' (int8/, compressed-tensors int8 weight-only), "
        "'compact-int8' (compact-int8/, int8 values + sparse mask).",
    )

    @field_validator("formats")
    @classmethod
    def _unique_formats(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"formats must not repeat, got {v}")
        return v


class GateSpec(_Strict):
    """Quality gate: a job that misses it still succeeds, keeps its artifacts and reports
    ``gate.passed = false`` (``prunectl submit --wait`` exits 6)."""

    max_ppl_ratio: float | None = Field(default=None, gt=0, description="Largest pruned/dense perplexity.")
    max_pruned_ppl: float | None = Field(default=None, gt=0, description="Largest pruned perplexity.")
    min_sparsity: float | None = Field(
        default=None, ge=0, lt=1, description="Smallest measured sparsity of the pruned layers."
    )

    @model_validator(mode="after")
    def _some_limit(self) -> GateSpec:
        if self.max_ppl_ratio is None and self.max_pruned_ppl is None and self.min_sparsity is None:
            raise ValueError("a gate needs at least one of max_ppl_ratio, max_pruned_ppl, min_sparsity")
        return self


class SweepSpec(_Strict):
    """Several variants of one job: every combination of ``methods`` x ``patterns`` x ``sparsities``
    (an empty list keeps the ``prune`` section's value; ``sparsities`` apply to the unstructured
    pattern, an N:M pattern implies its own). The other ``prune`` options are shared."""

    sparsities: list[float] = Field(
        default_factory=list, max_length=MAX_VARIANTS, description="Sparsity targets of the variants."
    )
    patterns: list[str] = Field(
        default_factory=list, max_length=MAX_VARIANTS, description="Patterns ('unstructured', 'N:M')."
    )
    methods: list[MethodName] = Field(
        default_factory=list, max_length=len(METHODS), description="Methods of the variants."
    )

    @field_validator("sparsities")
    @classmethod
    def _check_sparsities(cls, v: list[float]) -> list[float]:
        bad = [x for x in v if not 0.0 < x < 1.0]
        if bad:
            raise ValueError(f"sweep sparsities must be in (0, 1), got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError(f"sweep sparsities must not repeat, got {v}")
        return v

    @field_validator("patterns")
    @classmethod
    def _check_patterns(cls, v: list[str]) -> list[str]:
        for p in v:
            parse_pattern(p)
        if len(set(v)) != len(v):
            raise ValueError(f"sweep patterns must not repeat, got {v}")
        return v

    @model_validator(mode="after")
    def _not_empty(self) -> SweepSpec:
        if not (self.sparsities or self.patterns or self.methods):
            raise ValueError("a sweep needs at least one of sparsities, patterns, methods")
        return self


RECOVERY_STEPS = 100
"""Optimizer steps of a recovery with neither ``steps`` nor ``tokens`` set."""


class RecoverySpec(_Strict):
    """A short, mask-preserving fine-tune after pruning (``core.run.recovery``; docs/methods.md).

    The pruned weights stay exactly zero: merged weights are ``(W + dW) * mask``. Off by default.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    enabled: bool = Field(default=False, description="Run the recovery stage after pruning.")
    mode: Literal["masked", "lora"] = Field(
        default="masked",
        description="'masked': full fine-tune of the pruned matrices with their zeros held at zero; "
        "'lora': low-rank adapters (plain torch) merged as (W + BA) * mask.",
    )
    source: str | None = Field(
        default=None,
        min_length=1,
        max_length=1024,
        description="Training text (same forms as calibration.source). Default: the calibration source "
        "(wikitext2: valid.txt). Must differ from the evaluation text.",
    )
    text_field: str | None = Field(
        default=None, max_length=128, description="JSONL field; default calibration's."
    )
    steps: int | None = Field(default=None, ge=1, le=10**6, description="Optimizer steps (budget).")
    tokens: int | None = Field(
        default=None,
        ge=1,
        le=10**11,
        description="Training tokens (budget): steps = ceil(tokens / (batch * seqlen)); with `steps` too, "
        f"the smaller. Neither: {RECOVERY_STEPS} steps.",
    )
    lr: float = Field(
        default=1e-4, gt=0, le=1.0, description="Peak learning rate (AdamW; warmup then cosine)."
    )
    weight_decay: float = Field(default=0.0, ge=0, le=1.0)
    warmup_steps: int = Field(default=10, ge=0, le=10**5, description="Linear warmup steps.")
    grad_clip: float = Field(default=1.0, ge=0, le=1e4, description="Gradient norm clip (0: off).")
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank (mode 'lora').")
    alpha: float = Field(default=32.0, gt=0, le=1e4, description="LoRA scale alpha / rank (mode 'lora').")
    seqlen: int | None = Field(
        default=None,
        ge=8,
        le=131072,
        description="Tokens per training window; default the calibration seqlen.",
    )
    batch: int = Field(default=8, ge=1, le=1024, description="Windows per optimizer step.")
    seed: int = Field(
        default=0, ge=0, le=2**31 - 1, description="Order of the training windows; adapter init."
    )
    checkpoint_every: int = Field(
        default=10,
        ge=1,
        le=10**6,
        description="Steps between resume checkpoints (a job with a resume directory).",
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Recompute block activations in the backward pass; 'auto': when the estimated "
        "activations would exceed a quarter of the free memory.",
    )

    @model_validator(mode="after")
    def _check_options(self) -> RecoverySpec:
        if not self.enabled:
            changed = self.model_dump(exclude={"enabled"}) != RecoverySpec.model_construct().model_dump(
                exclude={"enabled"}
            )
            if changed:
                raise ValueError("recovery options apply with recovery.enabled = true")
        if self.mode != "lora" and (self.rank != 16 or self.alpha != 32.0):
            raise ValueError("recovery.rank / recovery.alpha only apply to mode 'lora'")
        return self

    def max_steps(self, seqlen: int) -> int:
        """Optimizer steps of the budget for windows of ``seqlen`` tokens."""
        limits = [self.steps] if self.steps is not None else []
        if self.tokens is not None:
            limits.append(max(1, -(-self.tokens // (self.batch * seqlen))))
        return min(limits) if limits else RECOVERY_STEPS


def variant_label(prune: PruneSpec) -> str:
    """A short, path-safe name of one variant: ``wanda-0.5``, ``sparsegpt-2of4``."""
    if prune.nm is not None:
        return f"{prune.method}-{prune.nm[0]}of{prune.nm[1]}"
    return f"{prune.method}-{prune.target_sparsity:g}"


def sweep_variants(prune: PruneSpec, sweep: SweepSpec) -> list[tuple[str, PruneSpec]]:
    """``[(label, PruneSpec)]`` of every variant, in order (methods, then patterns, then sparsities);
    ValueError naming the variant that is not a valid prune spec."""
    base = prune.model_dump()
    out: list[tuple[str, PruneSpec]] = []
    patterns = sweep.patterns or [prune.pattern]
    if sweep.sparsities and "unstructured" not in patterns:
        raise ValueError("sweep.sparsities apply to the unstructured pattern; add 'unstructured' to "
                         "sweep.patterns (an N:M pattern fixes its sparsity)")  # fmt: skip
    for method in sweep.methods or [prune.method]:
        for pattern in patterns:
            if pattern == "unstructured":
                default = prune.target_sparsity if prune.nm is None else 0.5
                levels: list[float | None] = list(sweep.sparsities or [default])
            else:
                levels = [None]
            for level in levels:
                body = {**base, "method": method, "pattern": pattern, "sparsity": level}
                try:
                    v = PruneSpec.model_validate(body)
                except ValidationError as e:
                    what = f"{method} {pattern}" + (f" sparsity {level:g}" if level is not None else "")
                    msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
                    raise ValueError(f"sweep variant {what}: {msgs}") from None
                out.append((variant_label(v), v))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ValueError(f"sweep variants must have distinct names, got {labels}")
    if len(out) > MAX_VARIANTS:
        raise ValueError(f"a sweep may have at most {MAX_VARIANTS} variants, this one has {len(out)}")
    return out


class RunSpec(_Strict):
    """A whole run: model, pruning, calibration, evaluation, outputs, optional quality gate and sweep."""

    model: ModelSpec
    prune: PruneSpec = Field(default_factory=PruneSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    evaluation: EvalSpec = Field(default_factory=EvalSpec)
    outputs: OutputSpec = Field(default_factory=OutputSpec)
    gate: GateSpec | None = Field(
        default=None,
        description="Quality gate (docs/ci.md); for a sweep it picks the sparsest passing variant.",
    )
    sweep: SweepSpec | None = Field(
        default=None,
        description="Several variants in one job (the model loaded, calibrated and evaluated dense once); "
        "each variant's artifacts and report go under variants/<label>/.",
    )
    recovery: RecoverySpec = Field(
        default_factory=RecoverySpec,
        description="Mask-preserving fine-tune after pruning, before evaluation and export (off by default).",
    )

    def variants(self) -> list[tuple[str, PruneSpec]]:
        """``[(label, PruneSpec)]``: the sweep's variants, or the one ``prune`` section."""
        if self.sweep is None:
            return [(variant_label(self.prune), self.prune)]
        return sweep_variants(self.prune, self.sweep)

    @field_validator("sweep")
    @classmethod
    def _variants_valid(cls, v: SweepSpec | None, info: ValidationInfo) -> SweepSpec | None:
        prune = info.data.get("prune")
        if v is not None and isinstance(prune, PruneSpec):
            sweep_variants(prune, v)  # every variant is a valid prune spec (errors located at `sweep`)
        return v

    @model_validator(mode="after")
    def _sweep_valid(self) -> RunSpec:
        if self.recovery.enabled and self.model.stream == "always":
            raise ValueError("recovery trains the in-memory model: use model.stream 'never' or 'auto'")
        if self.evaluation.tasks and not self.evaluation.enabled:
            raise ValueError("evaluation.tasks need evaluation.enabled = true")
        return self

    @model_validator(mode="after")
    def _prunes_something(self) -> RunSpec:
        check_prunes_something(self.prune)  # a run that would prune nothing is a mistake (CLI 2, HTTP 422)
        return self

    @model_validator(mode="after")
    def _gate_measurable(self) -> RunSpec:
        g = self.gate
        if g is not None and (g.max_ppl_ratio is not None or g.max_pruned_ppl is not None):
            if not self.evaluation.enabled:
                raise ValueError("gate limits on perplexity need evaluation.enabled = true")
            if g.max_ppl_ratio is not None and not self.evaluation.dense_baseline:
                raise ValueError("gate.max_ppl_ratio needs evaluation.dense_baseline = true")
        return self
