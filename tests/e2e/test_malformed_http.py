"""Requests the HTTP parser refuses get the API's JSON error, not uvicorn's
text/plain "Invalid HTTP request received.": every error has a stable code.
A real uvicorn with the gateway's protocol, raw bytes over loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import Live, raw_exchange, serving_one

ECHO = "def handler(request, ctx):\n    return {'body': len(request.body)}\n"


@pytest.fixture
async def gw() -> AsyncIterator[Live]:
    async with serving_one("echo", ECHO) as live:
        yield live


async def _records(live: Live) -> list[dict[str, Any]]:
    async with live.client() as c:
        r = await c.get("/api/v1/invocations", params={"function": "echo"}, headers=live.auth)
    assert r.status_code == 200, r.text
    return list(r.json()["invocations"])


CHUNKED = b"POST /fn/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(
            b"GET /fn/echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
            id="bad-content-length",
        ),
        pytest.param(b"GET /fn/ec\x01ho HTTP/1.1\r\nHost: t\r\n\r\n", id="control-char-in-path"),
        pytest.param(b"FOO /fn/echo HTTP/1.1\r\nHost: t\r\n\r\n", id="unknown-method"),
        pytest.param(CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", id="bad-chunk-size"),
        pytest.param(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", id="http2-preface"),
        pytest.param(b"GET /fn/echo HTTP/1.1\r\nBad Header: x\r\n\r\n", id="space-in-name"),
    ],
)
async def test_a_malformed_request_is_a_json_400(gw: Live, raw: bytes) -> None:
    before = await _records(gw)
    out = await raw_exchange(gw, raw)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), out[:300]
    lines = head.lower().split(b"\r\n")
    assert b"content-type: application/json" in lines, head
    assert b"connection: close" in lines, head
    assert b"content-length: %d" % len(body) in lines, head
    error = json.loads(body)["error"]
    assert error["code"] == "bad_request", error
    assert error["message"].startswith("malformed HTTP request: "), error
    assert error["invocation_id"] is None, error
    assert await _records(gw) == before  # nothing reached a jail


async def test_a_bad_request_after_a_good_one_on_the_same_connection(gw: Live) -> None:
    """The first answer is whole, then the 400 for the second (uvicorn wrote
    its 400 at once, where the client took it for the first request's answer)."""
    good = b"GET /fn/echo HTTP/1.1\r\nHost: t\r\n\r\n"
    out = await raw_exchange(gw, good + b"FOO / HTTP/1.1\r\nHost: t\r\n\r\n")
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), out[:300]
    answer, _, second = rest.partition(b"HTTP/1.1 ")
    assert json.loads(answer) == {"body": 0}, out
    assert second.startswith(b"400 ") and b'"code":"bad_request"' in second, out


async def test_the_gateway_serves_on_after_a_bad_chunk(gw: Live) -> None:
    """The request whose body broke gets the 400; the app's own answer to it
    (a disconnect) is dropped, and the gateway goes on serving."""
    out = await raw_exchange(gw, CHUNKED + b"5\r\nhello\r\nzz\r\n")
    assert out.startswith(b"HTTP/1.1 400 ") and out.count(b"HTTP/1.1") == 1, out
    async with gw.client() as c:
        r = await c.post("/fn/echo", content=b"abc")
    assert r.status_code == 200 and r.json() == {"body": 3}, r.text


async def test_a_head_over_the_cap_behind_a_request_is_431_after_its_answer(gw: Live) -> None:
    """It used to close the connection, and the earlier request's answer with it."""
    good = b"GET /fn/echo HTTP/1.1\r\nHost: t\r\n\r\n"
    big = b"GET /fn/echo HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    out = await raw_exchange(gw, good + big)
    first, _, rest = out.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 "), out[:300]
    answer, _, second = rest.partition(b"HTTP/1.1 ")
    assert json.loads(answer) == {"body": 0}, out[:600]
    assert second.startswith(b"431 ") and b'"code":"headers_too_large"' in second, out[:600]


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"deflate,chunked", b"gzip\r\nTransfer-Encoding: chunked"]
)
async def test_a_transfer_coding_other_than_chunked_is_501(gw: Live, coding: bytes) -> None:
    """"gzip, chunked" was de-chunked and handed to the function still gzipped."""
    before = await _records(gw)
    raw = (b"POST /fn/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: " + coding
           + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    out = await raw_exchange(gw, raw)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 "), out[:300]
    assert json.loads(body)["error"]["code"] == "not_implemented", body
    assert await _records(gw) == before
    # plain chunked still works, on a new connection
    out = await raw_exchange(gw, CHUNKED + b"5\r\nhello\r\n0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 ") and b'{"body": 5}' in out, out[:300]
