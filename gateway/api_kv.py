"""KV admin API: a tenant's keys (the admin names the tenant with ?tenant=ID)."""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from jail.proxy import ProxyCallError

from .errors import ApiError
from .http import media_type, path_is_utf8, query_int, query_single, read_body
from .proxy_api import MAX_VALUE_BYTES, check_key, decode_value, encode_value
from .store import NotFound, QuotaExceeded

if TYPE_CHECKING:
    from .app import Gateway
    from .http import Binder


async def _tenant(gw: Gateway, request: Request) -> str:
    who = await gw.auth(request)
    wanted = query_single(request.query_params, "tenant", "invalid_parameter")
    if wanted is None or wanted == who.tenant_id:
        return who.tenant_id
    if not who.admin:
        raise ApiError(403, "forbidden", "only the admin key can name another tenant")
    try:
        await gw.store.get_tenant(wanted)
    except NotFound:
        raise ApiError(404, "tenant_not_found", "no such tenant") from None
    return wanted


def _key(request: Request) -> str:
    key: str = request.path_params["key"]
    if "\ufffd" in key and not path_is_utf8(request):  # two keys would be one
        raise ApiError(400, "invalid_key", "a key must be UTF-8 once percent-decoded")
    try:
        return check_key(key)
    except ProxyCallError as exc:
        raise ApiError(400, exc.code, exc.message) from None


async def list_keys(gw: Gateway, request: Request) -> Response:
    tenant = await _tenant(gw, request)
    q = request.query_params
    limit = query_int(q, "limit", low=1, high=1000, code="invalid_limit")
    prefix = query_single(q, "prefix", "invalid_key") or ""
    after = query_single(q, "after", "invalid_key")
    if "\ufffd" in prefix + (after or ""):
        # Starlette decodes the query with errors="replace": %FF would list as
        # if it were U+FFFD. Only the raw query tells them apart (see _key).
        try:
            parse_qsl(request.scope["query_string"].decode("latin-1"), errors="strict")
        except UnicodeDecodeError:
            raise ApiError(
                400, "invalid_key", "prefix and after must be UTF-8 once percent-decoded"
            ) from None
    keys = await gw.store.kv_list(tenant, prefix, limit or 100, after)
    used, count = await gw.store.kv_usage(tenant)
    return JSONResponse({"keys": keys, "usage": {"bytes": used, "keys": count}})


async def get_key(gw: Gateway, request: Request) -> Response:
    tenant = await _tenant(gw, request)
    key = _key(request)
    stored = await gw.store.kv_get(tenant, key)
    if stored is None:
        raise ApiError(404, "key_not_found", "no such key")
    payload, is_json = decode_value(stored)
    return Response(
        payload, media_type="application/json" if is_json else "application/octet-stream"
    )


async def put_key(gw: Gateway, request: Request) -> Response:
    tenant = await _tenant(gw, request)
    key = _key(request)
    body = await read_body(request, MAX_VALUE_BYTES, gw.bodies, gw.settings.body_timeout_s)
    # application/json exactly, in any case, parameters allowed ("; charset=utf-8"):
    # not "Application/JSON" stored as bytes, nor "application/jsonp" as JSON.
    is_json = media_type(request) == "application/json"
    try:
        value = encode_value(body, is_json=is_json)
        s = gw.settings
        await gw.store.kv_put(tenant, key, value, max_bytes=s.kv_max_bytes, max_keys=s.kv_max_keys)
    except ProxyCallError as exc:
        raise ApiError(400, exc.code, exc.message) from None
    except QuotaExceeded as exc:
        raise ApiError(413, "kv_quota_exceeded", exc.message) from None
    finally:
        gw.bodies.release(len(body))
    return Response(status_code=204)


async def delete_key(gw: Gateway, request: Request) -> Response:
    tenant = await _tenant(gw, request)
    if not await gw.store.kv_delete(tenant, _key(request)):
        raise ApiError(404, "key_not_found", "no such key")
    return Response(status_code=204)


def routes(bind: Binder) -> list[Route]:
    return [
        Route("/api/v1/kv", bind(list_keys), methods=["GET"]),
        Route("/api/v1/kv/{key:path}", bind(get_key), methods=["GET"]),
        Route("/api/v1/kv/{key:path}", bind(put_key), methods=["PUT"]),
        Route("/api/v1/kv/{key:path}", bind(delete_key), methods=["DELETE"]),
    ]
