"""The web page at /ui: static HTML/JS/CSS from api/ui/ (no build step, no third-party code).

The page is public; everything it shows comes from the /v1 API with the API key the user types in,
kept in the browser's sessionStorage and sent as `Authorization: Bearer` (tenant isolation is the
API's). Progress is read from the SSE stream with fetch() (EventSource cannot send headers).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from api.problems import ProblemError

STATIC = Path(__file__).with_name("ui")
FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' blob: data: https:; connect-src 'self'; frame-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
"""The page's Content-Security-Policy: only its own scripts; the report iframe is sandboxed."""
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
def ui_root() -> RedirectResponse:
    """/ui -> /ui/ (relative asset URLs)."""
    return RedirectResponse("/ui/", status_code=308)


@router.get("/")
@router.get("/{name}")
def ui_file(name: str = "index.html") -> FileResponse:
    """One of the page's static files."""
    if name not in FILES:
        raise ProblemError(404, f"no UI file {name}", "not-found")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=HEADERS)
