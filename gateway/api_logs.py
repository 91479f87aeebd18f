"""Inspection API: invocation records, function log lines, live tail (SSE)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import fields
from datetime import datetime
from typing import TYPE_CHECKING, Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from jail import OUTCOMES

from .api_functions import check_name
from .errors import ApiError
from .http import parse_number, query_bool, query_choice, query_int, query_single
from .logbus import TooManyTails
from .store import LOG_LEVELS, InvocationRecord, LogLine, NotFound

if TYPE_CHECKING:
    from .app import Gateway
    from .http import Binder

RELATIVE = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,12})?)([smhd])")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_LIMIT = 1000
# A record's outcome: one of the jail's, or "running" until it ends.
RECORD_OUTCOMES = ("running", *OUTCOMES)
FOLLOW_POLL_S = 15.0  # keep-alive comment interval; also the re-check interval
TAIL_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse_time(params: QueryParams, name: str) -> float | None:
    """RFC 3339 (``2026-11-28T12:00:00Z``), unix seconds, or relative (``10m`` ago)."""
    raw = query_single(params, name, "invalid_time")
    if raw is None or raw == "":
        return None
    m = RELATIVE.fullmatch(raw)
    if m:
        return time.time() - float(m.group(1)) * UNITS[m.group(2)]
    seconds = parse_number(raw)  # finite and ASCII: "nan" or "1e400" is no time
    if seconds is not None:
        return seconds
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ApiError(
            400, "invalid_time", f"{name} must be RFC 3339, unix seconds or relative like 10m, 2h"
        ) from None
    if dt.tzinfo is None:
        raise ApiError(400, "invalid_time", f"{name} needs a timezone (e.g. Z)")
    return dt.timestamp()


def parse_limit(params: QueryParams, default: int = 100) -> int:
    limit = query_int(params, "limit", low=1, high=MAX_LIMIT, code="invalid_limit")
    return default if limit is None else limit


_RECORD_FIELDS = tuple(f.name for f in fields(InvocationRecord))


def record_json(rec: InvocationRecord) -> dict[str, Any]:
    # Its fields are scalars: asdict's deep copy of each was a third of the
    # gateway's time serving a page of 1,000 records.
    out = {name: getattr(rec, name) for name in _RECORD_FIELDS}
    out["tenant"] = out.pop("tenant_id")
    return out


@contextlib.contextmanager
def _counted(
    running: dict[str, int], tenant: str, cap: int, code: str, what: str
) -> Iterator[None]:
    """One more of a tenant's ``what`` running, or 429 ``code`` past ``cap``."""
    if running.get(tenant, 0) >= cap:
        raise ApiError(
            429,
            code,
            f"at most {cap} {what} of a tenant run at once",
            headers={"Retry-After": "1"},
        )
    running[tenant] = running.get(tenant, 0) + 1
    try:
        yield
    finally:
        running[tenant] -= 1
        if not running[tenant]:
            del running[tenant]


def _reading(gw: Gateway, tenant: str) -> contextlib.AbstractContextManager[None]:
    """One of a tenant's list reads (records, log pages). A page of 1,000 is
    tens of milliseconds of the gateway's one event loop: 12 clients of one
    tenant reading them in a loop cut other tenants' calls to 0.02-0.12x."""
    return _counted(
        gw.reading, tenant, MAX_READS_PER_TENANT, "too_many_reads", "record or log reads"
    )


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


# A search's cost grows with its terms, and a prefix term ("w*") expands to
# every indexed word it begins: 1,500 "w*" terms held a store reader for 7 s
# and the gateway at 1.2 GB (and a live tail re-ran it on every write).
MAX_QUERY_TERMS = 8
MAX_PREFIX_TERMS = 2
MIN_PREFIX_CHARS = 2
MAX_TERM_CHARS = 100
# A word is a phrase of the index's tokens ("aa-bb-cc" is three): what a search
# costs is its tokens. 8 words of 33 tokens each held the store for 232 ms a
# query, and 6 at once slowed every other tenant's reads to ~0.5 s.
MAX_QUERY_TOKENS = 16
_TOKEN = re.compile(r"[^\W_]+")
# Searches with q of one tenant running at once (live tails aside): past it 429.
MAX_SEARCHES_PER_TENANT = 2
MAX_READS_PER_TENANT = 4  # record lists and log pages at once (see _reading)


def _text_query(params: QueryParams) -> str | None:
    raw = query_single(params, "q", "invalid_query")
    if not raw:
        return None
    terms = raw.split()
    prefixes = [t for t in terms if t.endswith("*")]
    problem = None
    if len(terms) > MAX_QUERY_TERMS:
        problem = f"at most {MAX_QUERY_TERMS} words"
    elif len(prefixes) > MAX_PREFIX_TERMS:
        problem = f"at most {MAX_PREFIX_TERMS} prefix words (word*)"
    elif any(len(t.rstrip("*")) < MIN_PREFIX_CHARS for t in prefixes):
        problem = f"a prefix word needs at least {MIN_PREFIX_CHARS} characters before *"
    elif any(len(t) > MAX_TERM_CHARS for t in terms):
        problem = f"words of at most {MAX_TERM_CHARS} characters"
    elif sum(len(_TOKEN.findall(t)) for t in terms) > MAX_QUERY_TOKENS:
        problem = (
            f"at most {MAX_QUERY_TOKENS} tokens in all (runs of letters and digits: "
            "'aa-bb' is two)"
        )
    if problem is not None:
        raise ApiError(400, "invalid_query", f"q: {problem}")
    return raw


async def list_invocations(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    q = request.query_params
    # Everything is checked before the query, so a store ValueError can only be the cursor.
    outcome = query_choice(q, "outcome", RECORD_OUTCOMES, code="invalid_outcome")
    since, until = parse_time(q, "since"), parse_time(q, "until")
    limit = parse_limit(q)
    cursor = query_single(q, "cursor", "invalid_cursor")
    try:
        with _reading(gw, who.tenant_id):
            records, cursor = await gw.store.list_invocations(
                tenant_id=who.scope(),
                function=q.get("function"),
                outcome=outcome,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            )
            body = {"invocations": [record_json(r) for r in records], "cursor": cursor}
    except ValueError:
        raise _bad_cursor() from None
    return JSONResponse(body)


async def get_invocation(gw: Gateway, request: Request) -> Response:
    who = await gw.auth(request)
    inv_id = request.path_params["id"]
    try:
        rec = await gw.store.get_invocation(inv_id)
    except NotFound:
        rec = None
    if rec is None or (not who.admin and rec.tenant_id != who.tenant_id):
        raise ApiError(404, "invocation_not_found", f"no invocation {inv_id[:64]!r}")
    # The last lines, shown oldest first: the end of a log is what explains its outcome (a
    # traceback, the "[nsfaas] log output truncated" line). A longer log's earlier lines
    # page on from /functions/{name}/logs?invocation=ID.
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
    level = query_choice(q, "level", tuple(LOG_LEVELS), code="invalid_level")
    text = _text_query(q)
    if query_bool(q, "follow", code="invalid_follow"):
        ignored = [k for k in ("since", "until", "limit", "cursor", "invocation") if k in q]
        if ignored:
            raise ApiError(
                400,
                "invalid_parameter",
                f"follow streams the lines stored from now on; {', '.join(ignored)} "
                "cannot apply to it (page with them without follow)",
            )
        # The slot is counted while this object lives (logbus): the response
        # drops it when it ends. Tied to the body iterator instead, it lived
        # on in the reference cycles of a cancelled stream's traceback until
        # the cycle collector ran, seconds later or more.
        slot: list[_Slot] = [_Slot()]
        try:
            gw.logbus.follow((tenant, name), slot[0])
        except TooManyTails as exc:
            raise ApiError(
                429, "too_many_tails", f"{exc}: close one first", headers={"Retry-After": "5"}
            ) from None
        if request.method == "HEAD":
            # uvicorn sends no body for a HEAD but keeps the response open
            # until the stream ends, which a tail never does: each HEAD held a
            # slot (16 locked the tenant out) and hung its connection. The
            # slot was taken only to answer 429 as the GET would; it goes now.
            slot.clear()
            return StreamingResponse(
                _nothing(), media_type="text/event-stream", headers=TAIL_HEADERS
            )
        return _TailResponse(
            _follow(gw, request, tenant, name, level, text),
            slot,
            media_type="text/event-stream",
            headers=TAIL_HEADERS,
        )
    since, until = parse_time(q, "since"), parse_time(q, "until")
    limit = parse_limit(q)
    cursor = query_single(q, "cursor", "invalid_cursor")
    # Searches with q cost more than pages: two of a tenant's at once.
    searching = (
        _counted(gw.searching, tenant, MAX_SEARCHES_PER_TENANT, "too_many_searches",
                 "text searches")
        if text is not None
        else contextlib.nullcontext()
    )
    with searching, _reading(gw, who.tenant_id):
        try:
            lines, cursor = await gw.store.query_logs(
                tenant_id=tenant,
                function=name,
                invocation_id=q.get("invocation"),
                since=since,
                until=until,
                level_min=level,
                q=text,
                limit=limit,
                cursor=cursor,
            )
        except ValueError:
            raise _bad_cursor() from None
        # Encoding the page is most of a read's cost: inside the count too.
        if "application/x-ndjson" in request.headers.get("accept", ""):
            payload = "".join(json.dumps(line_json(x)) + "\n" for x in lines)
            return Response(
                payload, media_type="application/x-ndjson", headers={"X-Next-Cursor": cursor or ""}
            )
        return JSONResponse({"logs": [line_json(x) for x in lines], "cursor": cursor})


class _Slot:
    """Stands for a live tail in the logbus's count while it lives."""

    __slots__ = ("__weakref__",)


class _ClientGone(Exception):
    """A tail's write failed because its connection is gone."""


class _TailResponse(StreamingResponse):
    """A tail ends when its client goes; a write that finds the connection
    closed is that, not an error. The transport can be closed before the
    server reports the disconnect (uvloop raises RuntimeError on a write
    then), and a tail writes whenever a line comes, long after its request:
    the response most likely to be caught in that gap."""

    def __init__(self, content: AsyncIterator[str], slot: list[_Slot], **kw: Any) -> None:
        super().__init__(content, **kw)
        self._slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_gone(message: Message) -> None:
            try:
                await send(message)
            except (OSError, RuntimeError) as exc:
                if message["type"] != "http.response.body":
                    raise  # not a tail's write: a real failure
                raise _ClientGone from exc

        try:
            await super().__call__(scope, receive, send_or_gone)
        except _ClientGone:
            pass
        finally:
            self._slot.clear()


async def _nothing() -> AsyncIterator[str]:
    return
    yield  # an async generator, of no chunks


async def _follow(
    gw: Gateway, request: Request, tenant: str, name: str, level: str | None, text: str | None
) -> AsyncIterator[str]:
    """SSE: lines stored after the client connected, until it leaves."""
    scope = (tenant, name)
    after = await gw.store.last_log_id()  # ids only grow: everything newer is "after"
    seen = gw.logbus.generation(scope)
    yield ": following\n\n"
    while not gw.logbus.closed:
        if await request.is_disconnected():
            return
        lines = await gw.store.logs_after(
            tenant_id=tenant, function=name, after_id=after, limit=500, level_min=level, q=text
        )
        if lines:  # one chunk: a message (and a socket write) per line cost more than the line
            after = max(after, *(line.id for line in lines))
            yield "".join(
                f"id: {line.id}\nevent: log\ndata: {json.dumps(line_json(line))}\n\n"
                for line in lines
            )
        if len(lines) == 500:
            continue
        new = await gw.logbus.wait(scope, seen, FOLLOW_POLL_S)
        if new == seen:
            try:  # a quiet moment: is there still a function to follow?
                await gw.store.get_function(tenant, name)
            except NotFound:
                yield 'event: end\ndata: {"reason": "function_deleted"}\n\n'
                return
            yield ": keep-alive\n\n"
        seen = new
        await asyncio.sleep(0)


def routes(bind: Binder) -> list[Route]:
    return [
        Route("/api/v1/invocations", bind(list_invocations), methods=["GET"]),
        Route("/api/v1/invocations/{id}", bind(get_invocation), methods=["GET"]),
        Route("/api/v1/functions/{name}/logs", bind(function_logs), methods=["GET"]),
    ]
