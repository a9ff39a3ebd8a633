"""Job notifications as Standard Webhooks (https://www.standardwebhooks.com/).

Each delivery is a JSON POST `{"type", "timestamp", "data"}` with the headers
- `webhook-id`: the message id (the same on every retry, so receivers can de-duplicate),
- `webhook-timestamp`: unix seconds of this attempt,
- `webhook-signature`: `v1,` + base64(HMAC-SHA256(secret, f"{id}.{timestamp}.{body}")),
where the secret is `whsec_` + base64 of the key bytes (`PRUNE_WEBHOOK_SECRET`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

SECRET_PREFIX = "whsec_"
DEFAULT_TOLERANCE_S = 300


class WebhookError(ValueError):
    """A bad secret or URL."""


class WebhookVerificationError(Exception):
    """A delivery's signature or timestamp does not verify."""


@dataclass(frozen=True)
class DeliveryAttempt:
    """One POST of a webhook: HTTP status (None if no response), error text, timing."""

    attempt: int
    status: int | None
    error: str | None
    duration_s: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def generate_secret(nbytes: int = 32) -> str:
    """A new `whsec_...` secret."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(nbytes)).decode()


def secret_bytes(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret."""
    raw = secret[len(SECRET_PREFIX) :] if secret.startswith(SECRET_PREFIX) else secret
    try:
        key = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookError("webhook secret must be 'whsec_' followed by base64") from exc
    if len(key) < 16:
        raise WebhookError("webhook secret must hold at least 16 bytes")
    return key


def checked_secret(secret: str | None) -> str | None:
    """A configured PRUNE_WEBHOOK_SECRET, validated (WebhookError); None when unset (webhooks
    disabled)."""
    if secret is not None:
        try:
            secret_bytes(secret)
        except WebhookError as exc:
            raise WebhookError(f"PRUNE_WEBHOOK_SECRET: {exc}") from None
    return secret


def sign(secret: str, msg_id: str, timestamp: int, body: bytes | str) -> str:
    """The `webhook-signature` header value for one message."""
    if isinstance(body, str):
        body = body.encode()
    content = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def sign_headers(
    secret: str, body: bytes | str, msg_id: str | None = None, timestamp: int | None = None
) -> dict:
    """The three Standard Webhooks headers for `body`."""
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes | str,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> None:
    """Raise WebhookVerificationError unless a `v1` signature matches and the timestamp is within
    `tolerance_s` of now (both directions, against replay)."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, ts, sigs = (lower.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not msg_id or not ts or not sigs:
        raise WebhookVerificationError("missing webhook headers")
    try:
        timestamp = int(ts)
    except ValueError as exc:
        raise WebhookVerificationError("bad webhook-timestamp") from exc
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        raise WebhookVerificationError("webhook-timestamp outside the tolerance window")
    expected = sign(secret, msg_id, timestamp, body).encode()
    ok = False
    for candidate in sigs.split():
        if candidate.startswith("v1,") and hmac.compare_digest(candidate.encode(), expected):
            ok = True
    if not ok:
        raise WebhookVerificationError("no matching signature")


def _check_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"webhook URL must be http(s)://host/..., got {url!r}")
    if parts.username or parts.password:
        raise WebhookError("webhook URL must not carry credentials")
    return parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)


def resolve_checked(url: str, allow_private: bool = False) -> str:
    """Resolve the URL's host once and return the address to connect to. Unless `allow_private`,
    refuse (WebhookError) a host with any private, loopback, link-local or reserved address
    (tenants must not reach internal services: SSRF)."""
    host, port = _check_url(url)
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        raise WebhookError(f"cannot resolve webhook host {host!r}") from exc
    addrs = [str(info[4][0]) for info in infos]
    if not addrs:
        raise WebhookError(f"cannot resolve webhook host {host!r}")
    if not allow_private:
        for addr in addrs:
            ip = ipaddress.ip_address(addr.split("%")[0])
            if not ip.is_global or ip.is_multicast:
                raise WebhookError(f"webhook host {host!r} resolves to a non-public address")
    return next((a for a in addrs if ":" not in a), addrs[0])  # IPv4 first, as most clients do


def validate_url(url: str, allow_private: bool = False) -> None:
    """Submit-time check: the URL's shape and, unless `allow_private`, where its host resolves now."""
    _check_url(url)
    if not allow_private:
        resolve_checked(url, allow_private)


def pinned(url: str, address: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(url, headers, extensions) that connect to `address` instead of resolving the host again
    (DNS rebinding), keeping the Host header and the TLS server name (SNI and certificate check)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    literal = f"[{address}]" if ":" in address else address
    netloc = literal + (f":{parts.port}" if parts.port else "")
    headers = {"host": parts.netloc.rpartition("@")[2]}
    extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
    return parts._replace(netloc=netloc).geturl(), headers, extensions


def build_body(event_type: str, payload: Mapping[str, Any]) -> bytes:
    """The JSON body of a delivery."""
    message = {
        "type": event_type,
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": payload,
    }
    return json.dumps(message, separators=(",", ":"), default=str).encode()


def deliver(
    url: str,
    secret: str,
    event_type: str,
    payload: Mapping[str, Any],
    max_attempts: int = 5,
    backoff: float = 1.0,
    *,
    max_backoff: float = 60.0,
    timeout: float = 10.0,
    msg_id: str | None = None,
    client: httpx.Client | None = None,
    sleep: Callable[[float], None] = time.sleep,
    allow_private: bool = False,
) -> list[DeliveryAttempt]:
    """POST a signed event, retrying non-2xx answers and connection errors with exponential backoff
    (`backoff * 2**(n-1)`, capped at `max_backoff`). Returns every attempt; the last one has
    `ok=True` on success. Never raises for delivery failures; redirects are not followed.

    Each attempt resolves the host once, applies the submit-time address policy to the answer
    (`resolve_checked`: private/loopback refused unless `allow_private`) and connects to that
    checked address, so a name re-pointed after submit (DNS rebinding) reaches nothing internal."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    secret_bytes(secret)
    body = build_body(event_type, payload)
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    own = client is None
    http = client or httpx.Client(timeout=timeout, follow_redirects=False)
    attempts: list[DeliveryAttempt] = []
    try:
        for n in range(1, max_attempts + 1):
            headers = {
                "content-type": "application/json",
                "user-agent": "prune-service-webhooks/1",
                **sign_headers(secret, body, msg_id=msg_id),
            }
            t0 = time.monotonic()
            status: int | None = None
            error: str | None = None
            try:
                target, host, ext = pinned(url, resolve_checked(url, allow_private))
                r = http.post(
                    target, content=body, headers={**headers, **host}, timeout=timeout, extensions=ext
                )
                status = r.status_code
                if not 200 <= status < 300:
                    error = f"HTTP {status}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            except WebhookError as exc:  # refused at send time: not retried (it would be refused again)
                attempts.append(
                    DeliveryAttempt(n, None, f"refused: {exc}", round(time.monotonic() - t0, 4), False)
                )
                break
            ok = error is None
            attempts.append(DeliveryAttempt(n, status, error, round(time.monotonic() - t0, 4), ok))
            if ok:
                break
            if n < max_attempts:
                sleep(min(max_backoff, backoff * 2 ** (n - 1)))
    finally:
        if own:
            http.close()
    return attempts
