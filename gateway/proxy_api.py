"""What the host proxy serves: KV, logs, allow-listed egress, calling other functions.

Everything is scoped by the CallContext the jail layer attaches to the socket,
never by what the function sends.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from typing import TYPE_CHECKING, Any

import httpx

from jail.proxy import CallContext, ProxyCallError
from jail.result import not_strict_json

from . import egress
from .logbus import line_size
from .store import LOG_LEVELS, Conflict, NewLogLine, NotFound, QuotaExceeded

if TYPE_CHECKING:
    from .app import Gateway

MAX_KEY_BYTES = 512
MAX_VALUE_BYTES = 1024 * 1024
MAX_LIST = 1000
MAX_FETCH_BYTES = 1024 * 1024
MAX_REDIRECTS = 5
CREDENTIALS = ("authorization", "cookie", "proxy-authorization")
# What h11 will write: a token for a name; for a value, visible ASCII, spaces
# and tabs. httpx encodes str values as ASCII, so anything else failed only
# at send time, as egress_failed, or (str() of null) went out as "None".
HEADER_NAME = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")
BYTES_MARK = b"\x00b"  # values stored as raw bytes; anything else is JSON text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999: valid JSON text, but read back as Infinity
        raise ValueError(f"{text[:40]} is out of range")
    return value


def encode_value(value: bytes, *, is_json: bool) -> bytes:
    if is_json:
        # Decoded here, not by json.loads: on bytes it guesses UTF-16/32 and
        # skips a BOM, and such a value was served back as application/json.
        try:
            text: str | None = value.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or text.startswith("\ufeff"):
            raise ProxyCallError(
                "invalid_value",
                "a JSON value must be UTF-8 without a byte order mark "
                "(UTF-16 and UTF-32 are not accepted)",
            )
        try:
            # json.loads takes NaN and Infinity, which no other JSON parser
            # reads back; a stored value must be JSON to every client.
            parsed = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
        except (ValueError, RecursionError):
            raise ProxyCallError("invalid_value", "value is not valid JSON") from None
        # "\ud800" too: valid to Python's parser, no text to anyone else.
        if "\\u" in text and (why := not_strict_json(parsed)) is not None:
            raise ProxyCallError("invalid_value", f"value is not strict JSON: {why}")
        return value
    return BYTES_MARK + value


def is_json_type(ctype: str) -> bool:
    """``application/json`` or a ``+json`` subtype, in any case, parameters
    ignored; not ``application/jsonp`` or ``application/json-seq``."""
    kind, slash, sub = ctype.partition(";")[0].strip().lower().partition("/")
    if not kind or not slash:
        return False
    return (kind == "application" and sub == "json") or (
        len(sub) > len("+json") and sub.endswith("+json")
    )


def check_headers(headers: dict[str, Any]) -> dict[str, str]:
    clean: dict[str, str] = {}
    for name, value in headers.items():
        if not HEADER_NAME.fullmatch(name):
            raise ProxyCallError("bad_request", f"invalid header name {name[:64]!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # {"X-Count": 3}: what it always meant
        if not isinstance(value, str):
            raise ProxyCallError(
                "bad_request",
                f"header {name[:64]!r}: a value is a string, not {type(value).__name__}",
            )
        if not HEADER_VALUE.fullmatch(value):
            raise ProxyCallError(
                "bad_request",
                f"header {name[:64]!r}: a value is ASCII text without control characters",
            )
        if name.lower() not in ("host", "content-length", "transfer-encoding", "connection"):
            # h11 refuses a value with outer whitespace; HTTP ignores it.
            clean[name] = value.strip(" \t")
    return clean


def decode_value(stored: bytes) -> tuple[bytes, bool]:
    """(payload, is_json)."""
    if stored.startswith(BYTES_MARK):
        return stored[len(BYTES_MARK) :], False
    return stored, True


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ProxyCallError("invalid_key", "a key must be valid unicode") from None


def check_key(key: Any) -> str:
    if not isinstance(key, str) or not key:
        raise ProxyCallError("invalid_key", "a key is a non-empty string")
    if _utf8_size(key) > MAX_KEY_BYTES:
        raise ProxyCallError("invalid_key", f"a key is at most {MAX_KEY_BYTES} bytes")
    return key


def host_allowed(url: httpx.URL, allow: tuple[str, ...]) -> bool:
    """Exact host (optionally host:port) or a ``*.domain`` suffix; default port only."""
    if url.scheme not in ("http", "https") or not url.raw_host:
        return False
    # raw_host is the IDNA (ASCII) form the client connects to; rules are ASCII.
    host = url.raw_host.decode("ascii").lower().rstrip(".")
    port = url.port or (443 if url.scheme == "https" else 80)
    for rule in allow:
        name, _, rport = rule.partition(":")
        if rport and int(rport) != port:
            continue
        if not rport and port not in (80, 443):
            continue
        if name.startswith("*."):
            if host.endswith(name[1:]) and host != name[2:]:
                return True
        elif host == name:
            return True
    return False


def _parse_url(url: str, *, base: httpx.URL | None = None) -> httpx.URL:
    """The URL that is both checked and fetched: one parser for both, so no
    string can mean one host to the allow-list and another to the client."""
    try:
        return base.join(url) if base is not None else httpx.URL(url)
    except (httpx.InvalidURL, ValueError):
        # A URL that cannot be parsed names no allowed host.
        raise ProxyCallError("egress_denied", f"not a valid URL: {url[:200]!r}") from None


class ProxyService:
    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.client = egress.client(gw.settings.egress_private)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def handle(
        self, ctx: CallContext, method: str, params: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        store = self.gw.store
        s = self.gw.settings
        try:
            if method == "kv.get":
                stored = await store.kv_get(ctx.tenant, check_key(params.get("key")))
                if stored is None:
                    return {"found": False}, b""
                payload, is_json = decode_value(stored)
                return {"found": True, "json": is_json}, payload
            if method == "kv.put":
                key = check_key(params.get("key"))
                if len(body) > MAX_VALUE_BYTES:
                    raise ProxyCallError(
                        "kv_value_too_large", f"values are at most {MAX_VALUE_BYTES} bytes"
                    )
                is_json = params.get("json", False)
                if not isinstance(is_json, bool):  # "false" is truthy
                    raise ProxyCallError("bad_request", "json must be true or false")
                value = encode_value(body, is_json=is_json)
                await store.kv_put(
                    ctx.tenant, key, value, max_bytes=s.kv_max_bytes, max_keys=s.kv_max_keys
                )
                return {}, b""
            if method == "kv.delete":
                return {
                    "deleted": await store.kv_delete(ctx.tenant, check_key(params.get("key")))
                }, b""
            if method == "kv.list":
                prefix = params.get("prefix", "")
                limit = params.get("limit", 100)
                if not isinstance(prefix, str) or _utf8_size(prefix) > MAX_KEY_BYTES:
                    raise ProxyCallError(
                        "invalid_key", "prefix must be a string of at most 512 bytes"
                    )
                if (
                    isinstance(limit, bool)
                    or not isinstance(limit, int)
                    or not 1 <= limit <= MAX_LIST
                ):
                    raise ProxyCallError("bad_request", f"limit must be in [1, {MAX_LIST}]")
                keys = await store.kv_list(ctx.tenant, prefix, limit, None)
                return {"keys": keys}, b""
            if method == "kv.incr":
                delta = params.get("delta", 1)
                if isinstance(delta, bool) or not isinstance(delta, int) or abs(delta) > 1 << 53:
                    raise ProxyCallError("bad_request", "delta must be an integer")
                count = await store.kv_incr(
                    ctx.tenant,
                    check_key(params.get("key")),
                    delta,
                    max_bytes=s.kv_max_bytes,
                    max_keys=s.kv_max_keys,
                )
                return {"value": count}, b""
            if method == "log":
                return await self._log(ctx, params)
            if method == "http.fetch":
                return await self._fetch(ctx, params, body)
            if method == "invoke":
                return await self._invoke(ctx, params, body)
        except QuotaExceeded as exc:
            raise ProxyCallError("kv_quota_exceeded", exc.message) from None
        except Conflict as exc:
            raise ProxyCallError(exc.code, exc.message) from None
        raise ProxyCallError("unknown_method", f"unknown method {method[:64]!r}")

    async def _log(self, ctx: CallContext, params: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        level = params.get("level", "info")
        message = params.get("message", "")
        fields = params.get("fields", {})
        if (
            not isinstance(level, str)
            or level not in LOG_LEVELS
            or not isinstance(message, str)
            or not isinstance(fields, dict)
        ):
            raise ProxyCallError("bad_request", "log needs level, message and fields")
        line = NewLogLine(
            ts=time.time(),
            invocation_id=ctx.invocation_id,
            tenant_id=ctx.tenant,
            function=ctx.function,
            level=level,
            message=message[:16384],
            fields=fields,
        )
        # The same per-invocation caps as the log pipe, where a line's bytes are
        # its whole JSON (fields too): count here, refuse past them.
        lines = int(ctx.extra.get("log_lines", 0)) + 1
        size = int(ctx.extra.get("log_bytes", 0)) + line_size(line)
        if lines > self.gw.settings.max_log_lines or size > self.gw.settings.max_log_bytes:
            raise ProxyCallError("log_limit", "this invocation's log limit is reached")
        if not self.gw.log_budget.take(ctx.tenant, [line_size(line)]):
            raise ProxyCallError(
                "log_limit", "this tenant's functions are over their log budget: try later"
            )
        ctx.extra["log_lines"], ctx.extra["log_bytes"] = lines, size
        await self.gw.store.append_logs([line])
        self.gw.logbus.notify([(ctx.tenant, ctx.function)])
        return {}, b""

    async def _fetch(
        self, ctx: CallContext, params: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        method = str(params.get("method", "GET")).upper()
        url = params.get("url")
        headers = params.get("headers") or {}
        timeout = params.get("timeout", 10.0)
        if method not in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            raise ProxyCallError("bad_request", "unsupported method")
        if not isinstance(url, str) or not isinstance(headers, dict):
            raise ProxyCallError("bad_request", "url must be a string, headers an object")
        # NaN fails every comparison (a plain `<= 0` lets it through) and an
        # int past 1e308 overflows float(): cap before converting.
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 < timeout < math.inf
        ):
            raise ProxyCallError("bad_request", "timeout must be a positive number")
        remaining = max(0.1, ctx.deadline - time.monotonic()) if ctx.deadline else 10.0
        timeout = min(float(min(timeout, 30)), remaining)
        clean = check_headers(headers)
        target = _parse_url(url)

        async def fetch() -> tuple[dict[str, Any], bytes]:
            nonlocal target, method, body, clean
            for _ in range(MAX_REDIRECTS + 1):
                if not host_allowed(target, ctx.egress_allow):
                    raise ProxyCallError(
                        "egress_denied",
                        f"egress to {target.netloc.decode()[:200]!r} is not allowed",
                    )
                try:
                    req = self.client.build_request(
                        method,
                        target,
                        headers=clean,
                        content=body or None,
                        timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0)),
                    )
                    resp = await self.client.send(req, stream=True)
                except (httpx.HTTPError, ValueError) as exc:
                    if isinstance(exc.__cause__, egress.EgressBlocked):
                        raise ProxyCallError("egress_denied", str(exc.__cause__)[:500]) from None
                    raise ProxyCallError(
                        "egress_failed", f"{type(exc).__name__}: {exc}"[:500]
                    ) from None
                try:
                    if resp.is_redirect and "location" in resp.headers:
                        prev, target = target, _parse_url(resp.headers["location"], base=target)
                        if (target.scheme, target.netloc) != (prev.scheme, prev.netloc):
                            # Credentials meant for one origin are not handed to the
                            # next (as browsers and httpx's own redirects do).
                            clean = {k: v for k, v in clean.items() if k.lower() not in CREDENTIALS}
                        if resp.status_code in (301, 302, 303):
                            method, body = ("GET" if method != "HEAD" else "HEAD"), b""
                        continue
                    data = bytearray()
                    # As sent: a body decoded here would go back under the
                    # upstream's Content-Encoding and Content-Length, which no
                    # longer describe it (and a gzip bomb would inflate here).
                    async for chunk in resp.aiter_raw():
                        data += chunk
                        if len(data) > MAX_FETCH_BYTES:
                            raise ProxyCallError(
                                "egress_response_too_large",
                                f"responses are capped at {MAX_FETCH_BYTES} bytes",
                            )
                    return {
                        "status": resp.status_code,
                        "headers": {k: v for k, v in resp.headers.items()},
                    }, bytes(data)
                except httpx.HTTPError as exc:
                    raise ProxyCallError(
                        "egress_failed", f"{type(exc).__name__}: {exc}"[:500]
                    ) from None
                finally:
                    await resp.aclose()
            raise ProxyCallError("egress_failed", "too many redirects")

        # One deadline for the whole fetch, redirects and body included: httpx's
        # timeout is per read, so an upstream sending a byte at a time would
        # otherwise hold the call (and a connection) until the function's own
        # timeout.
        try:
            async with asyncio.timeout(timeout):
                return await fetch()
        except TimeoutError:
            raise ProxyCallError("egress_failed", f"no whole answer within {timeout:g} s") from None

    async def _invoke(
        self, ctx: CallContext, params: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        from .invoke import Call

        name = params.get("name")
        if not isinstance(name, str):
            raise ProxyCallError("bad_request", "name must be a string")
        if ctx.depth + 1 > self.gw.settings.invoke_depth:
            raise ProxyCallError(
                "invoke_depth", f"nested invocations are limited to {self.gw.settings.invoke_depth}"
            )
        try:
            fv = await self.gw.store.get_version(ctx.tenant, name, None)
        except NotFound:
            raise ProxyCallError("function_not_found", f"no function named {name[:64]!r}") from None
        assert self.gw.invoker is not None
        call = Call(
            method="POST",
            path="/",
            query_string="",
            headers=(("content-type", "application/json"),),
            body=body,
            path_params={},
            trigger="invoke",
            depth=ctx.depth + 1,
        )
        result, inv_id = await self.gw.invoker.invoke(fv, call)
        if result.outcome != "ok":
            raise ProxyCallError("invoke_failed", f"{name} ended with {result.outcome} ({inv_id})")
        ctype = dict((k.lower(), v) for k, v in result.headers).get("content-type", "")
        return {
            "status": result.status,
            "json": is_json_type(ctype),
            "invocation_id": inv_id,
        }, result.body
