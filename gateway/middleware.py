"""Pure ASGI middleware (BaseHTTPMiddleware would break contextvars)."""

from __future__ import annotations

import os
import time

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("nsfaas.http")

INVOCATION = "nsfaas.invocation"  # set in the scope by the invoke routes


class RequestContextMiddleware:
    """Binds a fresh ``request_id`` to the log context of every HTTP request and
    writes the access log: one ``http_request`` line per request, except for
    invocations, whose ``invocation_finished`` line says the same and more
    (uvicorn's own access log is off: two lines per invocation cost ~10 % of
    the gateway's CPU)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        request_id = os.urandom(8).hex()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        t0 = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if not scope.get(INVOCATION):
                client = scope.get("client")
                log.info(
                    "http_request",
                    method=scope["method"],
                    path=scope["path"],
                    status=status,
                    ms=round((time.monotonic() - t0) * 1000.0, 2),
                    client=f"{client[0]}:{client[1]}" if client else None,
                )
