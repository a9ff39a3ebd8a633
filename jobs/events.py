"""Per-job event streams: one Redis Stream per job holding every event, readable as pages or tails.

Event ids are Redis stream ids ("<ms>-<seq>"); the API uses them as SSE ids so clients resume with
Last-Event-ID. Status events are appended by `jobs.store` in the same transaction as the record change.
"""

from __future__ import annotations

import json
import re
from typing import Any

import redis
import redis.asyncio as aredis
from pydantic import BaseModel

from jobs.keys import Keys

EVENT_TYPES = ("status", "progress", "artifacts", "error", "log", "webhook")
_ID = re.compile(r"([0-9]{1,20})(?:-([0-9]{1,20}))?", re.ASCII)
ID_PART_MAX = 2**64 - 1
"""Each part of a Redis stream id ("<ms>-<seq>") is an unsigned 64-bit integer."""
LAST_ID = f"{ID_PART_MAX}-{ID_PART_MAX}"
"""The largest stream id: nothing comes after it."""
MAXLEN = 10_000


class Event(BaseModel):
    """One event of a job: its stream id, type and payload."""

    id: str
    type: str
    data: dict[str, Any]


def encode(type_: str, data: dict[str, Any]) -> dict[str, str]:
    """Stream entry fields for an event."""
    return {"type": type_, "data": json.dumps(data, separators=(",", ":"), default=str)}


def check_id(event_id: str) -> str:
    """Validate a stream id given by a client ("0" means from the start): ASCII digits, "<ms>" or
    "<ms>-<seq>", each part at most 2**64 - 1 (what Redis accepts); raise ValueError otherwise."""
    m = _ID.fullmatch(event_id)
    if m is None:
        raise ValueError(f"not an event id: {event_id!r} (expected '<ms>-<seq>', ASCII digits)")
    if any(part is not None and int(part) > ID_PART_MAX for part in m.groups()):
        raise ValueError(f"event id out of range: {event_id!r} (each part is at most {ID_PART_MAX})")
    return event_id


def _range_start(after: str | None) -> str | None:
    """XRANGE start strictly after `after` ("-": from the start); None when nothing can follow it."""
    if after in (None, "0", "0-0"):
        return "-"
    check_id(after)
    if after == LAST_ID:  # Redis refuses an exclusive start at the largest id
        return None
    return "(" + after


def _decode(entries: list[tuple[Any, dict[Any, Any]]]) -> list[Event]:
    out = []
    for eid, fields in entries:
        f = {_s(k): _s(v) for k, v in fields.items()}
        out.append(Event(id=_s(eid), type=f.get("type", "log"), data=json.loads(f.get("data", "{}"))))
    return out


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class EventLog:
    """Publish and read job events (synchronous client)."""

    def __init__(self, client: redis.Redis, prefix: str = "prune") -> None:
        self.r = client
        self.prefix = prefix

    def key(self, job_id: str) -> str:
        """Stream key of `job_id`."""
        return Keys(self.prefix).events(job_id)

    def publish(self, job_id: str, type_: str, data: dict[str, Any]) -> str:
        """Append an event and return its id."""
        return _s(self.r.xadd(self.key(job_id), encode(type_, data), maxlen=MAXLEN, approximate=True))

    def page(self, job_id: str, after: str | None = None, limit: int = 100) -> list[Event]:
        """Up to `limit` events strictly after `after` (from the start when None)."""
        start = _range_start(after)
        if start is None:
            return []
        return _decode(self.r.xrange(self.key(job_id), min=start, max="+", count=limit))

    def tail(self, job_id: str, after: str = "0", block_ms: int = 5000, count: int = 100) -> list[Event]:
        """Events after `after`, waiting up to `block_ms` for the first one to arrive."""
        res = self.r.xread({self.key(job_id): check_id(after)}, count=count, block=block_ms)
        return _decode(res[0][1]) if res else []

    def delete(self, job_id: str) -> None:
        """Drop a job's stream."""
        self.r.delete(self.key(job_id))


class AsyncEventLog:
    """Blocking tails of job events for the API's server-sent events (asyncio client)."""

    def __init__(self, client: aredis.Redis, prefix: str = "prune") -> None:
        self.r = client
        self.prefix = prefix

    async def page(self, job_id: str, after: str | None = None, limit: int = 100) -> list[Event]:
        """Up to `limit` events strictly after `after`."""
        start = _range_start(after)
        if start is None:
            return []
        return _decode(await self.r.xrange(Keys(self.prefix).events(job_id), min=start, max="+", count=limit))

    async def tail(
        self, job_id: str, after: str = "0", block_ms: int = 5000, count: int = 100
    ) -> list[Event]:
        """Events after `after`, waiting up to `block_ms` for the first one."""
        res = await self.r.xread(
            {Keys(self.prefix).events(job_id): check_id(after)}, count=count, block=block_ms
        )
        return _decode(res[0][1]) if res else []
