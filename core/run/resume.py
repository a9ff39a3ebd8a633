"""Block checkpoints: continue an interrupted prune after its last finished block, bit for bit.

Layout of a resume directory (written only by :class:`BlockCheckpoints`):

* ``state.json``: ``{"fingerprint", "done", "result", "tokens", "fallback"}``, replaced
  atomically after each block (``done`` = blocks finished);
* ``block-<i>.pt``: block ``i``'s pruned tensors (``state_dict``, exact);
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

__all__ = ["BlockCheckpoints", "clear", "fingerprint", "load_json", "save_json"]

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
            for p in root.glob("*.pt"):
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

    @torch.no_grad()
    def restore_block(self, index: int, block: nn.Module) -> None:
        """Put block ``index``'s pruned tensors back into ``block`` (in memory or on meta)."""
        sd = torch.load(self.root / f"block-{index:05d}.pt", weights_only=True)
        block.load_state_dict(sd, assign=any(t.device.type == "meta" for t in block.state_dict().values()))

    def save_block(
        self,
        index: int,
        block: nn.Module,
        hidden: Any,
        result: PruneResult,
        tokens: dict[str, int],
        fallback: list[str],
    ) -> None:
        """Persist block ``index`` (pruned) and the next block's inputs, then advance ``done``."""
        _save_tensor_file(
            {k: v.detach().clone() for k, v in block.state_dict().items()},
            self.root / f"block-{index:05d}.pt",
        )
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
