"""Inspection API: invocation records, function log lines, live tail (SSE)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .api_functions import check_name
from .errors import ApiError
from .store import LOG_LEVELS, InvocationRecord, LogLine, NotFound

if TYPE_CHECKING:
    from .app import Gateway
    from .http import Binder

RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 1000
FOLLOW_POLL_S = 15.0  # keep-alive comment interval; also the re-check interval


def parse_time(name: str, raw: str | None) -> float | None:
    """RFC 3339 (``2026-11-28T12:00:00Z``), unix seconds, or relative (``10m`` ago)."""
    if raw is None or raw == "":
        return None
    m = RELATIVE.match(raw)
    if m:
        return time.time() - float(m.group(1)) * UNITS[m.group(2)]
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, "invalid_time", f"{name} must be RFC 3339, unix seconds or relative like 10m, 2h"
        ) from None
    if dt.tzinfo is None:
        raise ApiError(400, "invalid_time", f"{name} needs a timezone (e.g. Z)")
    return dt.timestamp()


def parse_limit(raw: str | None, default: int = 100) -> int:
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, "invalid_limit", f"limit must be an integer in [1, {MAX_LIMIT}]")
    return int(raw)


def record_json(rec: InvocationRecord) -> dict[str, Any]:
    out = asdict(rec)
    out["tenant"] = out.pop("tenant_id")
    return out


def line_json(line: LogLine) -> dict[str, Any]:
    return {
        "id": line.id,
        "ts": line.ts,
        "invocation_id": line.invocation_id,
        "function": line.function,
        "level": line.level,
        "message": line.message,
        "fields": line.fields,
    }


def _bad_cursor() -> ApiError:
    return ApiError(400, "invalid_cursor", "cursor is not one this API returned")


async def list_invocations(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    q = request.query_params
    outcome = q.get("outcome")
    try:
        records, cursor = await gw.store.list_invocations(
            tenant_id=who.scope(),
            function=q.get("function"),
            outcome=outcome,
            since=parse_time("since", q.get("since")),
            until=parse_time("until", q.get("until")),
            limit=parse_limit(q.get("limit")),
            cursor=q.get("cursor"),
        )
    except ValueError:
        raise _bad_cursor() from None
    return JSONResponse({"invocations": [record_json(r) for r in records], "cursor": cursor})


async def get_invocation(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    inv_id = request.path_params["id"]
    try:
        rec = await gw.store.get_invocation(inv_id)
    except NotFound:
        rec = None
    if rec is None or (not who.admin and rec.tenant_id != who.tenant_id):
        raise ApiError(404, "invocation_not_found", f"no invocation {inv_id[:64]!r}")
    lines, _ = await gw.store.query_logs(
        tenant_id=rec.tenant_id, invocation_id=rec.id, limit=MAX_LIMIT
    )
    return JSONResponse({**record_json(rec), "logs": [line_json(x) for x in reversed(lines)]})


async def function_logs(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    name = check_name(request.path_params["name"])
    tenant = who.tenant_id
    if who.admin:
        info = await gw.store.find_function(name)
        tenant = info.tenant_id if info is not None else tenant
    try:
        await gw.store.get_function(tenant, name)
    except NotFound:
        raise ApiError(404, "function_not_found", f"no function named {name!r}") from None
    q = request.query_params
    level = q.get("level")
    if level is not None and level not in LOG_LEVELS:
        raise ApiError(400, "invalid_level", f"level is one of {', '.join(LOG_LEVELS)}")
    text = q.get("q") or None
    if q.get("follow") in ("1", "true"):
        return StreamingResponse(
            _follow(gw, request, tenant, name, level, text),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        lines, cursor = await gw.store.query_logs(
            tenant_id=tenant,
            function=name,
            invocation_id=q.get("invocation"),
            since=parse_time("since", q.get("since")),
            until=parse_time("until", q.get("until")),
            level_min=level,
            q=text,
            limit=parse_limit(q.get("limit")),
            cursor=q.get("cursor"),
        )
    except ValueError:
        raise _bad_cursor() from None
    if "application/x-ndjson" in request.headers.get("accept", ""):
        payload = "".join(json.dumps(line_json(x)) + "\n" for x in lines)
        return Response(
            payload, media_type="application/x-ndjson", headers={"X-Next-Cursor": cursor or ""}
        )
    return JSONResponse({"logs": [line_json(x) for x in lines], "cursor": cursor})


async def _follow(
    gw: Gateway, request: Request, tenant: str, name: str, level: str | None, text: str | None
) -> AsyncIterator[str]:
    """SSE: lines stored after the client connected, until it leaves."""
    after = await gw.store.last_log_id()  # ids only grow: everything newer is "after"
    seen = gw.logbus.generation
    yield ": following\n\n"
    while not gw.logbus.closed:
        if await request.is_disconnected():
            return
        lines = await gw.store.logs_after(
            tenant_id=tenant, function=name, after_id=after, limit=500, level_min=level, q=text
        )
        for line in lines:
            after = max(after, line.id)
            yield f"id: {line.id}\nevent: log\ndata: {json.dumps(line_json(line))}\n\n"
        if len(lines) == 500:
            continue
        new = await gw.logbus.wait(seen, FOLLOW_POLL_S)
        if new == seen:
            yield ": keep-alive\n\n"
        seen = new
        await asyncio.sleep(0)


def routes(bind: Binder) -> list[Route]:
    return [
        Route("/api/v1/invocations", bind(list_invocations), methods=["GET"]),
        Route("/api/v1/invocations/{id}", bind(get_invocation), methods=["GET"]),
        Route("/api/v1/functions/{name}/logs", bind(function_logs), methods=["GET"]),
    ]
