"""API keys → tenants. Pure logic (no web framework): the API calls `KeyRing.authenticate`.

Keys are stored as sha256 hex digests, never in clear. Issued keys are random 256-bit tokens
(`python -m jobs.auth new TENANT`), so a fast unsalted hash is enough: with that much entropy
neither brute force nor precomputed tables can invert it, and a slow KDF (scrypt/argon2) would
only add tens of milliseconds to every request without adding security. (Slow hashes matter for
low-entropy, human-chosen passwords, which API keys are not.)

Configuration, merged if both are set:
- `PRUNE_API_KEYS_FILE`: JSON or YAML list of `{tenant, key_sha256, max_active_jobs}` (or a
  mapping with a `keys:` list). One tenant may have several keys (rotation).
- `PRUNE_API_KEYS`: `tenant:key,tenant2:key2` in clear (development/CI), hashed at load.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import re
import secrets
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jobs.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_MAX_ACTIVE_JOBS = 4
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AuthConfigError(ValueError):
    """The key configuration is malformed."""


@dataclass(frozen=True)
class Tenant:
    """Who a request acts for. `name` is also the tenant's storage prefix."""

    name: str
    max_active_jobs: int = DEFAULT_MAX_ACTIVE_JOBS


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in configuration for an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    """A fresh random API key (256 bits, URL-safe)."""
    return "prn_" + secrets.token_urlsafe(32)


def _tenant(name: Any, max_active_jobs: Any) -> Tenant:
    if not isinstance(name, str) or not TENANT_RE.match(name):
        raise AuthConfigError(f"invalid tenant name {name!r} (lowercase letters, digits, '-', '_'; max 63)")
    if isinstance(max_active_jobs, bool) or not isinstance(max_active_jobs, int) or max_active_jobs < 1:
        raise AuthConfigError(f"max_active_jobs for {name!r} must be a positive integer")
    return Tenant(name, max_active_jobs)


class KeyRing:
    """A set of (key hash, tenant) entries with constant-time authentication."""

    def __init__(self, entries: Iterable[tuple[str, Tenant]] = ()) -> None:
        self._entries: list[tuple[bytes, Tenant]] = []
        tenants: dict[str, Tenant] = {}
        for digest, tenant in entries:
            digest = digest.strip().lower()
            if not _HEX64.match(digest):
                raise AuthConfigError(f"key_sha256 for tenant {tenant.name!r} is not 64 hex characters")
            known = tenants.setdefault(tenant.name, tenant)
            if known != tenant:
                raise AuthConfigError(f"tenant {tenant.name!r} is configured with different max_active_jobs")
            if any(d == bytes.fromhex(digest) for d, _ in self._entries):
                raise AuthConfigError(f"duplicate API key (tenant {tenant.name!r})")
            self._entries.append((bytes.fromhex(digest), tenant))
        self.tenants: dict[str, Tenant] = tenants

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, bearer_token: str | None) -> Tenant | None:
        """The tenant owning this key (an optional 'Bearer ' prefix is stripped), else None.

        Compares the token's digest with every entry (no early exit) using `hmac.compare_digest`.
        """
        if not bearer_token:
            return None
        token = bearer_token.strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found: Tenant | None = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(stored, digest):
                found = tenant
        return found

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> KeyRing:
        """From `[{tenant, key_sha256, max_active_jobs?}]`."""
        entries = []
        for i, rec in enumerate(records):
            if not isinstance(rec, Mapping) or "tenant" not in rec or "key_sha256" not in rec:
                raise AuthConfigError(f"key entry {i} needs 'tenant' and 'key_sha256'")
            unknown = set(rec) - {"tenant", "key_sha256", "max_active_jobs", "comment"}
            if unknown:
                raise AuthConfigError(f"key entry {i} has unknown fields {sorted(unknown)}")
            tenant = _tenant(rec["tenant"], rec.get("max_active_jobs", DEFAULT_MAX_ACTIVE_JOBS))
            entries.append((str(rec["key_sha256"]), tenant))
        return cls(entries)

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        """From a JSON or YAML file (chosen by extension; JSON is valid YAML anyway)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise AuthConfigError(f"cannot read API keys file {path}: {exc}") from exc
        try:
            if path.suffix.lower() == ".json":
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text)
        except Exception as exc:
            raise AuthConfigError(f"cannot parse API keys file {path}: {exc}") from exc
        if isinstance(data, Mapping):
            data = data.get("keys")
        if not isinstance(data, list):
            raise AuthConfigError(f"API keys file {path} must hold a list of entries (or 'keys: [...]')")
        return cls.from_records(data)

    @classmethod
    def from_string(cls, spec: str, max_active_jobs: int = DEFAULT_MAX_ACTIVE_JOBS) -> KeyRing:
        """From 'tenant:key,tenant2:key2' (keys in clear, hashed here)."""
        entries = []
        for item in filter(None, (s.strip() for s in spec.split(","))):
            tenant, sep, key = item.partition(":")
            if not sep or not key:
                raise AuthConfigError("PRUNE_API_KEYS entries must look like 'tenant:key'")
            if len(key) < 16:
                log.warning("API key for tenant %r is shorter than 16 characters", tenant)
            entries.append((hash_key(key), _tenant(tenant.strip(), max_active_jobs)))
        return cls(entries)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Merge PRUNE_API_KEYS_FILE and PRUNE_API_KEYS (either may be absent: empty ring)."""
        entries: list[tuple[str, Tenant]] = []
        if settings.api_keys_file:
            ring = cls.from_file(settings.api_keys_file)
            entries += [(d.hex(), t) for d, t in ring._entries]
        if settings.api_keys:
            default_max = settings.default_max_active_jobs or DEFAULT_MAX_ACTIVE_JOBS
            ring = cls.from_string(settings.api_keys, default_max)
            entries += [(d.hex(), t) for d, t in ring._entries]
        return cls(entries)


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.auth hash KEY|-` or `python -m jobs.auth new TENANT [--max-active-jobs N]`."""
    parser = argparse.ArgumentParser(prog="python -m jobs.auth", description="API key helpers.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hash", help="print the key_sha256 of a key ('-' reads it from stdin)")
    h.add_argument("key")
    n = sub.add_parser("new", help="generate a key and print it with its config entry")
    n.add_argument("tenant")
    n.add_argument("--max-active-jobs", type=int, default=DEFAULT_MAX_ACTIVE_JOBS)
    args = parser.parse_args(argv)
    if args.cmd == "hash":
        key = sys.stdin.readline().strip() if args.key == "-" else args.key
        if not key:
            parser.error("empty key")
        print(hash_key(key))
        return 0
    try:
        tenant = _tenant(args.tenant, args.max_active_jobs)
    except AuthConfigError as exc:
        parser.error(str(exc))
    key = new_key()
    print(f"key (give to the tenant, store nowhere else): {key}", file=sys.stderr)
    entry = {"tenant": tenant.name, "key_sha256": hash_key(key), "max_active_jobs": tenant.max_active_jobs}
    print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    sys.exit(main())
