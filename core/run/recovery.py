"""The recovery stage: a short fine-tune of the pruned model that keeps its zeros exactly.

Two modes (``RecoverySpec.mode``):

* ``masked``: the pruned matrices are trained in full; their pruned entries get a zero gradient
  (a tensor hook) and are multiplied by the mask after every optimizer step, so they stay 0.0.
* ``lora``: low-rank adapters (:class:`core.run.recovery_lora.MaskedLora`, plain torch) on every pruned
  matrix, merged at the end as ``(W + scale * B @ A) * mask``.

Everything else (embeddings, norms, routers, ignored layers' biases) stays frozen. Training
windows are the non-overlapping ``seqlen``-token windows of the training text; step ``k`` takes
the next ``batch`` of them in an order fixed by ``seed`` (a new permutation each pass), so any
step's data is known without replaying the steps before it. The model is run in eval mode (no
dropout): one host with one thread count gives the same weights every time.

Service behaviour: a :class:`~core.progress.Progress` per step (stage ``recovering``, the loss
and an ETA in the message), cancellation between steps, and with a resume directory a checkpoint
(``recovery.pt``: trainable tensors, optimizer state, losses) every ``checkpoint_every`` steps, from
which a later run of the same job continues with bit-identical weights.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from core.errors import InvalidInput
from core.evaluation.evaluate import sparsity_report
from core.model import data, families
from core.progress import CancelFn, Progress, ProgressFn, check_cancel
from core.result import RecoveryCheck, RecoveryInfo
from core.run.recovery_lora import MaskedLora, keep_mask, masked_grad_hook
from core.spec import PruneSpec, RecoverySpec

__all__ = ["CHECKPOINT", "MAX_CURVE", "TrainText", "recover"]

CHECKPOINT = "recovery.pt"
MAX_CURVE = 1000
"""Most ``(step, loss)`` points a report keeps."""
VERSION = 1


@dataclass
class TrainText:
    """Where the training windows come from (``source`` in :func:`core.model.data.load_text` forms)."""

    source: str
    text_field: str = "text"
    data_dir: str | Path | None = None
    eval_source: str | None = None
    """The evaluation text's source: refused when it is the training text or shares a passage."""
    eval_text_field: str = "text"


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    resumed_from: int | None = None


def _strip(desc: str) -> str:
    """The file behind a :func:`core.model.data.load_text` description (``wikitext2:/x/valid.txt``)."""
    head, sep, tail = desc.partition(":")
    return tail if sep and head.isidentifier() else desc


def _check_disjoint(train_text: str, train_desc: str, where: TrainText) -> None:
    """Refuse training on the evaluation text: same file, or a 200-character passage in common."""
    if where.eval_source is None:
        return
    text, desc = data.load_text(where.eval_source, "evaluation", where.eval_text_field, where.data_dir)
    if os.path.realpath(_strip(desc)) == os.path.realpath(_strip(train_desc)):
        raise InvalidInput(
            f"recovery would train on the evaluation text ({desc}): use another recovery.source"
        )
    body = text.strip()
    probes = [body[i : i + 200] for i in range(0, max(1, len(body) - 200), max(1, len(body) // 8))][:8]
    if any(len(p.strip()) >= 100 and p in train_text for p in probes):
        raise InvalidInput(f"the recovery text {train_desc} contains passages of the evaluation text {desc}")


def training_windows(tokenizer: Any, where: TrainText, seqlen: int) -> tuple[torch.Tensor, str]:
    """Non-overlapping ``[n, seqlen]`` windows of the training text, and its description."""
    text, desc = data.load_text(where.source, "calibration", where.text_field, where.data_dir)
    _check_disjoint(text, desc, where)
    ids = data.tokenize(tokenizer, text)
    n = int(ids.numel()) // seqlen
    if n < 1:
        raise InvalidInput(
            f"recovery text {desc} is too short: one window of {seqlen} tokens needs "
            f"{seqlen} tokens, found {int(ids.numel())}"
        )
    return ids[: n * seqlen].reshape(n, seqlen), desc


def batch_indices(step: int, batch: int, nwindows: int, seed: int) -> list[int]:
    """Window indices of optimizer step ``step``: a fresh seeded permutation for every pass."""
    out = []
    for g in range(step * batch, (step + 1) * batch):
        epoch, pos = divmod(g, nwindows)
        perm = torch.randperm(nwindows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(int(perm[pos]))
    return out


def lr_at(step: int, total: int, spec: RecoverySpec) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to a tenth of ``lr`` at the last step."""
    warm = min(spec.warmup_steps, max(0, total - 1))
    if step < warm:
        return spec.lr * (step + 1) / (warm + 1)
    span = max(1, total - warm - 1)
    return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / span))))


class _Trainable:
    """The trained tensors of one recovery, its masks, and the merge that ends it."""

    def __init__(self, model: nn.Module, spec: RecoverySpec, prune: PruneSpec) -> None:
        self.model, self.mode = model, spec.mode
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        targets = families.prunable_targets(model, routers=prune.prune_routers)
        seen: dict[tuple[int, str], tuple[nn.Module, str]] = {}
        for t in targets.values():  # one slot per parameter (a fused experts tensor holds many targets)
            seen.setdefault((id(t.module), t.param), (t.module, t.param))
        self.slots = list(seen.values())
        self.masks = [keep_mask(getattr(m, p)) for m, p in self.slots]
        self.rows_before = {name: (t.get_weight() == 0).sum(1) for name, t in targets.items()}
        self.hooks: list[Any] = []
        gen = torch.Generator().manual_seed(spec.seed)
        for (module, pname), mask in zip(self.slots, self.masks, strict=True):
            param = getattr(module, pname)
            if spec.mode == "lora":
                lora = MaskedLora(param.detach(), spec.rank, spec.alpha, gen)
                parametrize.register_parametrization(module, pname, lora, unsafe=True)
            else:
                param.requires_grad_(True)
                self.hooks.append(param.register_hook(masked_grad_hook(mask)))
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @torch.no_grad()
    def remask(self) -> None:
        """Masked mode: pruned entries back to exactly 0.0 after an optimizer step."""
        if self.mode == "masked":
            for (module, pname), mask in zip(self.slots, self.masks, strict=True):
                getattr(module, pname).mul_(mask)

    def finish(self) -> None:
        """Merge the adapters (LoRA), drop hooks, restore every ``requires_grad`` flag."""
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for module, pname in self.slots:
            if parametrize.is_parametrized(module, pname):
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, pname, leave_parametrized=True)
        self.remask()
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(n, True))

    @torch.no_grad()
    def check(self, prune: PruneSpec) -> RecoveryCheck:
        """Zeros kept, per-row zero counts, N:M groups of the merged model."""
        kept = all(
            not bool(getattr(m, p)[~mask].any()) for (m, p), mask in zip(self.slots, self.masks, strict=True)
        )
        targets = families.prunable_targets(self.model, routers=prune.prune_routers)
        rows_ok = all(
            bool(((t.get_weight() == 0).sum(1) >= self.rows_before[name]).all())
            for name, t in targets.items()
        )
        return RecoveryCheck(
            zeros_kept=kept,
            pruned_entries=int(sum(int((~m).sum()) for m in self.masks)),
            rows_ok=rows_ok,
            nm_ok=sparsity_report(self.model, prune)["nm_ok"],
        )


def _fingerprint(
    model: nn.Module, windows: torch.Tensor, spec: RecoverySpec, masks: list[torch.Tensor]
) -> str:
    h = hashlib.sha256(f"recovery-v{VERSION}".encode())
    h.update(spec.model_dump_json().encode())
    h.update(windows.numpy().tobytes())
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for m in masks:
        h.update(str(int(m.sum())).encode())
    return h.hexdigest()


def _save(path: Path, fp: str, st: _State, tr: _Trainable, opt: torch.optim.Optimizer) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    body = {
        "fingerprint": fp,
        "step": st.step,
        "tokens": st.tokens,
        "seconds": st.seconds,
        "losses": [list(x) for x in st.losses],
        "params": {n: p.detach().clone() for n, p in tr.named},
        "optim": opt.state_dict(),
    }
    torch.save(body, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def _load(path: Path, fp: str, tr: _Trainable, opt: torch.optim.Optimizer) -> _State | None:
    """The saved state of this recovery (weights and optimizer restored), else None."""
    try:
        body = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError):
        return None
    if not isinstance(body, dict) or body.get("fingerprint") != fp:
        return None
    params = dict(tr.named)
    for name, value in body["params"].items():
        params[name].copy_(value)
    opt.load_state_dict(body["optim"])
    losses = [(int(s), float(v)) for s, v in body["losses"]]
    return _State(int(body["step"]), int(body["tokens"]), float(body["seconds"]), losses, int(body["step"]))


def _use_checkpointing(model: nn.Module, spec: RecoverySpec, micro: int, seqlen: int, device: str) -> bool:
    """Gradient checkpointing when the block activations would exceed a quarter of free memory."""
    if spec.gradient_checkpointing != "auto":
        return spec.gradient_checkpointing == "on"
    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 1024)
    heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 16)
    layers = int(getattr(cfg, "num_hidden_layers", 0) or getattr(cfg, "n_layer", 0) or 32)
    act = micro * seqlen * layers * (34 * hidden + 5 * heads * seqlen) * 4
    if device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return act > free / 4


class _Checkpointed:
    """Wraps every decoder block's forward in non-reentrant activation checkpointing."""

    def __init__(self, blocks: list[nn.Module], on: bool) -> None:
        self.blocks = blocks if on else []

    def __enter__(self) -> _Checkpointed:
        from torch.utils.checkpoint import checkpoint

        for b in self.blocks:
            fwd = b.forward
            b.forward = lambda *a, _f=fwd, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for b in self.blocks:
            del b.forward


def _step_loss(
    model: nn.Module, windows: torch.Tensor, idx: list[int], micro: int, device: torch.device
) -> float:
    """Forward + backward of one optimizer step's windows (micro-batches); the mean token loss."""
    total = len(idx) * (windows.shape[1] - 1)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loss_sum = 0.0
    for start in range(0, len(idx), micro):
        x = windows[idx[start : start + micro]].to(device)
        with autocast:
            logits = model(input_ids=x, use_cache=False).logits[:, :-1, :]
        loss = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        (loss / total).backward()
        loss_sum += float(loss.detach())
    return loss_sum / total


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_CURVE:
        return points
    keep = {round(i * (len(points) - 1) / (MAX_CURVE - 1)) for i in range(MAX_CURVE)}
    return [p for i, p in enumerate(points) if i in keep]


def _train_step(
    model: nn.Module,
    windows: torch.Tensor,
    spec: RecoverySpec,
    tr: _Trainable,
    opt: torch.optim.Optimizer,
    step: int,
    total: int,
    micro: int,
    device: torch.device,
) -> float:
    """One optimizer step (learning rate for ``step``, clipped gradients, zeros re-applied); its loss."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, spec)
    opt.zero_grad(set_to_none=True)
    loss = _step_loss(model, windows, batch_indices(step, spec.batch, len(windows), spec.seed), micro, device)
    if spec.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for _, p in tr.named], spec.grad_clip, foreach=False)
    opt.step()
    tr.remask()
    return loss


def _report_step(on_progress: ProgressFn, step: int, total: int, loss: float, eta: float) -> None:
    on_progress(
        Progress(
            stage="recovering",
            fraction=step / total,
            message=f"recovery step {step}/{total}: loss {loss:.4f}, ETA {eta:.0f}s",
        )
    )


def recover(
    model: nn.Module,
    tokenizer: Any,
    spec: RecoverySpec,
    prune: PruneSpec,
    where: TrainText,
    seqlen: int,
    on_progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    resume_dir: Path | None = None,
    evaluate: Callable[[], float] | None = None,
) -> RecoveryInfo:
    """Fine-tune the pruned ``model`` in place under ``spec`` keeping its zeros; what was done.

    ``seqlen``: the windows' length when ``spec.seqlen`` is unset. ``resume_dir``: where
    ``recovery.pt`` is kept (continued when it belongs to this very recovery). ``evaluate``: the
    recovered model's perplexity, measured after the merge and recorded in the result.
    """
    seqlen = spec.seqlen or seqlen
    windows, desc = training_windows(tokenizer, where, seqlen)
    device = next(model.parameters()).device
    micro = max(1, min(spec.batch, (8192 if device.type == "cuda" else 1024) // seqlen))
    total = spec.max_steps(seqlen)
    blocks = families.get_blocks(model, families.family_for(model))
    use_ckpt = _use_checkpointing(model, spec, micro, seqlen, device.type)
    tr = _Trainable(model, spec, prune)
    opt = torch.optim.AdamW(
        [p for _, p in tr.named], lr=spec.lr, weight_decay=spec.weight_decay, foreach=False
    )
    try:
        fp = _fingerprint(model, windows, spec, tr.masks)
        path = resume_dir / CHECKPOINT if resume_dir is not None else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        st = (_load(path, fp, tr, opt) if path is not None and path.exists() else None) or _State()
        model.eval()
        t0, first = time.perf_counter(), st.step
        with _Checkpointed(blocks, use_ckpt):
            while st.step < total:
                check_cancel(should_cancel)
                loss = _train_step(model, windows, spec, tr, opt, st.step, total, micro, device)
                st.step += 1
                st.tokens += spec.batch * seqlen
                st.losses.append((st.step, loss))
                now = time.perf_counter() - t0
                eta = now / (st.step - first) * (total - st.step)
                if on_progress is not None:
                    _report_step(on_progress, st.step, total, loss, eta)
                if path is not None and (st.step % spec.checkpoint_every == 0 or st.step == total):
                    _save(path, fp, _State(st.step, st.tokens, st.seconds + now, st.losses), tr, opt)
        st.seconds += time.perf_counter() - t0
    finally:
        opt.state.clear()  # frees the moments before evaluation and export
        tr.finish()
    check = tr.check(prune)
    if not (check.zeros_kept and check.rows_ok and check.nm_ok is not False):
        raise RuntimeError(f"recovery broke the sparsity pattern: {check}")  # a defect, never expected
    return RecoveryInfo(
        mode=spec.mode,
        steps=st.step,
        tokens=st.tokens,
        seqlen=seqlen,
        batch=spec.batch,
        lr=spec.lr,
        seed=spec.seed,
        source=desc,
        train_windows=int(windows.shape[0]),
        trainable_params=sum(p.numel() for _, p in tr.named),
        gradient_checkpointing=use_ckpt,
        autocast="bfloat16" if device.type == "cuda" else None,
        seconds=round(st.seconds, 3),
        resumed_from_step=st.resumed_from,
        losses=_thin(st.losses),
        check=check,
        recovered_ppl=evaluate() if evaluate is not None else None,
    )
