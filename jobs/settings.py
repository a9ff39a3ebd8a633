"""Service settings read from the environment (shared by the API, the worker and the launcher)."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

HOUR = 3600


def _int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def _retention_days() -> float:
    """PRUNE_RETENTION_DAYS: unset = the default (30); empty or 0 = keep finished jobs forever."""
    raw = os.environ.get("PRUNE_RETENTION_DAYS")
    if raw is None:
        return Settings.retention_days
    days = float(raw) if raw.strip() else 0.0
    if days < 0 or days != days:
        raise ValueError(f"PRUNE_RETENTION_DAYS must be a number of days >= 0, got {raw!r}")
    return days


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment.

    REDIS_URL, PRUNE_HOME (var dir: artifacts, work dirs, redis data, signing key), PRUNE_DATA_DIR
    (named datasets), PRUNE_PUBLIC_URL, PRUNE_SIGNING_KEY, PRUNE_QUEUE, PRUNE_JOB_TIME_LIMIT (seconds),
    PRUNE_MAX_ATTEMPTS, PRUNE_URL_TTL (signed URL lifetime, seconds), PRUNE_MAX_BODY (bytes),
    PRUNE_VISIBILITY_TIMEOUT (seconds), PRUNE_STORAGE_RETRIES and PRUNE_STORAGE_BACKOFF (upload retries
    and the first backoff delay in seconds, doubled after each failed try), PRUNE_STORAGE (`local` or
    `s3`; the S3 store reads its own PRUNE_S3_* variables), PRUNE_OUTBOX_INTERVAL and PRUNE_OUTBOX_AGE
    (the API's outbox sweeper: seconds between sweeps, 0 = off; age after which a job whose task was
    never confirmed sent is sent again), PRUNE_RETENTION_DAYS (finished jobs older than this are
    deleted with their artifacts; 0 or empty = kept forever), PRUNE_RETENTION_INTERVAL (seconds
    between the API's retention sweeps, 0 = off), PRUNE_LEASE_RENEW and PRUNE_LEASE_EXPIRE (a worker
    renews its lease on a running job every PRUNE_LEASE_RENEW seconds; the API's sweeper, which runs
    as often, re-queues a job whose lease was not renewed for PRUNE_LEASE_EXPIRE seconds).
    """

    redis_url: str = "redis://localhost:6379/0"
    home: Path = field(default_factory=lambda: Path("var").resolve())
    data_dir: Path | None = None
    public_url: str = "http://localhost:8000"
    signing_key: str | None = None
    queue: str = "prune.gpu"
    job_time_limit: int = 6 * HOUR
    max_attempts: int = 3
    url_ttl: int = HOUR
    max_body: int = 1024 * 1024
    key_prefix: str = "prune"
    storage: str = "local"
    visibility_timeout_s: int | None = None
    storage_retries: int = 3
    storage_backoff: float = 1.0
    outbox_interval: float = 30.0
    outbox_age: float = 60.0
    retention_days: float = 30.0
    retention_interval: float = 3600.0
    lease_renew_s: float = 10.0
    lease_expire_s: float = 60.0

    @classmethod
    def from_env(cls) -> Settings:
        """Build settings from environment variables (unset ones take the defaults)."""
        data_dir = os.environ.get("PRUNE_DATA_DIR")
        return cls(
            redis_url=os.environ.get("REDIS_URL", cls.redis_url),
            home=Path(os.environ.get("PRUNE_HOME", "var")).resolve(),
            data_dir=Path(data_dir).resolve() if data_dir else None,
            public_url=os.environ.get("PRUNE_PUBLIC_URL", cls.public_url).rstrip("/"),
            signing_key=os.environ.get("PRUNE_SIGNING_KEY") or None,
            queue=os.environ.get("PRUNE_QUEUE", cls.queue),
            job_time_limit=_int("PRUNE_JOB_TIME_LIMIT", cls.job_time_limit),
            max_attempts=_int("PRUNE_MAX_ATTEMPTS", cls.max_attempts),
            url_ttl=_int("PRUNE_URL_TTL", cls.url_ttl),
            max_body=_int("PRUNE_MAX_BODY", cls.max_body),
            visibility_timeout_s=_int("PRUNE_VISIBILITY_TIMEOUT", 0) or None,
            storage_retries=_int("PRUNE_STORAGE_RETRIES", cls.storage_retries),
            storage_backoff=float(os.environ.get("PRUNE_STORAGE_BACKOFF") or cls.storage_backoff),
            storage=(os.environ.get("PRUNE_STORAGE") or cls.storage).strip().lower(),
            outbox_interval=float(os.environ.get("PRUNE_OUTBOX_INTERVAL") or cls.outbox_interval),
            outbox_age=float(os.environ.get("PRUNE_OUTBOX_AGE") or cls.outbox_age),
            retention_days=_retention_days(),
            retention_interval=float(os.environ.get("PRUNE_RETENTION_INTERVAL") or cls.retention_interval),
            lease_renew_s=float(os.environ.get("PRUNE_LEASE_RENEW") or cls.lease_renew_s),
            lease_expire_s=float(os.environ.get("PRUNE_LEASE_EXPIRE") or cls.lease_expire_s),
        )

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
