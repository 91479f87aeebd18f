"""Audit C, the HTTP edge: odd methods and targets always get a JSON answer,
and a live tail whose connection goes while requests are pipelined behind it
ends quietly and frees its slot. A real uvicorn with the gateway's protocol,
raw bytes over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable

import httpx
import pytest
import structlog

from .conftest import (
    GatewayProcess,
    Live,
    e2e_settings,
    raw_exchange,
    serving_one,
    short_tmp,
)

CHATTY = "def handler(request, ctx):\n    print('line', request.query.get('n'))\n    return 'ok'\n"


@pytest.fixture
async def gw() -> AsyncIterator[Live]:
    async with serving_one("chatty", CHATTY) as live:
        yield live


def _answers(out: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """(status, headers, body) of each response in ``out``; bodies by Content-Length."""
    found = []
    while out:
        head, sep, rest = out.partition(b"\r\n\r\n")
        assert sep, out
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
        length = int(headers["content-length"])
        found.append((int(status_line.split()[1]), headers, rest[:length]))
        out = rest[length:]
    return found


@pytest.mark.parametrize(
    "target",
    [b"example.com:443", b"/fn/chatty", b"127.0.0.1:8080"],
    ids=["authority-form", "origin-form", "ip-authority"],
)
async def test_connect_is_a_json_405_and_the_connection_closes(gw: Live, target: bytes) -> None:
    """It was closed with no byte sent: uvicorn raised parsing the authority
    form inside a parser callback, and that path wrote nothing."""
    raw = b"CONNECT " + target + b" HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    out = await raw_exchange(gw, raw)  # returns when the server closes, not at the timeout
    [(status, headers, body)] = _answers(out)
    assert status == 405, out
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert "GET" in headers["allow"] and "CONNECT" not in headers["allow"], headers
    error = json.loads(body)["error"]
    assert error["code"] == "method_not_allowed", error
    assert "CONNECT" in error["message"], error


async def test_connect_behind_a_request_is_answered_after_it(gw: Live) -> None:
    good = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"
    out = await raw_exchange(gw, good + b"CONNECT example.com:443 HTTP/1.1\r\nHost: t\r\n\r\n")
    [(s1, _, b1), (s2, _, b2)] = _answers(out)
    assert s1 == 200 and json.loads(b1)["status"] == "ok", out
    assert s2 == 405 and json.loads(b2)["error"]["code"] == "method_not_allowed", out


@pytest.mark.parametrize(
    ("raw", "status", "code"),
    [
        # absolute form without a path: uvicorn took the target apart in a
        # callback and failed, and the connection closed unanswered
        (b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"POST http://x?a=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 400, "bad_request"),
        (b"GET http://x/healthz HTTP/1.1\r\nHost: x\r\n\r\n", 200, None),
        (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
        (b"TRACE / HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
        (b"TRACE /fn/chatty HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method_not_allowed"),
        (b"GET example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
        (b"GET *x HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not_found"),
    ],
    ids=[
        "absolute-no-path",
        "absolute-query-only",
        "absolute-with-path",
        "options-asterisk",
        "trace",
        "trace-function",
        "authority-form-get",
        "asterisk-get",
    ],
)
async def test_odd_methods_and_targets_get_a_json_answer(
    gw: Live, raw: bytes, status: int, code: str | None
) -> None:
    out = await raw_exchange(
        gw, raw + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    answers = _answers(out)
    assert answers, "no answer at all"
    got, headers, body = answers[0]
    assert got == status, out
    assert headers["content-type"] == "application/json", headers
    if code is not None:
        assert json.loads(body)["error"]["code"] == code, body
    if status == 400:
        # a refused head ends the connection: nothing after it is read as a request
        assert len(answers) == 1 and headers["connection"] == "close", out
    else:
        assert len(answers) == 2 and answers[1][0] == 200, out


# -- live tails and a connection that goes away with requests pipelined ---------------


def _tail_request(key: str) -> bytes:
    return (
        f"GET /api/v1/functions/chatty/logs?follow=1 HTTP/1.1\r\n"
        f"Host: t\r\nAuthorization: Bearer {key}\r\n\r\n"
    ).encode()


async def _pipelined_tails_then_close(live: Live) -> None:
    """Three tails pipelined on one connection; once the first streams, the
    client goes and the function logs (which wakes the first tail to write)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(_tail_request(live.key) * 3)
    await writer.drain()
    got = b""
    async with asyncio.timeout(10):
        while b": following" not in got:
            chunk = await reader.read(1 << 16)
            assert chunk, got
            got += chunk
    assert got.startswith(b"HTTP/1.1 200 "), got
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    async with live.client() as c:
        for n in range(3):
            r = await c.get(f"/fn/chatty?n={n}")
            assert r.status_code == 200, r.text
            await asyncio.sleep(0.2)


async def _tail_and_call_still_work(live: Live) -> None:
    """A new tail is let in and streams the next call's line. 429 means the
    tenant's tails are all taken (one in the subprocess test): tried again
    for a while, as the server frees a slot once it has seen the close."""
    async with live.client() as c:
        got: list[str] = []
        following = asyncio.Event()

        async def follow() -> None:
            async with asyncio.timeout(10):
                while True:
                    async with c.stream(
                        "GET", "/api/v1/functions/chatty/logs?follow=1", headers=live.auth
                    ) as resp:
                        if resp.status_code == 429:
                            await asyncio.sleep(0.1)
                            continue
                        assert resp.status_code == 200, await resp.aread()
                        async for line in resp.aiter_lines():
                            if line.startswith(": following"):
                                following.set()
                            if line.startswith("data: "):
                                got.append(json.loads(line[6:])["message"])
                                return

        task = asyncio.create_task(follow())
        await asyncio.wait_for(asyncio.shield(following.wait()), 10)
        r = await c.get("/fn/chatty?n=after")
        assert r.status_code == 200, r.text
        await asyncio.wait_for(task, 10)
        assert got == ["line after"]


async def test_a_tail_whose_connection_goes_while_pipelined_frees_its_slot(gw: Live) -> None:
    """uvicorn told only the newest (queued) request of the connection that it
    was gone: the tail being served never heard, wrote its lines into the
    closed transport (asyncio's loop drops them) and held its slot until the
    server stopped."""
    logbus = gw.app.state.gateway.logbus
    with structlog.testing.capture_logs() as events:
        await _pipelined_tails_then_close(gw)
        async with asyncio.timeout(10):
            while logbus.tails:
                await asyncio.sleep(0.05)
        await _tail_and_call_still_work(gw)
        async with asyncio.timeout(10):
            while logbus.tails:
                await asyncio.sleep(0.05)
    errors = [e for e in events if e.get("log_level") in ("error", "critical")]
    assert errors == [], errors


async def test_a_tail_whose_connection_goes_logs_no_error_on_uvloop(
    gateway_procs: Callable[..., GatewayProcess],
) -> None:
    """`nsfaas serve` runs on uvloop, where that write raised instead
    (``unhandled_error RuntimeError ... the handler is closed``). A real
    `nsfaas serve`, its log read back; one tail per tenant, so a tail that is
    let in afterwards shows the first one's slot was freed."""
    data_dir = short_tmp()
    proc = gateway_procs(data_dir, NSFAAS_MAX_LOG_TAILS_PER_TENANT="1")
    await proc.start()
    live = Live(proc.url, proc.key, e2e_settings(data_dir))
    async with live.client() as c:
        await live.deploy(c, "chatty", CHATTY, public=True)

    def errors() -> list[dict[str, object]]:
        text = proc.log_path.read_text()
        lines = [json.loads(x) for x in text.splitlines() if x.startswith("{")]
        assert any(x.get("event") == "http_request" for x in lines), text[-2000:]
        return [x for x in lines if x.get("level") in ("error", "critical")]

    await _pipelined_tails_then_close(live)
    await asyncio.sleep(0.5)  # the first tail has written the calls' lines by now
    assert errors() == []
    await _tail_and_call_still_work(live)
    await proc.stop()
    assert errors() == []


async def test_tails_on_separate_connections_still_count_and_free(gw: Live) -> None:
    """The usual case is unchanged: a tail's slot is held while it streams and
    freed once its client goes."""
    logbus = gw.app.state.gateway.logbus
    conns = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(_tail_request(gw.key))
        await writer.drain()
        async with asyncio.timeout(10):
            got = b""
            while b": following" not in got:
                chunk = await reader.read(1 << 16)
                assert chunk, got
                got += chunk
        conns.append(writer)
    assert logbus.tails == 3
    for writer in conns:
        writer.close()
    async with asyncio.timeout(10):
        while logbus.tails:
            await asyncio.sleep(0.05)
    async with httpx.AsyncClient(base_url=gw.url) as c:
        assert (await c.get("/fn/chatty?n=x")).status_code == 200
