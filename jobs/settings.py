"""Service settings read from the environment (shared by the API, the worker and the launcher).

`Settings` declares every variable the service reads, with its default and description; the
README's configuration table is generated from these fields (`scripts/config_table.py`). The
engine's own variables are `core.settings.EngineSettings`, prunectl's `prunectl.settings`.
"""

from __future__ import annotations

import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from core.settings import ConfigError, Flag, SharedSettings, env_field
from jobs import bounds

__all__ = ["HOUR", "ConfigError", "Settings", "get_settings", "settings_or_exit"]

HOUR = 3600


def _split(sep: str) -> BeforeValidator:
    """A list variable: `sep`-separated, items stripped, empty items dropped."""
    return BeforeValidator(
        lambda v: tuple(p.strip() for p in v.split(sep) if p.strip()) if isinstance(v, str) else v
    )


NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Settings(SharedSettings):
    """Everything the service reads from its environment. `Settings.from_env()` reads it (unset or
    blank variables take the defaults); `Settings(...)` takes only the given values. `PRUNE_HOME`
    and `PRUNE_DATA_DIR` are declared once, in `core.settings.SharedSettings`; unset, the service's
    home is `./var`."""

    # -- the service -----------------------------------------------------------------------------
    redis_url: str = env_field(
        "REDIS_URL", "redis://localhost:6379/0", "Redis: Celery broker, job records, event streams."
    )
    public_url: str = env_field(
        "PRUNE_PUBLIC_URL",
        "http://localhost:8000",
        "Public base URL of the API: `Location` headers and local-storage download links (a trailing "
        "`/` is dropped).",
    )
    signing_key: str | None = env_field(
        "PRUNE_SIGNING_KEY",
        description="HMAC secret of local-storage download URLs; API and workers must share it.",
        shown="generated once into `$PRUNE_HOME/signing.key`",
        secret=True,
    )
    queue: str = env_field("PRUNE_QUEUE", "prune.gpu", "Celery queue the GPU workers consume.")
    job_time_limit: int = env_field(
        "PRUNE_JOB_TIME_LIMIT", 6 * HOUR, "Per-job time limit (s).", shown="`21600` (6 h)", ge=1
    )
    max_attempts: int = env_field(
        "PRUNE_MAX_ATTEMPTS",
        3,
        "Attempts a job may use: worker deaths tolerated before it fails as `worker_lost`.",
        ge=1,
    )
    url_ttl: int = env_field(
        "PRUNE_URL_TTL", HOUR, "Lifetime of signed download URLs (s; at most 7 days for S3).", ge=1
    )
    max_body: int = env_field(
        "PRUNE_MAX_BODY",
        bounds.max_body(),
        "Largest request body in bytes (413 above). Default: the largest JSON a job request within "
        "the bounds of its lists and strings can take, plus 16 KiB of whitespace (`jobs.bounds`).",
        ge=1,
    )
    key_prefix: str = "prune"
    """Prefix of every Redis key (set in code only: tests isolate themselves with it)."""

    # -- reliability -----------------------------------------------------------------------------
    visibility_timeout_s: int | None = env_field(
        "PRUNE_VISIBILITY_TIMEOUT",
        description="Broker redelivery delay of an unacked task (s): a last resort, leases re-queue a "
        "lost worker's job first; `0` = the default.",
        shown="`PRUNE_JOB_TIME_LIMIT` + 1 h",
        ge=0,
    )
    lease_renew_s: NonNegative = env_field(
        "PRUNE_LEASE_RENEW",
        10.0,
        "A worker renews its lease on its running job (and reports its heartbeat) every this many "
        "seconds; every API process sweeps expired leases as often.",
        gt=0,
    )
    lease_expire_s: NonNegative = env_field(
        "PRUNE_LEASE_EXPIRE",
        60.0,
        "A lease not renewed for this many seconds has expired: the API re-queues the job (new "
        "delivery token, one attempt counted; docs/reliability.md).",
        gt=0,
    )
    outbox_interval: NonNegative = env_field(
        "PRUNE_OUTBOX_INTERVAL",
        30.0,
        "Seconds between the outbox sweeps of each API process (at start, then every interval; `0` "
        "turns the sweeper off).",
    )
    outbox_age: NonNegative = env_field(
        "PRUNE_OUTBOX_AGE",
        60.0,
        "A job created but whose task was not confirmed sent for this many seconds (its API died in "
        "between) is sent again with a new delivery token.",
    )
    retention_days: NonNegative = env_field(
        "PRUNE_RETENTION_DAYS",
        30.0,
        "Finished (succeeded, failed, cancelled) jobs older than this many days (fractions allowed) "
        "are deleted with their artifacts, events and index entries, and answer 404 afterwards; `0` "
        "or empty keeps every job forever.",
        keep_empty=True,
    )
    retention_interval: NonNegative = env_field(
        "PRUNE_RETENTION_INTERVAL",
        3600.0,
        "Seconds between the retention sweeps of each API process (at start, then every interval; "
        "`0` turns the sweeper off).",
    )
    work_sweep_interval: NonNegative = env_field(
        "PRUNE_WORK_SWEEP_INTERVAL",
        3600.0,
        "Seconds between a worker's sweeps of its stale scratch dirs (`$PRUNE_HOME/work/<job id>` of "
        "jobs finished, deleted or running on another host; at start, then every interval; `0` turns "
        "the sweep off).",
    )
    sweep_fanout: Flag = env_field(
        "PRUNE_SWEEP_FANOUT",
        True,
        "`1`: a sweep's variants run as jobs of their own, one per idle worker, and the last one "
        "gathers the sweep's report; `0`: one worker runs them one after the other (docs/reliability.md).",
        shown="on",
    )
    storage_retries: int = env_field(
        "PRUNE_STORAGE_RETRIES", 3, "Retries of a failed artifact upload before the job fails.", ge=0
    )
    storage_backoff: NonNegative = env_field(
        "PRUNE_STORAGE_BACKOFF", 1.0, "First delay (s) between upload retries, doubled after each."
    )

    # -- artifact storage ------------------------------------------------------------------------
    storage: Literal["local", "s3"] = env_field(
        "PRUNE_STORAGE",
        "local",
        "`local` (a directory under `$PRUNE_HOME/artifacts`, served by the API with HMAC-signed URLs) "
        "or `s3` (any S3-compatible store, presigned URLs; API and workers must agree). Any case.",
    )
    s3_bucket: str = env_field("PRUNE_S3_BUCKET", "", "Artifact bucket (required for `s3`).", shown="unset")
    s3_endpoint: str | None = env_field(
        "PRUNE_S3_ENDPOINT",
        description="Endpoint the services use, e.g. `http://minio:9000`; unset for AWS S3.",
    )
    s3_public_endpoint: str | None = env_field(
        "PRUNE_S3_PUBLIC_ENDPOINT",
        description="Endpoint clients download from: presigned URLs are signed for this host (SigV4 "
        "signs `Host`).",
        shown="`PRUNE_S3_ENDPOINT`",
    )
    s3_region: str = env_field("PRUNE_S3_REGION", "us-east-1", "Region of the artifact store.")
    s3_access_key: str | None = env_field(
        "PRUNE_S3_ACCESS_KEY",
        description="Access key of the artifact store; unset: boto3's default chain (IAM role, instance "
        "profile, `AWS_*`).",
        secret=True,
    )
    s3_secret_key: str | None = env_field(
        "PRUNE_S3_SECRET_KEY", description="Secret key matching `PRUNE_S3_ACCESS_KEY`.", secret=True
    )
    s3_prefix: str = env_field(
        "PRUNE_S3_PREFIX",
        "",
        "Prefix of every artifact key, e.g. `prod/`: keys are `{prefix}{tenant}/{job_id}/{name}`.",
        shown="empty",
    )
    s3_multipart_threshold_mb: int = env_field(
        "PRUNE_S3_MULTIPART_THRESHOLD_MB", 64, "Files above this size (MiB) are uploaded in parts.", ge=1
    )

    # -- API keys and tenants ----------------------------------------------------------------------
    api_keys_file: Path | None = env_field(
        "PRUNE_API_KEYS_FILE",
        description="JSON or YAML list of `{tenant, key_sha256, max_active_jobs}` (or `keys: [...]`). "
        "With neither this nor `PRUNE_API_KEYS` **the API is open**: every request is tenant "
        "`default` (a warning is logged at start).",
    )
    api_keys: str | None = env_field(
        "PRUNE_API_KEYS",
        description="Development/CI only: `tenant:key,tenant2:key2` in clear, hashed at load; merged "
        "with the file's keys.",
        secret=True,
    )
    default_max_active_jobs: int | None = env_field(
        "PRUNE_DEFAULT_MAX_ACTIVE_JOBS",
        description="Queued + running jobs per tenant (429 above) for the tenants of `PRUNE_API_KEYS` "
        "and for the open `default` tenant.",
        shown="`4` (keys from `PRUNE_API_KEYS`); unlimited for the open `default` tenant",
        ge=1,
    )

    # -- model and data sources ------------------------------------------------------------------
    model_roots: Annotated[tuple[Path, ...] | None, NoDecode, _split(os.pathsep)] = env_field(
        "PRUNE_MODEL_ROOTS",
        description="Directories (`:`-separated) that local model and data paths must resolve under; "
        "empty: no local paths at all.",
        shown="`$PRUNE_HOME/models` and the demo model's directory",
        keep_empty=True,
    )
    allow_hub: Flag = env_field(
        "PRUNE_ALLOW_HUB",
        False,
        "`true` allows Hugging Face hub ids `org/name` as model sources.",
        shown="off",
    )
    hub_allowlist: Annotated[tuple[str, ...], NoDecode, _split(",")] = env_field(
        "PRUNE_HUB_ALLOWLIST",
        (),
        "Comma-separated fnmatch patterns hub ids must match (ignoring case), e.g. "
        "`meta-llama/*,Qwen/Qwen2.5-*`.",
        shown="every hub id",
    )
    s3_model_prefixes: Annotated[tuple[str, ...], NoDecode, _split(",")] = env_field(
        "PRUNE_S3_MODEL_PREFIXES",
        (),
        "Comma-separated `s3://bucket/prefix/` that model and data sources may be read from (copied "
        "by the worker before the engine runs).",
        shown="none",
    )
    s3_source_endpoint: str | None = env_field(
        "PRUNE_S3_SOURCE_ENDPOINT",
        description="Endpoint `s3://` sources are read from.",
        shown="`PRUNE_S3_ENDPOINT`",
    )
    s3_source_region: str | None = env_field(
        "PRUNE_S3_SOURCE_REGION", description="Region of the source store.", shown="`PRUNE_S3_REGION`"
    )
    s3_source_access_key: str | None = env_field(
        "PRUNE_S3_SOURCE_ACCESS_KEY",
        description="Access key of the source store (then boto3's default chain).",
        shown="`PRUNE_S3_ACCESS_KEY`",
        secret=True,
    )
    s3_source_secret_key: str | None = env_field(
        "PRUNE_S3_SOURCE_SECRET_KEY",
        description="Secret key of the source store.",
        shown="`PRUNE_S3_SECRET_KEY`",
        secret=True,
    )
    max_source_gb: float = env_field(
        "PRUNE_MAX_SOURCE_GB",
        500.0,
        "Largest input (GiB) one job may copy from S3; above it the job ends `source_refused`.",
        gt=0,
        allow_inf_nan=False,
    )

    # -- webhooks ----------------------------------------------------------------------------------
    webhook_secret: str | None = env_field(
        "PRUNE_WEBHOOK_SECRET",
        description="`whsec_` + base64 of at least 16 bytes: the Standard Webhooks signing secret of "
        "this service. The API refuses to start with a malformed one; a worker then sends none.",
        shown="unset: webhooks refused with 422",
        secret=True,
    )
    webhook_allow_private: Flag = env_field(
        "PRUNE_WEBHOOK_ALLOW_PRIVATE",
        False,
        "`1` lets webhook URLs resolve to loopback and private addresses (tests, internal receivers).",
        shown="off",
    )

    # -- operations --------------------------------------------------------------------------------
    log_level: str = env_field(
        "PRUNE_LOG_LEVEL", "INFO", "Level of the JSON log lines on stderr (API and worker); any case."
    )
    worker_id: str | None = env_field(
        "PRUNE_WORKER_ID",
        description="Name of a worker in job leases; a worker's main process sets it for its pool children.",
        shown="`host:pid` of the worker's main process",
    )

    @model_validator(mode="before")
    @classmethod
    def _service_home(cls, data: Any) -> Any:
        """The service always has a home: `./var` when PRUNE_HOME is unset or blank."""
        if not isinstance(data, dict):
            return data
        given = [data[k] for k in ("home", "PRUNE_HOME") if k in data]
        if all(v is None or (isinstance(v, str) and not v.strip()) for v in given):
            data = {k: v for k, v in data.items() if k not in ("home", "PRUNE_HOME")}
            data["home"] = Path("var")
        return data

    @field_validator("public_url")
    @classmethod
    def _no_trailing_slash(cls, v: str) -> str:
        return v.rstrip("/")

    @field_validator("storage", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @field_validator("visibility_timeout_s")
    @classmethod
    def _zero_is_default(cls, v: int | None) -> int | None:
        return v or None

    @field_validator("retention_days", mode="before")
    @classmethod
    def _empty_is_forever(cls, v: Any) -> Any:
        return 0.0 if isinstance(v, str) and not v.strip() else v

    @field_validator("s3_model_prefixes")
    @classmethod
    def _s3_uris(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not p.startswith("s3://") or len(p) <= len("s3://"):
                raise ValueError(f"entries must look like s3://bucket/prefix, got {p!r}")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        level = v.strip().upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return level

    @model_validator(mode="after")
    def _s3_needs_bucket(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("PRUNE_S3_BUCKET is required with PRUNE_STORAGE=s3")
        return self

    @property
    def visibility_timeout(self) -> int:
        """Broker redelivery delay for unacked tasks: PRUNE_VISIBILITY_TIMEOUT, else one hour above the
        longest allowed job (a whole worker killed mid-job is redelivered after this delay)."""
        return self.visibility_timeout_s or self.job_time_limit + HOUR

    @property
    def retention_s(self) -> float | None:
        """Age in seconds after which a finished job is deleted; None when jobs are kept forever."""
        return self.retention_days * 24 * HOUR if self.retention_days > 0 else None

    @property
    def artifacts_dir(self) -> Path:
        """Root of the local artifact store."""
        return self.home / "artifacts"

    @property
    def work_dir(self) -> Path:
        """Per-job scratch directories of the worker."""
        return self.home / "work"

    def secret(self) -> bytes:
        """The URL signing secret: PRUNE_SIGNING_KEY, else one generated once and kept under PRUNE_HOME."""
        if self.signing_key:
            return self.signing_key.encode()
        path = self.home / "signing.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # first writer wins; a concurrent process keeps its own tmp out
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings read once from the environment."""
    return Settings.from_env()


def settings_or_exit(program: str) -> Settings:
    """`get_settings()`, or exit with a one-line message (no traceback) when a variable is refused."""
    try:
        return get_settings()
    except ConfigError as exc:
        raise SystemExit(f"{program}: {exc}") from None
