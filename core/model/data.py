"""Calibration and evaluation text: sources, the data directory, tokenization and windows.

Sources: a named dataset (``wikitext2``, ``c4``), a text file, a folder of ``.txt`` files, a
``.jsonl`` file with a text field, or a ready ``LongTensor`` of token ids.

Named datasets are read from the data directory first (``PRUNE_DATA_DIR``, else
``../shared/data`` beside the repository checkout when it exists, else
``~/.cache/prune-service/data``), then from the hub via ``datasets`` when it is installed and the
hub is online:

========== ============================ ==============================
name       calibration                  evaluation
========== ============================ ==============================
wikitext2  ``wikitext-2/valid.txt``     ``wikitext-2/test.txt``
c4         ``c4/train.txt`` or ``.jsonl`` ``c4/validation.txt`` or ``.jsonl``
========== ============================ ==============================
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch

from core.errors import CalibrationError, InvalidInput
from core.settings import EngineSettings
from core.spec import NAMED_DATASETS

__all__ = [
    "calibration_windows",
    "default_data_dir",
    "load_text",
    "resolve_seqlen",
    "sample_windows",
    "tokenize",
]

Split = Literal["calibration", "evaluation"]
_REPO = Path(__file__).resolve().parents[1]
_NAMED_FILES: dict[str, dict[str, tuple[str, ...]]] = {
    "wikitext2": {"calibration": ("wikitext-2/valid.txt",), "evaluation": ("wikitext-2/test.txt",)},
    "c4": {
        "calibration": ("c4/train.txt", "c4/train.jsonl"),
        "evaluation": ("c4/validation.txt", "c4/validation.jsonl"),
    },
}


def default_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: explicit argument, ``PRUNE_DATA_DIR``, ``../shared/data``, or the user cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = EngineSettings.from_env().data_dir
    if env is not None:
        return env.expanduser()
    shared = _REPO.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "prune-service" / "data"


def _read_jsonl(path: Path, text_field: str) -> str:
    parts: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CalibrationError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise CalibrationError(f"{path}:{lineno}: no {text_field!r} field")
            parts.append(str(row[text_field]))
    return "\n\n".join(parts)


def _read_file(path: Path, text_field: str) -> str:
    try:
        if path.suffix.lower() == ".jsonl":
            return _read_jsonl(path, text_field)
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror or exc}") from None


def _from_hub(name: str, split: Split, text_field: str) -> str:
    from core.model.loading import hub_online

    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        datasets = None
    if datasets is None or not hub_online():
        raise CalibrationError(
            f"dataset {name!r} ({split}) is not in the data directory and cannot be downloaded "
            "(the hub is offline or the 'datasets' package is missing)"
        )
    try:
        if name == "wikitext2":
            ds = datasets.load_dataset(
                "wikitext", "wikitext-2-raw-v1", split="validation" if split == "calibration" else "test"
            )
            return "\n\n".join(ds["text"])
        files = {
            "calibration": "en/c4-train.00000-of-01024.json.gz",
            "evaluation": "en/c4-validation.00000-of-00008.json.gz",
        }
        ds = datasets.load_dataset("allenai/c4", data_files={"x": files[split]}, split="x")
        return "\n\n".join(ds[text_field][:20000])
    except Exception as exc:
        raise CalibrationError(f"cannot download dataset {name!r} ({split}): {exc}") from None


def load_text(
    source: str, split: Split = "calibration", text_field: str = "text", data_dir: str | Path | None = None
) -> tuple[str, str]:
    """Return ``(text, description)`` for a named dataset, file, folder of .txt files or .jsonl file."""
    if source in NAMED_DATASETS:
        root = default_data_dir(data_dir)
        for rel in _NAMED_FILES[source][split]:
            path = root / rel
            if path.is_file():
                return _read_file(path, text_field), f"{source}:{path}"
        return _from_hub(source, split, text_field), f"{source}:hub"
    path = Path(source).expanduser()
    if path.is_file():
        return _read_file(path, text_field), str(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise CalibrationError(f"folder {path} contains no .txt files")
        return "\n\n".join(_read_file(f, text_field) for f in files), str(path)
    raise CalibrationError(
        f"text source not found: {source!r} "
        f"(expected {', '.join(NAMED_DATASETS)}, a file, a folder or a .jsonl)"
    )


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids ``[T]`` of the whole text (no special tokens), in one fast-tokenizer call."""
    if not text.strip():
        return torch.zeros(0, dtype=torch.long)
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def resolve_seqlen(seqlen: int | None, context: int | None) -> int:
    """``seqlen`` or ``min(2048, context)``; InvalidInput when it exceeds the model context."""
    if seqlen is None:
        return min(2048, context) if context else 2048
    if context is not None and seqlen > context:
        raise InvalidInput(f"seqlen {seqlen} exceeds the model's context length {context}")
    return seqlen


def sample_windows(
    ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str = "calibration"
) -> torch.Tensor:
    """``nsamples`` windows ``[nsamples, seqlen]`` at random offsets (``torch.Generator(seed)``)."""
    ids = ids.reshape(-1)
    total = int(ids.numel())
    if total < seqlen:
        raise CalibrationError(
            f"{what} text is too short: windows of seqlen={seqlen} need at least {seqlen} tokens, "
            f"found {total}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, total - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def calibration_windows(
    source: str | torch.Tensor,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    text_field: str = "text",
    data_dir: str | Path | None = None,
) -> tuple[torch.Tensor, str]:
    """Calibration ids ``[nsamples, seqlen]`` and a description of the source.

    A ready ``[n, seqlen]`` LongTensor is used as is (``nsamples`` must not exceed ``n``;
    the first ``nsamples`` rows are taken); a 1-D tensor is treated as a token stream.
    """
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.long, torch.int32, torch.int64):
            raise CalibrationError(f"calibration tensor must hold integer token ids, got {source.dtype}")
        if source.dim() == 2:
            if source.shape[1] != seqlen:
                raise CalibrationError(f"calibration tensor has seqlen {source.shape[1]}, expected {seqlen}")
            if source.shape[0] < nsamples:
                raise CalibrationError(f"calibration tensor has {source.shape[0]} samples, need {nsamples}")
            return source[:nsamples].long(), "tensor"
        return sample_windows(source.long(), nsamples, seqlen, seed), "tensor"
    text, desc = load_text(source, "calibration", text_field, data_dir)
    ids = tokenize(tokenizer, text)
    if ids.numel() == 0:
        raise CalibrationError(
            f"calibration text from {desc} is empty: need at least {seqlen} tokens, found 0"
        )
    return sample_windows(ids, nsamples, seqlen, seed), desc
