"""A small synchronous client of the Prune Service REST API (httpx; no torch, no project imports)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RETRY_STATUS = frozenset({500, 502, 503, 504})


class CliError(Exception):
    """Base of the errors that map to an exit code."""

    exit_code = 1


class ApiError(CliError):
    """The API refused the request (4xx): bad input; `problem` is the problem+json body."""

    exit_code = 2

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status, self.problem = status, problem
        super().__init__(format_problem(status, problem))


class Unreachable(CliError):
    """Connection errors or 5xx answers after every retry."""

    exit_code = 3


class VerificationError(CliError):
    """A downloaded artifact does not match its size/sha256 or the manifest."""

    exit_code = 4


def format_problem(status: int, problem: dict[str, Any]) -> str:
    """One readable line (plus validation errors) from a problem+json document."""
    title = problem.get("title") or "error"
    detail = problem.get("detail")
    text = f"HTTP {status} {title}" + (f": {detail}" if detail and detail != title else "")
    for err in problem.get("errors") or []:
        loc = ".".join(str(p) for p in err.get("loc", []))
        text += f"\n  - {loc}: {err.get('msg')}"
    return text


def _problem(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
        if isinstance(body, dict):
            return body
    except ValueError:
        pass
    return {"title": r.reason_phrase, "detail": r.text[:500] or None}


class Client:
    """HTTP client with bearer auth and retries (connection errors and 5xx, exponential backoff)."""

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"service URL must be http(s)://..., got {url!r}")
        self.base = url.rstrip("/") + "/"
        self.retries, self.backoff, self.sleep = max(1, retries), backoff, sleep
        headers = {"user-agent": "prunectl/0.1", "accept": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self.http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout, transport=transport)
        self.api_key = api_key

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------------

    def _with_retries(self, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
        last = ""
        for attempt in range(1, self.retries + 1):
            try:
                r = fn()
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if r.status_code not in RETRY_STATUS:
                    return r
                last = format_problem(r.status_code, _problem(r))
            if attempt < self.retries:
                self.sleep(self.backoff * 2 ** (attempt - 1))
        raise Unreachable(f"{what}: service unreachable after {self.retries} attempts ({last})")

    def request(self, method: str, path: str, **kw: Any) -> Any:
        """Send a request; return the JSON body of a 2xx, raise ApiError (4xx) or Unreachable."""
        r = self._with_retries(f"{method} {path}", lambda: self.http.request(method, path.lstrip("/"), **kw))
        if r.status_code >= 400:
            raise ApiError(r.status_code, _problem(r))
        return r.json() if r.content else None

    # -- API -----------------------------------------------------------------------------------

    def submit(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs. A key is always sent so that retries after a lost answer never duplicate."""
        key = idempotency_key or f"prunectl-{uuid.uuid4().hex}"
        return self.request("POST", "v1/jobs", json=body, headers={"idempotency-key": key})

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.request("POST", f"v1/jobs/{job_id}/cancel")

    def jobs(self, status: str | None = None, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "after": after}.items() if v}
        return self.request("GET", "v1/jobs", params=params)

    def events_page(self, job_id: str, after: str | None = None, limit: int = 100) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if after:
            params["after"] = after
        return self.request("GET", f"v1/jobs/{job_id}/events", params=params)

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"v1/jobs/{job_id}/artifacts")["artifacts"]

    def stream_events(self, job_id: str, last_id: str | None = None) -> Iterator[dict[str, Any]]:
        """Follow the job's SSE stream, reconnecting with Last-Event-ID until it ends normally.

        Yields `{"id", "type", "data"}`. Raises Unreachable after repeated connection failures
        and NotImplementedError if the server does not answer with an event stream.
        """
        failures = 0
        while True:
            headers = {"accept": "text/event-stream"}
            if last_id:
                headers["last-event-id"] = last_id
            try:
                with self.http.stream(
                    "GET", f"v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30, read=60)
                ) as r:
                    if r.status_code >= 500:
                        raise httpx.TransportError(f"HTTP {r.status_code}")
                    if r.status_code >= 400:
                        r.read()
                        raise ApiError(r.status_code, _problem(r))
                    if "text/event-stream" not in r.headers.get("content-type", ""):
                        raise NotImplementedError("no SSE support")
                    for ev in parse_sse(r.iter_lines()):
                        failures = 0
                        last_id = ev.get("id") or last_id
                        yield ev
                return
            except httpx.TransportError as exc:
                failures += 1
                if failures >= self.retries:
                    raise Unreachable(f"event stream of {job_id} lost: {exc}") from exc
                self.sleep(self.backoff * 2 ** (failures - 1))

    # -- downloads -----------------------------------------------------------------------------

    def _same_origin(self, url: str) -> bool:
        a, b = urlsplit(url), urlsplit(self.base)
        return (a.scheme, a.netloc) == (b.scheme, b.netloc)

    def _fetch(self, url: str, dest: Path) -> tuple[int, str]:
        """Stream `url` into `dest`; return (size, sha256). The API key goes only to the API's origin
        (presigned object-store URLs carry their own signature and refuse extra auth)."""
        full = urljoin(self.base, url)
        send_key = self.api_key and self._same_origin(full)
        headers = {"authorization": f"Bearer {self.api_key}"} if send_key else {}

        def get() -> httpx.Response:
            h = hashlib.sha256()
            size = 0
            with httpx.stream("GET", full, headers=headers, timeout=60, follow_redirects=True) as r:
                if r.status_code >= 400:
                    r.read()
                    return r
                with dest.open("wb") as f:
                    for chunk in r.iter_bytes(1024 * 1024):
                        f.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
            r.extensions["prunectl_result"] = (size, h.hexdigest())
            return r

        r = self._with_retries(f"download {PurePosixPath(urlsplit(full).path).name}", get)
        if r.status_code >= 400:
            raise ApiError(r.status_code, _problem(r))
        return r.extensions["prunectl_result"]

    def download(
        self, job_id: str, out_dir: Path, on_file: Callable[[str, int], None] | None = None
    ) -> list[dict[str, Any]]:
        """Download every artifact of a succeeded job into `out_dir`, verifying each file's size and
        sha256 and then manifest.json. All-or-nothing: files go to a temporary directory inside
        `out_dir` and are moved into place only when everything verified."""
        items = self.artifacts(job_id)
        return download_artifacts(self._fetch, items, out_dir, on_file)


def safe_relpath(name: str) -> PurePosixPath:
    """An artifact name as a relative path that cannot escape the target directory."""
    p = PurePosixPath(name)
    bad_part = any(part in ("", ".", "..") for part in name.split("/"))
    if not name or p.is_absolute() or bad_part or "\\" in name:
        raise VerificationError(f"refusing unsafe artifact name {name!r}")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1024 * 1024), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_manifest(root: Path) -> None:
    """Check every file listed in `root/manifest.json` (`{"files": {rel: {size, sha256}}}`)."""
    manifest = root / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"unreadable manifest.json: {exc}") from exc
    for rel, meta in files.items():
        path = root / safe_relpath(rel)
        if not path.is_file():
            raise VerificationError(f"manifest.json lists {rel}, which was not downloaded")
        if path.stat().st_size != int(meta["size"]) or _sha256(path) != meta["sha256"]:
            raise VerificationError(f"{rel} does not match manifest.json")


def download_artifacts(
    fetch: Callable[[str, Path], tuple[int, str]],
    items: list[dict[str, Any]],
    out_dir: Path,
    on_file: Callable[[str, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Fetch and verify `items` ({name, size, sha256, url}) into `out_dir` (all-or-nothing)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prunectl-", dir=out_dir))
    try:
        names = [safe_relpath(it["name"]) for it in items]
        for it, rel in zip(items, names, strict=True):
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            size, digest = fetch(it["url"], dest)
            if size != int(it["size"]) or digest != it["sha256"]:
                raise VerificationError(
                    f"{it['name']}: got {size} bytes sha256 {digest[:12]}…, expected {it['size']} bytes "
                    f"sha256 {str(it['sha256'])[:12]}… (corrupted download; nothing kept)"
                )
            if on_file:
                on_file(it["name"], size)
        if any(str(n) == "manifest.json" for n in names):
            verify_manifest(staging)
        for rel in names:
            target = out_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return items


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse server-sent events into {"id", "type", "data"} (data JSON-decoded when possible)."""
    ev_id: str | None = None
    ev_type = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    payload: Any = json.loads(text)
                except ValueError:
                    payload = text
                yield {"id": ev_id, "type": ev_type, "data": payload}
            ev_type, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            ev_id = value
        elif field == "event":
            ev_type = value
        elif field == "data":
            data.append(value)
