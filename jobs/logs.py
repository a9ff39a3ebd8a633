"""Structured logging: one JSON object per line, with the current job id on job-related lines.

`job_context(job_id)` (or `set_job_id`) binds a job id to the current context (thread or task);
`JobIdFilter` copies it onto every record, so any logger used while handling that job tags its
lines. `configure(service)` installs the JSON handler on the root logger (and uvicorn's loggers).
Level: PRUNE_LOG_LEVEL (default INFO).
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from jobs.settings import get_settings

_job_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("prune_job_id", default=None)
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def set_job_id(job_id: str | None) -> contextvars.Token[str | None]:
    """Bind `job_id` to the current context; returns a token for `reset_job_id`."""
    return _job_id.set(job_id)


def reset_job_id(token: contextvars.Token[str | None]) -> None:
    """Undo a `set_job_id`."""
    _job_id.reset(token)


def current_job_id() -> str | None:
    """The job id bound to the current context, if any."""
    return _job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line emitted inside the block with `job_id`."""
    token = set_job_id(job_id)
    try:
        yield
    finally:
        reset_job_id(token)


class JobIdFilter(logging.Filter):
    """Adds `job_id` (from the context, unless the call passed `extra={"job_id": ...}`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "job_id", None) is None:
            record.job_id = _job_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "service", "msg", "job_id"?, extras..., "exc"?}` on one line."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "service": self.service,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or _job_id.get()
        if job_id:
            out["job_id"] = job_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in out and key != "job_id" and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def configure(service: str, level: str | int | None = None) -> logging.Handler:
    """Log JSON lines to stderr from the root logger and uvicorn's loggers (idempotent)."""
    level = level or get_settings().log_level
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_prune_json", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler.addFilter(JobIdFilter())
    handler._prune_json = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers = []
        lg.propagate = True
    return handler
