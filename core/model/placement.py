"""Where a run's weights and calibration activations live, decided from measured sizes and budgets.

Three places, nearest first: the compute **device** (``cpu`` or ``cuda``), **host** memory (pinned
for CUDA), and **disk** (the checkpoint's safetensors shards for weights, one ``torch.save`` file
per batch for activations). On the CPU the device *is* the host, so a CPU run uses ``device`` or
``disk`` only.

:func:`plan` is pure arithmetic over byte counts (tested without a GPU); :func:`free_memory`
measures what the device and the host have free, the defaults of the budgets
(``max_device_memory`` / ``max_host_memory``: :class:`core.spec.ModelSpec` fields, else the
worker's ``PRUNE_MAX_DEVICE_MEMORY`` / ``PRUNE_MAX_HOST_MEMORY``, else a fraction of what is free).
The resulting :class:`Placement` is written to the report with the reasons for each choice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

__all__ = [
    "FREE_FRACTION",
    "Placement",
    "Where",
    "activation_bytes",
    "block_work_bytes",
    "budgets",
    "fit_batch",
    "free_memory",
    "module_bytes",
    "plan",
    "plan_run",
    "spill_area",
    "weights_fit",
]

Where = Literal["device", "host", "disk"]

FREE_FRACTION = 0.9
"""Share of the free memory a default budget takes (the rest is left to the allocator and others)."""


@dataclass
class Placement:
    """What :func:`plan` chose, with the sizes it compared and why."""

    device: str
    """The compute device every block is brought to (``cpu``, ``cuda``, ``cuda:1``...)."""
    weights: Where
    activations: Where
    pinned: bool = False
    """Host-side tensors (activations; weights the caller pinned) use page-locked memory (CUDA)."""
    sizes: dict[str, int] = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    batch_size: int | None = None
    """Calibration samples per forward (:func:`plan_run`: chosen from the device budget on CUDA)."""

    @property
    def onload(self) -> bool:
        """Whether blocks are brought to the device one at a time (weights not resident there)."""
        return self.weights != "device"

    def report(self) -> dict[str, Any]:
        """The report's ``placement`` record."""
        return asdict(self)


def _gib(n: int | float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _place_weights(
    why: list[str],
    cpu: bool,
    weights: int,
    block: int,
    work: int,
    device_budget: int,
    host_budget: int,
    weights_on_disk: bool,
    weights_at: Where | None,
) -> tuple[Where, int]:
    """``(where the weights go, bytes then in use on the device)``; appends the reason to ``why``."""
    if weights_at is not None:
        where_w: Where = weights_at
        on_device = weights + work if weights_at == "device" else 2 * block + work
        why.append(
            f"weights {_gib(weights)} placed by the caller: "
            + (
                "resident on the device"
                if weights_at == "device"
                else f"on the {weights_at}, brought to the device block by block"
            )
        )
    elif weights + work <= device_budget:
        where_w = "device"
        on_device = weights + work
        why.append(
            f"weights {_gib(weights)} + working set {_gib(work)} fit the device budget {_gib(device_budget)}"
        )
    elif not cpu and weights <= host_budget:
        where_w, on_device = "host", 2 * block + work
        why.append(
            f"weights {_gib(weights)} exceed the device budget {_gib(device_budget)}: kept in host "
            f"memory ({_gib(host_budget)}), one block at a time on the device"
        )
    elif weights_on_disk:
        where_w, on_device = "disk", 2 * block + work
        why.append(
            f"weights {_gib(weights)} exceed the host budget {_gib(host_budget)}: read from the "
            "checkpoint block by block"
        )
    else:
        where_w, on_device = ("device", weights + work) if cpu else ("host", 2 * block + work)
        why.append(
            f"weights {_gib(weights)} exceed the budgets but are already in memory: "
            f"{'resident' if cpu else 'host memory, onloaded block by block'}"
        )
    return where_w, on_device


def _place_activations(
    why: list[str],
    cpu: bool,
    activations: int,
    on_device: int,
    host_used: int,
    device_budget: int,
    host_budget: int,
) -> Where:
    """Where the calibration activations go beside the weights; appends the reason to ``why``."""
    # Two copies of the activations live at once while a block re-runs (inputs, new outputs).
    if on_device + 2 * activations <= device_budget:
        where_a: Where = "device"
        why.append(
            f"activations {_gib(activations)} (x2 while a block re-runs) fit beside them on the device"
        )
    elif not cpu and host_used + 2 * activations <= host_budget:
        where_a = "host"
        why.append(
            f"activations {_gib(activations)} do not fit the device beside the weights: pinned host memory"
        )
    else:
        where_a = "disk"
        why.append(f"activations {_gib(activations)} (x2) do not fit the memory budget: spilled to disk")
    return where_a


def plan(
    device: str,
    weights: int,
    block: int,
    activations: int,
    work: int,
    device_budget: int,
    host_budget: int,
    weights_on_disk: bool = False,
    weights_at: Where | None = None,
) -> Placement:
    """Place weights and activations.

    ``weights``: bytes of the whole model; ``block``: of its largest decoder block plus what is not
    in a block (embeddings, head: brought to the device for the capture and the evaluation);
    ``activations``: the calibration hidden states (one copy); ``work``: the per-block working set
    on the device besides the weights (statistics such as SparseGPT Hessians, one batch's
    intermediates). ``weights_on_disk``: the weights can be read block by block from a file
    (safetensors), so they may stay there. ``weights_at``: the weights are already placed there
    (by the caller); only the activations are placed.
    """
    cpu = torch.device(device).type == "cpu"
    if cpu:
        host_budget = device_budget = min(device_budget, host_budget)
    sizes = {
        "weights": weights,
        "block": block,
        "activations": activations,
        "work": work,
        "device_budget": device_budget,
        "host_budget": host_budget,
    }
    why: list[str] = []
    where_w, on_device = _place_weights(
        why, cpu, weights, block, work, device_budget, host_budget, weights_on_disk, weights_at
    )
    host_used = weights if where_w == "host" else 0
    where_a = _place_activations(why, cpu, activations, on_device, host_used, device_budget, host_budget)
    sizes["device_use"] = on_device + (2 * activations if where_a == "device" else 0)
    return Placement(
        device=str(device),
        weights=where_w,
        activations=where_a,
        pinned=not cpu and "host" in (where_w, where_a),
        sizes=sizes,
        reasons=why,
    )


def free_memory(device: str) -> tuple[int, int]:
    """``(device free bytes, host available bytes)``; on the CPU both are the host's."""
    import psutil

    host = int(psutil.virtual_memory().available)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free), host
    return host, host


def budgets(device: str, max_device_memory: int | None, max_host_memory: int | None) -> tuple[int, int]:
    """The budgets: the given values, else the worker's settings, else :data:`FREE_FRACTION` of free."""
    from core.settings import EngineSettings

    st = EngineSettings.from_env()
    dev_b = max_device_memory if max_device_memory is not None else st.max_device_memory
    host_b = max_host_memory if max_host_memory is not None else st.max_host_memory
    if dev_b is None or host_b is None:
        free_dev, free_host = free_memory(device)
        dev_b = dev_b if dev_b is not None else int(FREE_FRACTION * free_dev)
        host_b = host_b if host_b is not None else int(FREE_FRACTION * free_host)
    return dev_b, host_b


def plan_run(
    model: nn.Module,
    blocks: nn.ModuleList,
    ids_shape: tuple[int, ...] | torch.Size,
    batch_size: int,
    device: torch.device,
    weights_at: Where,
    hessians: bool,
    limits: tuple[int | None, int | None],
    spill_dir: Path | None = None,
    fit: bool = False,
) -> Placement:
    """:func:`plan` for a block loop over ``ids_shape`` ``[n, seqlen]`` windows, measured on ``model``,
    with the weights already at ``weights_at``; ``spill_dir`` (the caller's) forces disk.

    ``fit``: ``batch_size`` is a wish, not an order: it is halved until a batch's working set fits
    the device budget without pushing the weights or the activations farther away than a batch of
    one would (:func:`fit_batch`); the result is ``.batch_size``."""
    nsamples, seqlen = int(ids_shape[0]), int(ids_shape[1])
    width = int(model.get_input_embeddings().weight.shape[-1])
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    per_block = [module_bytes(b) for b in blocks]
    whole = module_bytes(model)
    dev_b, host_b = budgets(str(device), *limits)

    def place(batch: int) -> Placement:
        return plan(
            str(device),
            weights=whole,
            block=max(per_block) + max(whole - sum(per_block), 0),
            activations=activation_bytes(nsamples, seqlen, width, dtype),
            work=block_work_bytes(blocks[0], batch * seqlen, hessians),
            device_budget=dev_b,
            host_budget=host_b,
            weights_at=weights_at,
        )

    out = fit_batch(place, min(batch_size, nsamples)) if fit else place(batch_size)
    out.batch_size = out.batch_size or batch_size
    if spill_dir is not None:
        out.activations = "disk"
        out.reasons.append(f"activations spilled to {spill_dir} (asked by the caller)")
    return out


def fit_batch(place: Callable[[int], Placement], want: int) -> Placement:
    """The placement of the largest batch, halving from ``want``, that ``place`` puts no farther
    away than a batch of one (weights and activations where they are with the smallest working
    set) and within the device budget."""
    floor = place(1)
    batch, out = max(1, want), floor
    while batch > 1:
        out = place(batch)
        same = (out.weights, out.activations) == (floor.weights, floor.activations)
        if same and out.sizes["device_use"] <= out.sizes["device_budget"]:
            break
        batch //= 2
    out = out if batch > 1 else floor
    out.batch_size = batch
    out.reasons.append(
        f"calibration batch {batch} (asked {want}): the largest whose working set keeps this placement"
    )
    return out


@contextmanager
def spill_area(place: Placement, spill_dir: Path | None) -> Iterator[Path | None]:
    """The spill directory: the caller's, a temporary one when ``place`` spills, else None."""
    if spill_dir is not None or place.activations != "disk":
        yield spill_dir
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="prune-spill-") as tmp:
        yield Path(tmp)


def weights_fit(
    model: nn.Module, blocks: nn.ModuleList, device_budget: int, batch_tokens: int = 8192
) -> bool:
    """Whether ``model``'s weights and one block's working set fit ``device_budget`` (the loader
    then puts the whole model on the device; otherwise it stays in host memory and is onloaded)."""
    return module_bytes(model) + block_work_bytes(blocks[0], batch_tokens, False) <= device_budget


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (meta tensors counted at their dtype); a tied
    tensor counts once."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def activation_bytes(nsamples: int, seqlen: int, width: int, dtype: torch.dtype) -> int:
    """Bytes of one copy of the calibration hidden states."""
    return nsamples * seqlen * width * torch.empty(0, dtype=dtype).element_size()


def block_work_bytes(block: nn.Module, batch_tokens: int, hessians: bool) -> int:
    """Working set of one block on the device besides its weights: float32 copies of the largest
    matrix (scores, mask), a batch's widest intermediate, and SparseGPT's Hessians."""
    shapes = [p.shape for p in block.parameters() if p.dim() >= 2]
    if not shapes:
        return 0
    widest = max(max(s[-2:]) for s in shapes)
    largest = max(s[-1] * s[-2] for s in shapes)
    hess = sum(4 * s[-1] ** 2 for s in shapes) if hessians else 0
    return 3 * 4 * largest + 4 * 4 * batch_tokens * widest + hess
