"""Zero-shot accuracy with EleutherAI's lm-evaluation-harness, at any model size.

The harness's ``HFLM`` wraps the loaded model and tokenizer (nothing is re-read from disk): its
tokenization, batching, padding and scoring are the harness's own. Only the model call can change:
a model whose weights are not all on the compute device (onloaded from host memory, or on disk)
gets its logits block by block (``forward``: :func:`core.evaluation.block_eval.forward_rows`, one
pass over the weights per batch of requests), equal to the whole-model forward. A task
comes from its local folder (:mod:`core.evaluation.tasks`: YAML + data files, relative paths resolved against
the folder) or, when the hub is online and no such folder exists, from the harness's own registry.
Every failure is a :class:`core.errors.TaskError` naming the task.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import TaskError
from core.evaluation import tasks as task_paths

PREFERRED_METRICS = ("acc", "acc_norm", "exact_match")
BLOCKWISE_BATCH = 64
"""Requests per batch when the logits come block by block: each batch is one pass over the weights."""

Forward = Callable[[torch.Tensor], torch.Tensor]
"""The logits ``[batch, length, vocab]`` of token rows ``[batch, length]`` (e.g. block by block)."""


@dataclass(frozen=True)
class ResolvedTask:
    """A task ready for the harness: its config dict (local) or its registered name (hub)."""

    name: str
    config: dict[str, Any] | None
    source: str


@dataclass(frozen=True)
class Score:
    metric: str
    value: float | None
    stderr: float | None
    samples: int | None


def _absolute(value: Any, folder: Path, task: str) -> Any:
    if isinstance(value, str):
        path = Path(value)
        path = path if path.is_absolute() else folder / path
        if not path.exists():
            raise TaskError(f"zero-shot task {task!r}: data file {path} not found")
        return str(path)
    if isinstance(value, list):
        return [_absolute(v, folder, task) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, folder, task) for k, v in value.items()}
    return value


def resolve(name: str, data_dir: Path, online: bool) -> ResolvedTask:
    """The task's config from its local folder, else the harness's registered task when online."""
    folder = task_paths.task_folder(data_dir, name)
    if folder.is_dir():
        yaml_path = task_paths.task_yaml(folder, name)
        if yaml_path is None:
            raise TaskError(f"zero-shot task {name!r}: no {name}.yaml (or single *.yaml) in {folder}")
        from lm_eval.tasks._yaml_loader import load_yaml

        try:
            cfg = dict(load_yaml(yaml_path, resolve_func=True))
        except Exception as e:
            raise TaskError(f"zero-shot task {name!r}: cannot read {yaml_path}: {e}") from None
        cfg["task"] = name
        kwargs = dict(cfg.get("dataset_kwargs") or {})
        if "data_files" in kwargs:
            kwargs["data_files"] = _absolute(kwargs["data_files"], folder, name)
        cfg["dataset_kwargs"] = kwargs
        local = cfg.get("dataset_path")
        if isinstance(local, str) and (folder / local).exists():
            cfg["dataset_path"] = str(folder / local)
        return ResolvedTask(name, cfg, f"local: {folder}")
    if not online:
        raise TaskError(
            f"zero-shot task {name!r}: no task folder {folder} and the hub is offline "
            f"(put the task's YAML and data files there)"
        )
    from lm_eval.tasks import TaskManager

    if name not in TaskManager().all_tasks:
        raise TaskError(f"zero-shot task {name!r} is unknown to lm-evaluation-harness")
    return ResolvedTask(name, None, "hub")


def _float(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not math.isnan(float(v)) else None


def _score(result: dict[str, Any], samples: int | None) -> Score:
    metrics = {k.split(",")[0]: v for k, v in result.items() if "," in k and "_stderr" not in k}
    stderr = {k.split(",")[0].removesuffix("_stderr"): v for k, v in result.items() if "_stderr," in k}
    name = next((m for m in PREFERRED_METRICS if m in metrics), next(iter(metrics), "n/a"))
    return Score(name, _float(metrics.get(name)), _float(stderr.get(name)), samples)


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    resolved: list[ResolvedTask],
    limit: int | None,
    batch_size: int = 8,
    *,
    forward: Forward | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Score]:
    """Run each task zero-shot on ``model`` (eval mode) and return its headline metric.

    ``forward``: how the logits of a batch are computed (default: the model's own forward, weights
    resident); ``device``: where the harness puts the token rows (default: where the weights are)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: dict[str, Score] = {}
    try:
        size = BLOCKWISE_BATCH if forward is not None else batch_size
        lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=size)
        lm._device = device  # a model on disk reports the meta device
        if forward is not None:
            lm._model_call = lambda inps, attn_mask=None, labels=None: forward(inps)  # the only change
        for task in resolved:
            manager = TaskManager(include_defaults=task.config is None)
            try:
                res = simple_evaluate(
                    model=lm,
                    tasks=[task.config if task.config is not None else task.name],
                    task_manager=manager,
                    num_fewshot=0,
                    limit=limit,
                    log_samples=False,
                    bootstrap_iters=0,
                )
            except TaskError:
                raise
            except Exception as e:
                raise TaskError(f"zero-shot task {task.name!r} failed: {type(e).__name__}: {e}") from None
            if res is None or task.name not in res.get("results", {}):
                raise TaskError(f"zero-shot task {task.name!r}: the harness returned no result")
            n = (res.get("n-samples") or {}).get(task.name) or {}
            out[task.name] = _score(res["results"][task.name], n.get("effective"))
    finally:
        model.train(was_training)
    return out
