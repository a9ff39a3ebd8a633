"""RFC 9457 problem details: the body of every error response."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import redis.exceptions
from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.spec import UnreadableJob
from jobs.store import UnreadableRecord

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:prune:problem:"
STORE_RETRY_AFTER_S = 5
"""`Retry-After` of a 503 while Redis (job records, events, broker) is unreachable: a restart takes
seconds."""
STORE_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
"""Redis errors that mean "unreachable right now" (refused, reset, timed out, still loading its AOF)."""
log = logging.getLogger("api")


class FieldError(BaseModel):
    """One validation error: where, what and the validator's error type."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem details object."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(default="about:blank", description="URI identifying the problem type.")
    title: str = Field(description="Short summary of the problem type.")
    status: int = Field(description="HTTP status code.")
    detail: str | None = Field(default=None, description="Explanation of this occurrence.")
    instance: str | None = Field(default=None, description="The request path this occurrence relates to.")
    errors: list[FieldError] | None = Field(default=None, description="Validation errors (422 only).")


class ProblemError(Exception):
    """Raise from a route to answer with a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        slug: str | None = None,
        title: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status, self.detail, self.slug, self.title, self.extra = status, detail, slug, title, extra
        self.headers = headers


def problem_response(
    request: Request | None,
    status: int,
    detail: str | None = None,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """A problem+json response."""
    body: dict[str, Any] = {
        "type": TYPE_BASE + slug if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": request.url.path if request is not None else None,
        **extra,
    }
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM_JSON, headers=headers)


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting problem responses for `codes`."""
    return {
        code: {"model": Problem, "description": HTTPStatus(code).phrase, "content": {PROBLEM_JSON: {}}}
        for code in codes
    }


async def _problem_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(
        request, exc.status, exc.detail, exc.slug, exc.title, headers=exc.headers, **exc.extra
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else None
    return problem_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    n = len(errors)
    return problem_response(
        request,
        422,
        f"{n} validation error{'s' if n != 1 else ''} in the request",
        "validation-error",
        "Request validation failed",
        errors=errors,
    )


async def _store_down(request: Request, exc: Exception) -> JSONResponse:
    """Redis unreachable: 503 + Retry-After, one warning line (no traceback: nothing is broken here)."""
    log.warning("store unavailable: %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return problem_response(
        request,
        503,
        "the job store is unavailable; retry later",
        "store-unavailable",
        "Service unavailable",
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


def unreadable_problem(info: UnreadableJob) -> ProblemError:
    """409 for a job whose stored record cannot be read: what is known of it and what to do."""
    return ProblemError(
        409,
        f"{info.error.message}; cancel it (POST /v1/jobs/{info.id}/cancel) or let a worker fail it",
        "job-unreadable",
        "Job record unreadable",
        job_id=info.id,
        job_status=info.status.value if info.status else None,
    )


async def _unreadable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, UnreadableRecord)
    return await _problem_error(request, unreadable_problem(exc.info))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return problem_response(request, 500, "internal server error; see the server log", "internal-error")


class UnexpectedErrors:
    """Answer an exception no handler took with a 500 problem, log it once with its traceback, and
    end the request there. (Starlette's own catch-all answers too but re-raises to the server, which
    then drops the keep-alive connection under the client: its next request on it is reset.) An
    exception after the response started (a stream) is re-raised: nothing else can be sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def _send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, _send)
        except Exception as exc:
            if started:
                raise
            log.error("unhandled error: %s %s", scope["method"], scope["path"], exc_info=exc)
            await (await _unexpected(Request(scope), exc))(scope, receive, send)


HANDLERS = {
    ProblemError: _problem_error,
    StarletteHTTPException: _http_error,
    RequestValidationError: _validation_error,
    **dict.fromkeys(STORE_DOWN, _store_down),
    UnreadableRecord: _unreadable,
    Exception: _unexpected,
}
