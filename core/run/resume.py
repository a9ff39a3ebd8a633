"""Block checkpoints: continue an interrupted prune after its last finished block, bit for bit.

Layout of a resume directory (written only by :class:`BlockCheckpoints`):

* ``state.json``: ``{"fingerprint", "done", "result", "tokens", "fallback"}``, replaced
  atomically after each block (``done`` = blocks finished);
* ``block-<i>.pt``: block ``i``'s pruned tensors (``state_dict``, exact); or
  ``block-<i>.safetensors``: a hard link to the output shard a streaming run wrote for block ``i``
  (:meth:`core.model.weights.WeightSource.written`; the weights are on disk once, not twice);
* ``hidden-<i>.pt``: the hidden states (one tensor per batch) block ``i`` feeds block ``i + 1``;
  only the latest is kept;
* ``dense.json``: the dense perplexity once measured (``core.run.pipeline``), with its own fingerprint.

The fingerprint hashes the prune spec, the calibration ids, the model config and every block
tensor's name, shape and dtype: a directory left by a different job is ignored (cleared).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.result import PruneResult
from core.spec import PruneSpec

__all__ = ["BlockCheckpoints", "clear", "fingerprint", "link_file", "load_json", "save_json"]

VERSION = 1


def fingerprint(model: nn.Module, calibration: torch.Tensor, spec: PruneSpec) -> str:
    """What must be equal for a resume directory to continue this prune."""
    h = hashlib.sha256()
    h.update(f"v{VERSION}".encode())
    h.update(spec.model_dump_json().encode())
    cal = calibration.detach().to("cpu", torch.long).contiguous()
    h.update(str(tuple(cal.shape)).encode())
    h.update(cal.numpy().tobytes())
    cfg = getattr(model, "config", None)
    if cfg is not None:
        h.update(cfg.to_json_string(use_diff=False).encode())
    for name, t in model.state_dict(keep_vars=True).items():
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()


def save_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def load_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _save_tensor_file(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def link_file(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content atomically: a hard link, or a copy across file systems."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class BlockCheckpoints:
    """The block checkpoints of one prune in ``root`` (see the module docstring)."""

    def __init__(self, root: Path, fp: str, state: dict[str, Any] | None) -> None:
        self.root, self.fp = root, fp
        self.state = state or {"fingerprint": fp, "done": 0}

    @classmethod
    def open(cls, root: Path | str, fp: str) -> BlockCheckpoints:
        """Open ``root`` for fingerprint ``fp``; block state of another fingerprint is discarded."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        state = load_json(root / "state.json")
        if not state or state.get("fingerprint") != fp:
            for p in [*root.glob("*.pt"), *root.glob("*.safetensors")]:
                p.unlink(missing_ok=True)
            (root / "state.json").unlink(missing_ok=True)
            state = None
        return cls(root, fp, state)

    @property
    def done(self) -> int:
        """Blocks finished by earlier runs."""
        return int(self.state.get("done", 0))

    def partial_result(self) -> PruneResult:
        return PruneResult.model_validate(self.state["result"])

    def tokens(self) -> dict[str, int]:
        return dict(self.state.get("tokens", {}))

    def fallback(self) -> list[str]:
        return list(self.state.get("fallback", []))

    def hidden(self) -> list[torch.Tensor]:
        """The inputs of block ``done`` (one tensor per batch)."""
        return torch.load(self.root / f"hidden-{self.done - 1:05d}.pt", weights_only=True)

    def linked(self, index: int) -> Path | None:
        """The weight source's own file of block ``index``, linked here by :meth:`save_block`."""
        path = self.root / f"block-{index:05d}.safetensors"
        return path if path.is_file() else None

    @torch.no_grad()
    def restore_block(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s pruned tensors back into ``block`` (in memory or on meta)."""
        sd = torch.load(self.root / f"block-{index:05d}.pt", weights_only=True)
        block.load_state_dict(sd, assign=any(t.device.type == "meta" for t in block.state_dict().values()))

    def save_weights(self, index: int, block: nn.Module) -> None:
        """Persist block ``index``'s pruned tensors (before the weight source releases them)."""
        _save_tensor_file(
            {k: v.detach().clone() for k, v in block.state_dict().items()},
            self.root / f"block-{index:05d}.pt",
        )

    def save_block(
        self,
        index: int,
        written: Path | None,
        hidden: Any,
        result: PruneResult,
        tokens: dict[str, int],
        fallback: list[str],
    ) -> None:
        """Persist the next block's inputs and advance ``done`` past block ``index``, whose weights
        :meth:`save_weights` saved, or which the weight source wrote to ``written``, a file holding
        this block alone (a streaming run's output shard): that file is hard-linked here (copied
        across file systems) instead of a second copy of the weights being saved."""
        if written is not None:
            link_file(written, self.root / f"block-{index:05d}.safetensors")
        if hidden is not None:
            _save_tensor_file([h for h in hidden], self.root / f"hidden-{index:05d}.pt")
        self.state = {
            "fingerprint": self.fp,
            "done": index + 1,
            "result": result.model_dump(mode="json"),
            "tokens": tokens,
            "fallback": fallback,
        }
        save_json(self.root / "state.json", self.state)
        old = self.root / f"hidden-{index - 1:05d}.pt"
        if index > 0 and old.exists():
            old.unlink()

    def clear(self) -> None:
        """Remove everything (after a successful run)."""
        shutil.rmtree(self.root, ignore_errors=True)


def clear(root: Path) -> None:
    """Remove a resume directory (after the run it belongs to succeeded)."""
    shutil.rmtree(root, ignore_errors=True)
