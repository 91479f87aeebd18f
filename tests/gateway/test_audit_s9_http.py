"""Audit round 9 (HTTP): pipelining depth, egress URLs in the gateway log, HEAD
on a live tail, a chunked rollback body, and the env cap in bytes."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.api_functions import MAX_ENV_BYTES
from gateway.httpproto import MAX_PIPELINED
from tests.e2e.conftest import Live, serving

from .conftest import Api, QuietHandler, serve_http

REPO = Path(__file__).resolve().parents[2]
ECHO = "def handler(request, ctx):\n    return {'path': request.path}\n"


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    """The gateway behind uvicorn with its own protocol, on loopback."""
    async with serving() as running:
        yield running


def _pipeline(port: int, requests: bytes, timeout_s: float = 20.0) -> tuple[list[int], bool]:
    """Send ``requests`` in one write; the answers' statuses, and whether the
    server closed the connection (else the read timed out with it open)."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(timeout_s)
        sock.sendall(requests)
        received = bytearray()
        closed = False
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
            closed = True
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            pass
    # A body ends where the next status line begins: no CRLF between them.
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)], closed


async def test_pipelining_depth_is_bounded(live: Live) -> None:
    """Every request pipelined behind the one being answered was parsed and
    queued: 100,000 GETs in one write took the gateway from 133 to 297 MB."""
    flood = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * 5000
    statuses, closed = await asyncio.to_thread(_pipeline, live.port, flood)
    assert closed, f"{len(statuses)} answers and the connection still open"
    # The first one is being answered, MAX_PIPELINED wait behind it, the next
    # is refused; reads that arrive in pieces may let a few more through.
    assert MAX_PIPELINED + 1 <= len(statuses) - 1 <= 2 * MAX_PIPELINED, len(statuses)
    assert set(statuses[:-1]) == {200} and statuses[-1] == 429

    # Within the cap, all of them answered, in order, on a connection that stays open.
    mixed = b"".join(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        if i % 2
        else b"GET /nope-%d HTTP/1.1\r\nHost: x\r\n\r\n" % i
        for i in range(10)
    )
    statuses, closed = await asyncio.to_thread(_pipeline, live.port, mixed, 2.0)
    assert statuses == [404, 200] * 5 and not closed
    full = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * (MAX_PIPELINED + 1)
    statuses, closed = await asyncio.to_thread(_pipeline, live.port, full, 2.0)
    assert statuses == [200] * (MAX_PIPELINED + 1) and not closed


class _SecretUpstream(QuietHandler):
    def do_GET(self) -> None:
        self.send_body(b"ok")


def test_egress_urls_stay_out_of_the_gateway_log() -> None:
    """httpx's own INFO line carried each fetch's full URL: user:password@
    and the query string, of any length, in the operator's log."""
    with serve_http(_SecretUpstream) as port:
        url = f"http://alice:s3cret-pw@127.0.0.1:{port}/x?api_key=TOPSECRET"
        script = (
            "import logging, httpx\n"
            "from gateway.logconfig import configure_logging\n"
            "configure_logging(level='debug', json=True)\n"
            f"assert httpx.get({url!r}).text == 'ok'\n"
            "logging.getLogger('httpx').warning('still-warns')\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
        out = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    assert "still-warns" in out  # the log was there to write to
    assert "s3cret-pw" not in out and "TOPSECRET" not in out, out


async def test_head_on_a_live_tail_ends_and_holds_no_slot(live: Live) -> None:
    """A HEAD with follow=1 streamed an empty body for ever: it held one of
    the tenant's 16 tail slots and hung its keep-alive connection."""
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as admin:
        r = await admin.post(
            "/api/v1/tenants", json={"name": "tails"}, headers=live.auth
        )
        auth = {"Authorization": f"Bearer {r.json()['key']}"}
        r = await admin.put("/api/v1/functions/t", json={"source": ECHO}, headers=auth)
        assert r.status_code in (200, 201), r.text

    logbus = live.app.state.gateway.logbus
    async with httpx.AsyncClient(base_url=live.url, timeout=5) as client:
        for _ in range(20):
            head = await client.head("/api/v1/functions/t/logs?follow=1", headers=auth)
            assert head.status_code == 200
            assert head.headers["content-type"].startswith("text/event-stream")
            # The same keep-alive connection answers the next request.
            assert (await client.get("/healthz")).status_code == 200
        assert logbus.tails == 0
        async with client.stream("GET", "/api/v1/functions/t/logs?follow=1", headers=auth) as tail:
            assert tail.status_code == 200
            assert logbus.tails == 1
        # A HEAD still answers what the GET would: 404 for no such function.
        r = await client.head("/api/v1/functions/nope/logs?follow=1", headers=auth)
        assert r.status_code == 404


async def test_rollback_reads_a_chunked_body(api: Api) -> None:
    """The body was read only with a Content-Length: a chunked one was ignored."""
    await api.deploy("f", ECHO)
    await api.deploy("f", ECHO)

    async def body(data: bytes) -> AsyncIterator[bytes]:
        yield data

    async def rollback(data: bytes) -> httpx.Response:
        return await api.client.post(
            "/api/v1/functions/f/rollback",
            content=body(data),
            headers={**api.auth(), "Content-Type": "application/json"},
        )

    r = await rollback(b'{"version": 1}')
    assert r.status_code == 200 and r.json()["version"] == 1, r.text
    r = await rollback(b'{"version": 2, "x": 1}')
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_field", r.text
    r = await rollback(b"")  # an empty body is no body: the version comes from the query
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_version", r.text


async def test_the_env_cap_counts_bytes(api: Api) -> None:
    """16,000 emoji (64,000 bytes) passed a cap documented in bytes."""
    emoji, rest = divmod(MAX_ENV_BYTES - len("A"), 4)
    at_cap = "\U0001f600" * emoji + "x" * rest  # with its name, MAX_ENV_BYTES exactly
    assert len(b"A" + at_cap.encode()) == MAX_ENV_BYTES
    await api.deploy("envt", ECHO, env={"A": at_cap})
    over = at_cap + "x"
    r = await api.client.put(
        "/api/v1/functions/envt",
        json={"source": ECHO, "env": {"A": over}},
        headers=api.auth(),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_env", r.text[:300]
    # The names count in bytes as well.
    r = await api.client.put(
        "/api/v1/functions/envt",
        json={"source": ECHO, "env": {"A": at_cap, "B": ""}},
        headers=api.auth(),
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_env", r.text[:300]


BY_METHOD = """
def handler(request, ctx):
    if request.method == "GET":
        return {"items": [1, 2, 3]}, 200, {"X-Kind": "list"}
    return {"error": "no such method"}, 404
"""


async def test_a_get_route_answers_head_with_the_gets_headers(api: Api) -> None:
    """The function was asked HEAD: one that tells methods apart (the todos
    example did) answered 404 to the HEAD of its 200. A GET route's HEAD is
    the GET, without its body; an explicit HEAD route still sees HEAD."""
    await api.deploy("bymethod", BY_METHOD, public=True,
                     routes=["GET /shelf", "HEAD /probe", "GET /probe"])
    get = await api.client.get("/shelf")
    head = await api.client.head("/shelf")
    assert (get.status_code, head.status_code) == (200, 200), (get.text, head.text)
    assert head.content == b""
    assert head.headers["x-kind"] == "list"
    assert head.headers["content-length"] == get.headers["content-length"]
    probe = await api.client.head("/probe")  # declared HEAD: the function sees HEAD
    assert probe.status_code == 404


async def test_a_tenants_list_reads_are_capped_at_once(api: Api) -> None:
    """Pages of 1,000 records or log lines are tens of milliseconds of the one
    event loop each: 12 clients of one tenant reading them in a loop cut other
    tenants' calls to 0.02-0.12x of their rate. At most 4 of a tenant's reads
    run at once; past that 429 too_many_reads, and other tenants read on."""
    from gateway.api_logs import MAX_READS_PER_TENANT

    key = await api.tenant("reader")
    await api.deploy("readme", "def handler(r, c):\n    return 1\n", key=key)
    gw = api.app.state.gateway  # type: ignore[attr-defined]
    r = await api.client.get("/api/v1/invocations", headers=api.auth(key))
    assert r.status_code == 200, r.text
    tenant = (await api.client.get("/api/v1/functions", headers=api.auth(key))).json()[
        "functions"][0]["tenant"]
    gw.reading[tenant] = MAX_READS_PER_TENANT  # as if 4 reads were running
    try:
        for url in ("/api/v1/invocations", "/api/v1/functions/readme/logs"):
            r = await api.client.get(url, headers=api.auth(key))
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "too_many_reads"
            assert r.headers["retry-after"] == "1"
        r = await api.client.get("/api/v1/invocations", headers=api.auth())  # another tenant
        assert r.status_code == 200, r.text
    finally:
        gw.reading[tenant] = 0
        del gw.reading[tenant]
    r = await api.client.get("/api/v1/functions/readme/logs", headers=api.auth(key))
    assert r.status_code == 200, r.text
    assert gw.reading == {}
