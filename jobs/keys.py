"""The service's Redis schema: every key name and every Lua script, in one place.

Layout (prefix "prune"):
- `prune:job:<id>`                 JSON of the `Job` record
- `prune:idx:<tenant>`             sorted set of the tenant's job ids (score 0, ids sort by creation time)
- `prune:idx:<tenant>:<status>`    the same per status (listing filter)
- `prune:idem:<tenant>:<key>`      "<job id> <request sha256>" with a TTL (Idempotency-Key)
- `prune:idemref:<id>`             name of the job's `prune:idem:…` key, with the same TTL (retention
                                   deletes the key with the job while it still points at it)
- `prune:counts`                   hash status -> number of stored jobs in that status (metrics;
                                   jobs deleted by retention leave it)
- `prune:finished`                 sorted set of finished (succeeded, failed, cancelled) jobs, score:
                                   Unix time they finished (retention, jobs.retention)
- `prune:deleted`                  number of finished jobs deleted by retention (metrics)
- `prune:durations`                hash of job duration histogram buckets (metrics)
- `prune:blocks`                   hash of per-block pruning time histogram buckets (metrics, worker)
- `prune:active:<tenant>`          set of the tenant's queued/running/cancelling job ids (quota)
- `prune:outbox`                   sorted set of queued jobs whose task message is not known to be sent
                                   (score: Unix time of creation or of the last re-send; jobs.lifecycle)
- `prune:events:<id>`              the job's event stream (read and written by jobs.events)
- `prune:lease:<id>`               id of the worker holding the running job, with a TTL (the lease,
                                   jobs.lifecycle); gone when the worker stopped renewing it
- `prune:leases`                   sorted set of held jobs, score: Unix time their lease expires
- `prune:notice:<id>`              marker: the job's completion webhook was taken by a sender
- `prune:workers`                  sorted set of worker ids, score: Unix time their heartbeat expires
- `prune:lifecycle`                hash of lifecycle counters (`leases_expired`, `requeued`; metrics)
- `prune:fan:<id>`                 hash of a sweep fanned out over workers: `p:<label>` each variant
                                   job's fraction done, `r:<label>` its report JSON once it succeeded
- `prune:fanouts`                  set of the fanned-out sweep jobs not yet finished (fan-out sweep)

A sweep's variant jobs are ordinary records under the tenant `<tenant>~sweep` (a name no real tenant
can take), so they never show in the tenant's listing or count against its quota.

`jobs.store` (records, transitions, outbox, leases), `jobs.metrics` (counters and histograms) and
`jobs.retention` (deletes) read and write these keys through `Keys`; nothing else names them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from jobs.spec import JobStatus

__all__ = ["CONFIRM", "CREATE", "DELETE_IF", "PUBLISH", "RENEW", "Keys"]


@dataclass(frozen=True)
class Keys:
    """The key names under one prefix."""

    prefix: str = "prune"

    def job_key(self, job_id: str) -> str:
        """Key of a job record."""
        return f"{self.prefix}:job:{job_id}"

    def idx(self, tenant: str, status: JobStatus | None = None) -> str:
        """The tenant's job index (all jobs, or those in `status`)."""
        return f"{self.prefix}:idx:{tenant}" + (f":{status.value}" if status else "")

    def idem(self, tenant: str, key: str) -> str:
        """The tenant's Idempotency-Key entry (the key hashed)."""
        return f"{self.prefix}:idem:{tenant}:{hashlib.sha256(key.encode()).hexdigest()}"

    def idemref(self, job_id: str) -> str:
        """Name of the job's idempotency key."""
        return f"{self.prefix}:idemref:{job_id}"

    def active(self, tenant: str) -> str:
        """Set of the tenant's queued, running and cancelling jobs (quota)."""
        return f"{self.prefix}:active:{tenant}"

    def events(self, job_id: str) -> str:
        """The job's event stream."""
        return f"{self.prefix}:events:{job_id}"

    def lease_key(self, job_id: str) -> str:
        """Key holding the id of the worker whose lease on the job is live (expires with the lease)."""
        return f"{self.prefix}:lease:{job_id}"

    def notice_key(self, job_id: str) -> str:
        """Key marking that the job's completion webhook was taken by a sender (`lifecycle.take_notice`)."""
        return f"{self.prefix}:notice:{job_id}"

    @property
    def counts(self) -> str:
        """Hash status -> number of stored jobs."""
        return f"{self.prefix}:counts"

    @property
    def durations(self) -> str:
        """Hash of the job duration histogram."""
        return f"{self.prefix}:durations"

    @property
    def blocks(self) -> str:
        """Hash of the per-block pruning time histogram."""
        return f"{self.prefix}:blocks"

    @property
    def deleted(self) -> str:
        """Number of finished jobs retention deleted."""
        return f"{self.prefix}:deleted"

    @property
    def finished_key(self) -> str:
        """Sorted set of finished jobs (score: Unix time they finished)."""
        return f"{self.prefix}:finished"

    @property
    def leases_key(self) -> str:
        """Sorted set of held jobs (score: Unix time their lease expires)."""
        return f"{self.prefix}:leases"

    @property
    def workers_key(self) -> str:
        """Sorted set of worker ids (score: Unix time their heartbeat expires)."""
        return f"{self.prefix}:workers"

    @property
    def lifecycle_key(self) -> str:
        """Hash of lifecycle counters (metrics)."""
        return f"{self.prefix}:lifecycle"

    def fan_key(self, job_id: str) -> str:
        """Hash of a fanned-out sweep job: `p:<label>` the fraction done of each variant's job,
        `r:<label>` its report (JSON) once it succeeded. Deleted with the sweep's record."""
        return f"{self.prefix}:fan:{job_id}"

    @property
    def fanouts_key(self) -> str:
        """Set of the sweep jobs fanned out and not finished (the API's fan-out sweep checks them)."""
        return f"{self.prefix}:fanouts"

    @property
    def outbox_key(self) -> str:
        """Sorted set of queued jobs whose task message is not confirmed sent (score: Unix time)."""
        return f"{self.prefix}:outbox"


# Create a job with its indexes, quota entry, outbox entry and first event (and Idempotency-Key).
# KEYS: idem, job, idx, idx:queued, counts, events, active, outbox, idemref
# ARGV: id, record, digest, ttl, idem?, event, maxlen, max active jobs (0 = no limit), outbox score
CREATE = """
if ARGV[5] == '1' then
  local existing = redis.call('GET', KEYS[1])
  if existing then return {0, existing} end
end
local limit = tonumber(ARGV[8])
if limit > 0 then
  local active = redis.call('SCARD', KEYS[7])
  if active >= limit then return {2, tostring(active)} end
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[3], 'EX', tonumber(ARGV[4]))
  redis.call('SET', KEYS[9], KEYS[1], 'EX', tonumber(ARGV[4]))
end
redis.call('SADD', KEYS[7], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('ZADD', KEYS[4], 0, ARGV[1])
redis.call('HINCRBY', KEYS[5], 'queued', 1)
redis.call('ZADD', KEYS[8], ARGV[9], ARGV[1])
local eid = redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*', 'type', 'status', 'data', ARGV[6])
return {1, eid}
"""

# Drop a job's outbox entry unless the record has moved on to another delivery token.
# KEYS: job, outbox; ARGV: id, token
CONFIRM = """
local raw = redis.call('GET', KEYS[1])
if raw and cjson.decode(raw)['delivery'] ~= ARGV[2] then return 0 end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# Delete a key only while it holds the given value. KEYS: key; ARGV: value
DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Extend a lease while the job is held under the token.
# KEYS: job, lease, leases; ARGV: token, worker, lease ms, deadline (Unix s), job id
RENEW = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local job = cjson.decode(raw)
if job['delivery'] ~= ARGV[1] or (job['status'] ~= 'running' and job['status'] ~= 'cancelling') then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', tonumber(ARGV[3]))
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
return 1
"""

# Append an event while the job is held under the token.
# KEYS: job, events; ARGV: token, maxlen, event type, event data
PUBLISH = """
local raw = redis.call('GET', KEYS[1])
if not raw then return false end
local job = cjson.decode(raw)
if job['delivery'] ~= ARGV[1] or (job['status'] ~= 'running' and job['status'] ~= 'cancelling') then
  return false
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'type', ARGV[3], 'data', ARGV[4])
"""
