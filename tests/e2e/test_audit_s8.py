"""Session 8 audit: a request asking for a protocol upgrade is served as a
plain HTTP/1.1 request (real uvicorn, the gateway's protocol, raw sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from .conftest import Live, raw_exchange, serving, serving_one

ECHO = (
    "def handler(request, ctx):\n"
    "    return {'body': request.text(), 'upgrade': request.headers.get('upgrade')}\n"
)
UPGRADE = (
    b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)


@pytest.fixture
async def gw() -> AsyncIterator[Live]:
    async with serving_one("echo", ECHO) as live:
        yield live


def _answers(out: bytes) -> list[tuple[bytes, Any]]:
    """The (status line, JSON body) of each Content-Length answer in ``out``."""
    answers = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep, out
        lines = head.split(b"\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in lines
            if line.lower().startswith(b"content-length:")
        )
        answers.append((lines[0], json.loads(rest[:length]) if length else None))
        out = rest[length:]
    return answers


def _post(body: bytes, *, chunked: bool = False, close: bool = False) -> bytes:
    head = b"POST /fn/echo HTTP/1.1\r\nHost: t\r\n" + UPGRADE
    if close:
        head += b"Connection: close\r\n"
    if chunked:
        size = b"%x" % len(body)
        return (
            head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + body + b"\r\n0\r\n\r\n"
        )
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


NEXT = b"GET /fn/echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_an_upgrade_request_keeps_its_body_and_the_request_after_it(
    gw: Live, chunked: bool
) -> None:
    """`curl --http2` on http:// sends "Upgrade: h2c": the body was dropped (the
    function saw "", a KV PUT stored 0 bytes and said 204) and a request
    pipelined behind it got no answer at all."""
    out = await raw_exchange(gw, _post(b"precious bytes", chunked=chunked) + NEXT)
    answers = _answers(out)
    assert [status for status, _ in answers] == [b"HTTP/1.1 200 OK"] * 2, out
    assert answers[0][1] == {"body": "precious bytes", "upgrade": None}, out
    assert answers[1][1] == {"body": "", "upgrade": None}, out


async def test_upgrade_requests_back_to_back_and_without_a_body(gw: Live) -> None:
    get = b"GET /fn/echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    data = _post(b"one") + get + _post(b"two", chunked=True) + _post(b"three", close=True)
    answers = _answers(await raw_exchange(gw, data))
    assert [body["body"] for _, body in answers] == ["one", "", "two", "three"], answers


async def test_a_kv_put_with_an_upgrade_header_stores_the_value(gw: Live) -> None:
    value = b"precious bytes"
    put = (
        b"PUT /api/v1/kv/precious HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
        + gw.key.encode()
        + b"\r\n"
        + UPGRADE
        + b"Content-Type: application/octet-stream\r\nConnection: close\r\n"
        + b"Content-Length: %d\r\n\r\n" % len(value)
        + value
    )
    out = await raw_exchange(gw, put)
    assert out.startswith(b"HTTP/1.1 204 "), out
    async with gw.client() as c:
        r = await c.get("/api/v1/kv/precious", headers=gw.auth)
    assert r.status_code == 200 and r.content == value, (r.status_code, r.content)


async def test_an_upgrade_head_just_within_the_cap_is_served() -> None:
    """The head is parsed again as written anew ("name: value"), which can be
    longer than the client's own ("name:value"): still within the cap."""
    async with serving(max_header_bytes=1024) as live:
        async with live.client() as c:
            await live.deploy(c, "echo", ECHO, public=True)
        head = b"POST /fn/echo HTTP/1.1\r\nHost:t\r\nConnection:Upgrade\r\nUpgrade:h2c\r\n"
        head += b"Content-Length:2\r\nConnection:close\r\n"
        head += b"x:y\r\n" * ((1020 - len(head)) // 5) + b"\r\n"
        assert 1000 < len(head) <= 1024
        answers = _answers(await raw_exchange(live, head + b"hi"))
    assert answers == [(b"HTTP/1.1 200 OK", {"body": "hi", "upgrade": None})], answers
