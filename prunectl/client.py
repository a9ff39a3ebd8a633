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
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
"""Answers worth retrying: the tenant is at its limit (429) or the service is failing or restarting."""
MAX_BACKOFF = 8.0
"""Longest pause between two attempts without a Retry-After (an API back after a restart is seen
within this many seconds)."""
MAX_RETRY_AFTER = 300.0


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


class TimedOut(CliError):
    """The total --timeout ran out while the job was still running (it goes on on the service)."""

    exit_code = 5


class TargetExists(CliError):
    """The download target is a non-empty directory (or a file) and --force was not given."""

    exit_code = 2


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


def retry_after(r: httpx.Response, now: float | None = None) -> float | None:
    """Seconds asked for by a `Retry-After` header (delta-seconds or an HTTP date), None if absent."""
    raw = r.headers.get("retry-after")
    if not raw:
        return None
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(raw)))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, when - (time.time() if now is None else now)))


def backoff_delay(attempt: int, base: float, hint: float | None, cap: float = MAX_BACKOFF) -> float:
    """Pause before attempt `attempt + 1`: the server's Retry-After when it sent one, else
    exponential backoff from `base`, at most `cap`."""
    if hint is not None:
        return hint
    return min(cap, base * 2 ** (attempt - 1))


def _problem(r: httpx.Response) -> dict[str, Any]:
    try:
        body = r.json()
        if isinstance(body, dict):
            return body
    except ValueError:
        pass
    return {"title": r.reason_phrase, "detail": r.text[:500] or None}


class Client:
    """HTTP client with bearer auth and retries of connection errors, 429 and 5xx (exponential
    backoff, honouring Retry-After).

    Without a deadline each request gets `retries` attempts. With `deadline` (a `time.monotonic()`
    instant: the command's total --timeout) requests are retried until it passes, however many
    attempts that takes: an API restart or a tenant at its limit is waited out.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        deadline: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url or urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"service URL must be http(s)://..., got {url!r}")
        self.base = url.rstrip("/") + "/"
        self.retries, self.backoff, self.sleep = max(1, retries), backoff, sleep
        self.deadline = deadline
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

    def remaining(self) -> float | None:
        """Seconds left before the deadline (None without one)."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def pause(self, attempt: int, hint: float | None = None) -> bool:
        """Sleep before another attempt; False when no attempt is left (count or deadline)."""
        delay = backoff_delay(attempt, self.backoff, hint)
        left = self.remaining()
        if left is None:
            if attempt >= self.retries:
                return False
        else:
            if left <= 0:
                return False
            delay = min(delay, left)
        self.sleep(delay)
        return True

    def _gave_up(self, what: str, attempt: int, last: str) -> Unreachable:
        within = f"after {attempt} attempts" + (" (--timeout reached)" if self.deadline is not None else "")
        busy = "busy" if last.startswith("HTTP 429") else "unreachable"
        return Unreachable(f"{what}: service {busy} {within} ({last})")

    def _with_retries(self, what: str, fn: Callable[[], httpx.Response]) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            hint = None
            try:
                r = fn()
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                if r.status_code not in RETRY_STATUS:
                    return r
                last = format_problem(r.status_code, _problem(r))
                hint = retry_after(r)
            if not self.pause(attempt, hint):
                raise self._gave_up(what, attempt, last)

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
            hint = None
            try:
                with self.http.stream(
                    "GET", f"v1/jobs/{job_id}/events", headers=headers, timeout=httpx.Timeout(30, read=60)
                ) as r:
                    if r.status_code in RETRY_STATUS:
                        hint = retry_after(r)
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
                if not self.pause(failures, hint):
                    raise Unreachable(f"event stream of {job_id} lost: {exc}") from exc

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
        self,
        job_id: str,
        out_dir: Path,
        on_file: Callable[[str, int], None] | None = None,
        force: bool = False,
    ) -> list[dict[str, Any]]:
        """Download every artifact of a succeeded job as the directory `out_dir` (see
        `download_artifacts`: all-or-nothing, verified against manifest.json)."""
        check_target(out_dir, force)
        items = self.artifacts(job_id)
        return download_artifacts(self._fetch, items, out_dir, on_file, force)


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


def verify_manifest(root: Path, names: list[PurePosixPath]) -> None:
    """Check the downloaded files `names` under `root` against `root/manifest.json`
    (`{"files": {rel: {size, sha256}}}`): every listed file present and matching, and every
    downloaded file (but the manifest itself) listed."""
    manifest = root / "manifest.json"
    try:
        files = json.loads(manifest.read_text())["files"]
        listed = {str(safe_relpath(r)): (int(m["size"]), str(m["sha256"])) for r, m in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise VerificationError(f"unreadable manifest.json: {exc}") from exc
    for rel, (size, digest) in listed.items():
        path = root / rel
        if not path.is_file():
            raise VerificationError(f"manifest.json lists {rel}, which was not downloaded")
        if path.stat().st_size != size or _sha256(path) != digest:
            raise VerificationError(f"{rel} does not match manifest.json")
    unlisted = sorted(str(n) for n in names if str(n) != "manifest.json" and str(n) not in listed)
    if unlisted:
        raise VerificationError(f"{', '.join(unlisted)} not listed in manifest.json")


def check_target(out_dir: Path, force: bool) -> None:
    """Refuse a download target that holds anything (a file, or a non-empty directory) unless `force`."""
    out_dir = Path(out_dir)
    if force or not (out_dir.exists() or out_dir.is_symlink()):
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        return
    what = "a non-empty directory" if out_dir.is_dir() else "not a directory"
    raise TargetExists(
        f"download target {out_dir} is {what}; choose a new directory, or pass --force to replace it whole"
    )


def _install(staging: Path, out_dir: Path, force: bool) -> None:
    """Move the verified `staging` directory to `out_dir` (same filesystem: renames only)."""
    check_target(out_dir, force)
    old: Path | None = None
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif out_dir.exists() or out_dir.is_symlink():  # --force: set the old one aside, removed below
        old = out_dir.with_name(f".{out_dir.name}.prunectl-old-{uuid.uuid4().hex[:8]}")
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def download_artifacts(
    fetch: Callable[[str, Path], tuple[int, str]],
    items: list[dict[str, Any]],
    out_dir: Path,
    on_file: Callable[[str, int], None] | None = None,
    force: bool = False,
) -> list[dict[str, Any]]:
    """Fetch `items` ({name, size, sha256, url}) as the new directory `out_dir`, all-or-nothing.

    Files go to a fresh temporary directory beside `out_dir`; each must match its listed size and
    sha256, and all of them manifest.json. Only then is the directory renamed to `out_dir`. An existing
    non-empty `out_dir` is refused (TargetExists) unless `force`, which replaces it whole: old and new
    files are never mixed.
    """
    out_dir = Path(out_dir).absolute()
    check_target(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.prunectl-", dir=out_dir.parent))
    try:
        names = [safe_relpath(it["name"]) for it in items]
        if not any(str(n) == "manifest.json" for n in names):
            raise VerificationError("the job lists no manifest.json: nothing to verify against")
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
        verify_manifest(staging, names)
        mode = 0o777 & ~_umask()  # mkdtemp made it 0700; a directory the user made would not be
        for d in (staging, *(p for p in staging.rglob("*") if p.is_dir())):
            d.chmod(mode)
        _install(staging, out_dir, force)
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
