"""Request helpers shared by the routes: auth, capped bodies, JSON input."""

from __future__ import annotations

import asyncio
import hmac
import math
import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from starlette.datastructures import QueryParams
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive

from jail.result import not_strict_json
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


async def client_gone(receive: Receive) -> None:
    """Return once the client has disconnected. For a request whose body was
    read whole: the server's receive() then waits for the disconnect (or for
    the response to be complete, which is not before this call answers)."""
    while (await receive())["type"] != "http.disconnect":
        pass


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


def media_type(request: Request) -> str:
    """The request's media type: its Content-Type without parameters, lower-cased
    (type and subtype are case-insensitive, RFC 9110 §8.3.1), "" if none."""
    return request.headers.get("content-type", "").partition(";")[0].strip(" \t").lower()


def path_is_utf8(request: Request) -> bool:
    """Whether the raw path is UTF-8 once percent-decoded. The server decodes
    it with errors="replace": %FF and %ED%A0%80 (a surrogate) both arrive as
    U+FFFD, so only the raw path tells them from a real U+FFFD (%EF%BF%BD)."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return True
    try:
        unquote_to_bytes(raw.partition(b"?")[0]).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


BODY_TIMEOUT_S = 30.0


async def read_body(
    request: Request,
    cap: int,
    budget: ByteBudget | None = None,
    timeout_s: float = BODY_TIMEOUT_S,
) -> bytes:
    """Read the body while it streams in; past ``cap`` bytes answer 413, past
    ``timeout_s`` 408.

    A lying or absent Content-Length changes nothing: the count is of bytes
    actually received, and we stop reading at the cap. A client that stops
    sending (Content-Length: 100 and 3 bytes) would otherwise hold its share
    of the body budget, and a connection, for as long as it likes.
    """
    headers = request.headers
    declared = headers.get("content-length")
    if declared == "0" or (declared is None and "transfer-encoding" not in headers):
        return b""  # HTTP/1.1 has no other way to send a body: nothing to wait for
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise ApiError(413, "payload_too_large", f"request body exceeds {cap} bytes")
    chunks: list[bytes] = []  # every byte in them is reserved in the budget
    try:
        async with asyncio.timeout(timeout_s):
            await _receive(request, cap, budget, chunks)
    except TimeoutError:
        if budget is not None:
            budget.release(sum(map(len, chunks)))
        raise ApiError(
            408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s"
        ) from None
    except (ApiError, ClientDisconnect) as exc:
        if budget is not None:
            budget.release(sum(map(len, chunks)))
        if isinstance(exc, ClientDisconnect):
            raise ApiError(400, "client_disconnected", "the client went away mid-body") from None
        raise
    return b"".join(chunks)


async def _receive(
    request: Request, cap: int, budget: ByteBudget | None, chunks: list[bytes]
) -> None:
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise ApiError(413, "payload_too_large", f"request body exceeds {cap} bytes")
        if budget is not None and not budget.reserve(len(chunk)):
            raise ApiError(
                429,
                "rejected",
                "the gateway is buffering too many request bodies",
                headers={"Retry-After": "1"},
            )
        chunks.append(chunk)


# Query-string numbers are ASCII only: int() and float() also read other scripts' digits
# ("\u0668\u0660" is 80), "1_000", "inf" and "nan", none of which a client means.
_ASCII_INT = re.compile(r"[0-9]{1,18}")  # 18 digits: always within SQLite's int64
_ASCII_NUMBER = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_TRUE = frozenset({"1", "true", "yes", "on"})  # as in the NSFAAS_* settings
_FALSE = frozenset({"0", "false", "no", "off"})


def parse_json(body: bytes) -> Any:
    """Decode a JSON request body; 400 ``invalid_json`` for anything that is not plain JSON.

    Besides syntax errors that covers what ``json.loads`` accepts but JSON does not allow
    (``NaN``, ``Infinity``) and strings that cannot be UTF-8 (lone surrogates), anywhere in
    the document, keys included: every endpoint gets text that it can store and echo back.
    """
    text = strict_utf8(body)
    if text is None:
        raise ApiError(
            400,
            "invalid_json",
            "request body must be JSON in UTF-8 without a byte order mark "
            "(UTF-16 and UTF-32 are not accepted)",
        )
    try:
        value = _frames.loads(text)  # json.loads, with too-deep nesting a ValueError too
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"request body is not valid JSON: {exc}") from None
    problem = not_strict_json(value)
    if problem is not None:
        raise ApiError(400, "invalid_json", f"request body holds {problem}")
    return value


def strict_utf8(body: bytes) -> str | None:
    """``body`` as UTF-8 text, or None if it is not UTF-8 or starts with a BOM.

    ``json.loads`` on bytes guesses UTF-16/32 and skips a UTF-8 BOM, so such a
    body was taken, stored and echoed back in an encoding most JSON clients
    cannot read (RFC 8259: JSON between systems is UTF-8, with no BOM).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if text.startswith("\ufeff") else text


def parse_json_object(body: bytes, fields: Collection[str]) -> dict[str, Any]:
    """A JSON object body with no fields outside ``fields`` (400 ``unknown_field``)."""
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "request body must be a JSON object")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown fields: {_names(unknown)}")
    return data


def _names(names: list[str], most: int = 5) -> str:
    # Names come from the caller: bound what an error message repeats of them.
    shown = ", ".join(repr(n[:40]) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


# --- query parameters ----------------------------------------------------------------
#
# One helper per kind of value, so every endpoint answers the same code and message shape
# for the same mistake; each returns None when the parameter is absent.


def query_single(params: QueryParams, name: str, code: str) -> str | None:
    """The one value of ``name``; given twice it is ambiguous (400 ``code``)."""
    values = params.getlist(name)
    if not values:
        return None
    if len(values) > 1:
        raise ApiError(400, code, f"{name} is given {len(values)} times; give it once")
    return values[0]


def query_int(params: QueryParams, name: str, *, low: int, high: int, code: str) -> int | None:
    """An integer in [low, high], written in ASCII digits."""
    raw = query_single(params, name, code)
    if raw is None:
        return None
    if not _ASCII_INT.fullmatch(raw) or not low <= int(raw) <= high:
        raise ApiError(400, code, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


def parse_number(raw: str) -> float | None:
    """A finite decimal number in ASCII (``12``, ``-1.5``, ``1e9``), else None."""
    if not _ASCII_NUMBER.fullmatch(raw):
        return None
    value = float(raw)
    return value if math.isfinite(value) else None


def query_number(
    params: QueryParams, name: str, *, low: float, high: float, code: str
) -> float | None:
    """A finite number in (low, high]."""
    raw = query_single(params, name, code)
    if raw is None:
        return None
    value = parse_number(raw)
    if value is None or not low < value <= high:
        raise ApiError(400, code, f"{name} must be a number in ({low:g}, {high:g}]")
    return value


def query_bool(params: QueryParams, name: str, *, code: str) -> bool | None:
    """``1/true/yes/on`` or ``0/false/no/off``; anything else is 400, not false."""
    raw = query_single(params, name, code)
    if raw is None:
        return None
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ApiError(400, code, f"{name} must be true or false (or 1/0, yes/no, on/off)")


def query_choice(
    params: QueryParams, name: str, choices: Collection[str], *, code: str
) -> str | None:
    """One of ``choices``: a filter on a value that cannot occur is a typo, not a miss."""
    raw = query_single(params, name, code)
    if raw is None:
        return None
    if raw not in choices:
        raise ApiError(400, code, f"{name} is one of {', '.join(choices)}")
    return raw


def reject_unknown_query(params: QueryParams, known: Collection[str], *, hint: str = "") -> None:
    """400 ``unknown_field`` for parameters the endpoint does not read."""
    unknown = sorted(set(params.keys()) - set(known))
    if unknown:
        raise ApiError(400, "unknown_field", f"unknown query parameters: {_names(unknown)}{hint}")
