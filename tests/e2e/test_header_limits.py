"""Request heads over NSFAAS_MAX_HEADER_BYTES: 431 at the edge, before the app.

A head past the runtime's 1 MiB frame-header cap used to kill the function's
jail and count against the function (three anonymous requests put it in the
penalty box); 50 MB of headers sat in the gateway's memory. These run a real
uvicorn with the gateway's protocol (as ``nsfaas serve`` does) and talk raw
HTTP/1.1 over loopback where httpx would not send what is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.httpproto import (
    MAX_MAX_HEADER_BYTES,
    MIN_MAX_HEADER_BYTES,
    header_limited_protocol,
)

from .conftest import (
    REPO,
    GatewayProcess,
    Live,
    auth,
    raw_exchange,
    serving,
    serving_one,
    short_tmp,
)

ECHO = (
    "def handler(request, ctx):\n"
    "    return {'headers': len(request.headers), 'query': len(request.query_string)}\n"
)
CAP = 64 * 1024


@pytest.fixture
async def gw() -> AsyncIterator[Live]:
    async with serving_one("echo", ECHO) as live:
        yield live


def _head(target: str = "/fn/echo", extra: bytes = b"", *, close: bool = True) -> bytes:
    conn = b"Connection: close\r\n" if close else b""
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: t\r\n" + conn + extra + b"\r\n"


def _assert_431(raw: bytes, limit: int = CAP) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 "), raw[:300]
    lines = head.lower().split(b"\r\n")
    assert b"connection: close" in lines, head
    assert b"content-type: application/json" in lines, head
    assert json.loads(body) == {
        "error": {
            "code": "headers_too_large",
            "message": f"request line and headers exceed {limit} bytes",
            "invocation_id": None,
        }
    }


async def _records(live: Live) -> list[dict[str, Any]]:
    async with live.client() as c:
        r = await c.get("/api/v1/invocations", params={"function": "echo"}, headers=live.auth)
    assert r.status_code == 200, r.text
    return list(r.json()["invocations"])


def _padded(total: int, value: bytes = b"p") -> bytes:
    """A request head of exactly ``total`` bytes."""
    bare = _head(extra=b"X-Pad: \r\n")
    return _head(extra=b"X-Pad: " + value * (total - len(bare)) + b"\r\n")


@pytest.mark.parametrize(
    "request_bytes",
    [
        pytest.param(_head(extra=b"X-Big: " + b"a" * 1_100_000 + b"\r\n"), id="one-huge-header"),
        pytest.param(
            _head(extra=b"".join(b"X-M%d: %s\r\n" % (i, b"m" * 4000) for i in range(50))),
            id="many-medium-headers",
        ),
        pytest.param(_head("/fn/echo?q=" + "u" * 100_000), id="huge-query-string"),
        pytest.param(_head("/fn/" + "e" * 100_000), id="huge-path"),
        pytest.param(_padded(CAP + 1), id="one-byte-over"),
    ],
)
async def test_head_over_the_cap_is_431_without_an_invocation(
    gw: Live, request_bytes: bytes
) -> None:
    before = await _records(gw)
    _assert_431(await raw_exchange(gw, request_bytes))
    assert await _records(gw) == before


async def test_head_of_exactly_the_cap_is_served(gw: Live) -> None:
    raw = await raw_exchange(gw, _padded(CAP))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]


async def test_head_just_under_the_cap_of_escaped_bytes_reaches_the_function(gw: Live) -> None:
    """Bytes 0x80-0xFF are six bytes each in the JSON frame sent to the jail:
    the default cap must keep even that under the runtime's frame-header cap."""
    raw = await raw_exchange(gw, _padded(CAP - 16, b"\xff"))
    assert raw.startswith(b"HTTP/1.1 200 "), raw[:300]
    (rec, *_) = await _records(gw)
    assert rec["outcome"] == "ok", rec


async def test_refused_at_the_cap_not_at_the_end_of_the_header(gw: Live) -> None:
    """Past the cap the answer comes at once: nothing waits for (or holds) the rest."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(_head(extra=b"")[:-2] + b"X-Big: " + b"a" * (CAP + 1024))
        await writer.drain()
        async with asyncio.timeout(10):
            raw = await reader.read(1 << 16)
            while not raw.endswith(b"}"):
                more = await reader.read(1 << 16)
                assert more, raw
                raw += more
        _assert_431(raw)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_trailers_over_the_cap_end_the_connection_without_an_invocation(
    gw: Live,
) -> None:
    """uvicorn adds a chunked body's trailers to the request's headers (they
    would reach the function): they count against the same cap. The request
    is already in the app by then, so there is no 431, only the end of it."""
    before = await _records(gw)
    head = b"POST /fn/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"3\r\nabc\r\n0\r\nX-Trailer: " + b"t" * (CAP + 10) + b"\r\n\r\n"
    raw = await raw_exchange(gw, head + body)
    assert b"HTTP/1.1 200" not in raw, raw[:300]
    assert await _records(gw) == before
    async with gw.client() as c:
        assert (await c.get("/fn/echo")).status_code == 200


async def test_keep_alive_connection_is_not_reused_after_431(gw: Live) -> None:
    """A request pipelined behind the refused head is never answered, and the
    connection ends; a new connection is served."""
    refused = _head(extra=b"X-Big: " + b"a" * (CAP + 10) + b"\r\n", close=False)
    follower = _head("/healthz", close=False)
    raw = await raw_exchange(gw, refused + follower)
    _assert_431(raw)
    assert raw.count(b"HTTP/1.1 ") == 1, raw[:600]
    async with gw.client() as c:
        r = await c.get("/fn/echo")
        assert r.status_code == 200, r.text


async def test_refused_heads_do_not_throttle_the_function(gw: Live) -> None:
    async with gw.client() as c:
        r = await c.get("/fn/echo")  # a warm worker for what follows
        assert r.status_code == 200, r.text
    strikes = gw.settings.penalty_strikes
    for _ in range(strikes + 2):
        _assert_431(await raw_exchange(gw, _head(extra=b"X-Big: " + b"a" * 1_100_000 + b"\r\n")))
    async with gw.client() as c:
        r = await c.get("/fn/echo")
        assert r.status_code == 200, r.text
        rec = (
            await c.get(f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=gw.auth)
        ).json()
    assert (rec["outcome"], rec["start"]) == ("ok", "warm"), rec
    assert not any(line["fields"].get("throttled") for line in rec["logs"]), rec
    assert len(await _records(gw)) == 2


async def test_cap_follows_the_setting() -> None:
    async with serving(max_header_bytes=4096) as live:
        async with live.client() as c:
            await live.deploy(c, "echo", ECHO, public=True)
            r = await c.get("/fn/echo", headers={"X-Pad": "p" * 3000})
            assert r.status_code == 200, r.text
        _assert_431(await raw_exchange(live, _padded(4097)), 4096)


@pytest.mark.parametrize("bad", [0, MIN_MAX_HEADER_BYTES - 1, MAX_MAX_HEADER_BYTES + 1])
def test_out_of_range_cap_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=f"NSFAAS_MAX_HEADER_BYTES={bad}"):
        header_limited_protocol(bad)


async def test_nsfaas_serve_caps_heads(gateway_procs: Callable[..., GatewayProcess]) -> None:
    """The real command, configured through the environment."""
    proc = gateway_procs(short_tmp(), NSFAAS_MAX_HEADER_BYTES="8192")
    await proc.start()
    async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
        r = await c.put(
            "/api/v1/functions/echo", json={"source": ECHO, "public": True}, headers=auth()
        )
        assert r.status_code == 201, r.text
        r = await c.get("/fn/echo", headers={"X-Pad": "p" * 7000})
        assert r.status_code == 200, r.text
        r = await c.get("/fn/echo", headers={"X-Pad": "p" * 9000})
        assert r.status_code == 431, r.text
        assert r.json()["error"]["code"] == "headers_too_large"
        r = await c.get("/api/v1/invocations", params={"function": "echo"}, headers=auth())
        assert len(r.json()["invocations"]) == 1, r.text


async def test_nsfaas_serve_rejects_a_bad_cap(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
    env.update(NSFAAS_MAX_HEADER_BYTES="10", NSFAAS_DATA_DIR=str(tmp_path))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "serve",
        cwd=str(REPO),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 2, err
    assert b"NSFAAS_MAX_HEADER_BYTES=10: must be between" in err, err


async def test_a_head_that_does_not_arrive_in_time_loses_its_connection() -> None:
    """A connection that sends nothing, or its head a byte at a time, used to be
    held for ever (a file descriptor each); a request in progress is not."""
    async with serving(head_timeout_s=0.5) as live:
        port = live.port
        idle = await asyncio.open_connection("127.0.0.1", port)
        crawl = await asyncio.open_connection("127.0.0.1", port)
        crawl[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end
        await crawl[1].drain()
        for reader, writer in (idle, crawl):
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
            writer.close()
        # A function slower than the head timeout still answers on its connection.
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as c:
            src = "import time\ndef handler(r, c):\n    time.sleep(1.5)\n    return 'late'\n"
            r = await c.put(
                "/api/v1/functions/slowpoke",
                json={"source": src, "public": True},
                headers={"Authorization": f"Bearer {live.key}"},
            )
            assert r.status_code == 201, r.text
            r = await c.get("/fn/slowpoke")
            assert (r.status_code, r.text) == (200, "late")
            r = await c.get("/fn/slowpoke")  # the same keep-alive connection, again
            assert (r.status_code, r.text) == (200, "late")
