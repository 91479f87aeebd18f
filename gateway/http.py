"""Request helpers shared by the routes: auth, capped bodies, JSON input."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from jail.runtime import _frames

from .errors import ApiError
from .store import Store, Tenant

DEFAULT_TENANT = "default"

if TYPE_CHECKING:
    from .app import Gateway

    Handler = Callable[[Gateway, Request], Awaitable[Response]]
    # Turns a (gateway, request) handler into a Starlette endpoint.
    Binder = Callable[[Handler], Callable[[Request], Awaitable[Response]]]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the admin (acts as tenant ``default``) or one tenant."""

    tenant_id: str
    admin: bool

    def scope(self) -> str | None:
        """Tenant filter for listings: None (everything) for the admin."""
        return None if self.admin else self.tenant_id


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def principal(
    request: Request, store: Store, admin_key: str, default_tenant: Tenant
) -> Principal | None:
    token = bearer(request)
    if token is None:
        return None
    if hmac.compare_digest(token.encode(), admin_key.encode()):
        return Principal(default_tenant.id, admin=True)
    tenant = await store.tenant_for_key(token)
    if tenant is None:
        return None
    return Principal(tenant.id, admin=False)


async def require(
    request: Request, store: Store, admin_key: str, default_tenant: Tenant
) -> Principal:
    who = await principal(request, store, admin_key, default_tenant)
    if who is None:
        code = "unauthorized"
        msg = "missing or invalid API key (Authorization: Bearer <key>)"
        raise ApiError(401, code, msg, headers={"WWW-Authenticate": "Bearer"})
    return who


class ByteBudget:
    """Bytes of request bodies held in memory at once, across all requests.

    Bodies are read before an invocation waits for a slot; without a shared
    budget, many large concurrent bodies could exhaust the gateway's memory.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used = max(0, self.used - n)


async def read_body(request: Request, cap: int, budget: ByteBudget | None = None) -> bytes:
    """Read the body while it streams in; past ``cap`` bytes answer 413.

    A lying or absent Content-Length changes nothing: the count is of bytes
    actually received, and we stop reading at the cap.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "payload_too_large", f"request body exceeds {cap} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise ApiError(413, "payload_too_large", f"request body exceeds {cap} bytes")
            if budget is not None and not budget.reserve(len(chunk)):
                size -= len(chunk)
                raise ApiError(
                    429,
                    "rejected",
                    "the gateway is buffering too many request bodies",
                    headers={"Retry-After": "1"},
                )
            chunks.append(chunk)
    except ClientDisconnect:
        if budget is not None:
            budget.release(size)
        raise ApiError(400, "client_disconnected", "the client went away mid-body") from None
    except ApiError:
        if budget is not None:
            budget.release(size)
        raise
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    try:
        return _frames.loads(body)  # json.loads, with too-deep nesting a ValueError too
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
