"""One error body for every 4xx/5xx the API returns, so a client developer can act on it::

    {"error": "validation_failed", "message": "2 fields are invalid", "fields": [{"field": "value", "message": "..."}]}
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from flywheel.events import field_path

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, error: str, message: str, *, fields: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.error, self.message = status, error, message
        self.fields, self.headers = fields or [], headers


def field_errors(e: ValidationError | RequestValidationError, prefix: tuple[Any, ...] = ()) -> list[dict[str, str]]:
    out = []
    for err in e.errors():
        loc = tuple(err.get("loc", ()))
        if loc and loc[0] == "body":
            loc = loc[1:]
        out.append({"field": field_path(prefix + loc), "message": err.get("msg", "invalid")})
    return out


def invalid(e: ValidationError | RequestValidationError, prefix: tuple[Any, ...] = ()) -> ApiError:
    fields = field_errors(e, prefix)
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return ApiError(422, "validation_failed", f"{len(fields)} invalid field(s): {summary}", fields=fields)


def body(error: str, message: str, fields: list[dict[str, str]] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"error": error, "message": message}
    if fields:
        out["fields"] = fields
    return out


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(body(exc.error, exc.message, exc.fields), status_code=exc.status, headers=exc.headers)


async def api_error_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def request_validation_handler(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    err = invalid(exc)
    return JSONResponse(body(err.error, err.message, err.fields), status_code=422)


async def http_exception_handler(_request: Request, exc: Exception) -> JSONResponse:
    """Framework errors (404, 405, ...) in the same body as ours."""
    assert isinstance(exc, HTTPException)
    from http import HTTPStatus

    error = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return JSONResponse(body(error, str(exc.detail)), status_code=exc.status_code, headers=exc.headers)


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Last resort: a bug answers a JSON 500 that names a log entry, never the traceback (which is logged)."""
    return unhandled_response(request.method, request.url.path, exc)


def unhandled_response(method: str, path: str, exc: Exception) -> JSONResponse:
    """:func:`unhandled_error_handler`'s answer to ``exc`` on ``method path``: 499 for a client that hung up
    mid-body, else a 500 naming the incident under which the traceback was logged."""
    from starlette.requests import ClientDisconnect

    if isinstance(exc, ClientDisconnect):  # the client hung up mid-body: nobody to answer, nothing went wrong
        log.info("client disconnected during %s %s", method, path)
        return JSONResponse(body("client_closed_request", "the client closed the connection"), status_code=499)
    incident = uuid.uuid4().hex[:12]
    log.error("unhandled %s on %s %s (incident %s)", type(exc).__name__, method, path, incident, exc_info=exc)
    return JSONResponse(body("internal_error", f"the server failed to handle this request; it was logged as "
                                               f"incident {incident}"), status_code=500)
