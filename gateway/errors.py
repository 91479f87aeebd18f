"""API errors: one exception type, one JSON shape, one handler.

    ApiError(status, code, message)     rendered as {"error": {code, message, invocation_id}}

Starlette's own HTTPException (404 for an unknown path, 405) goes through the
same renderer; anything else is logged once with its traceback and answered
with a generic 500 that carries no detail.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = structlog.get_logger("nsfaas.gateway")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        invocation_id: str | None = None,
        headers: dict[str, str] | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.invocation_id = invocation_id
        self.headers = dict(headers or {})
        self.detail = dict(detail or {})


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    invocation_id: str | None = None,
    headers: Mapping[str, str] | None = None,
    detail: dict[str, Any] | None = None,
) -> Response:
    hdrs = dict(headers or {})
    if invocation_id:
        hdrs["X-Invocation-Id"] = invocation_id
    return JSONResponse(
        error_document(code, message, invocation_id=invocation_id, detail=detail),
        status_code=status,
        headers=hdrs,
    )


def error_document(
    code: str,
    message: str,
    *,
    invocation_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON of every API error; also written by the HTTP edge
    (gateway/httpproto.py), which answers before there is an app to ask."""
    body: dict[str, Any] = {"code": code, "message": message, "invocation_id": invocation_id}
    if detail:
        body["detail"] = detail
    return {"error": body}


async def api_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.code,
        exc.message,
        invocation_id=exc.invocation_id,
        headers=exc.headers,
        detail=exc.detail,
    )


_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


async def http_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail), headers=exc.headers)


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", path=request.url.path)
    return error_response(500, "internal_error", "internal error")
