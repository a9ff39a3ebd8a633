"""HMAC-SHA256 signatures for artifact download URLs."""

from __future__ import annotations

import hashlib
import hmac
import time


class Signer:
    """Signs `<tenant>/<job_id>/<name>` plus an expiry (unix seconds)."""

    def __init__(self, secret: bytes) -> None:
        if not secret:
            raise ValueError("signing secret must not be empty")
        self._secret = secret

    def sign(self, tenant: str, job_id: str, name: str, expires: int) -> str:
        """Hex HMAC-SHA256 of f"{tenant}/{job_id}/{name}\\n{expires}"."""
        msg = f"{tenant}/{job_id}/{name}\n{int(expires)}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def verify(
        self, tenant: str, job_id: str, name: str, expires: int, sig: str, at: float | None = None
    ) -> bool:
        """True when `sig` is valid (constant-time compare) and `expires` has not passed."""
        expected = self.sign(tenant, job_id, name, expires)
        valid = hmac.compare_digest(expected.encode(), sig.encode("ascii", "replace"))
        return valid and int(expires) >= (time.time() if at is None else at)
