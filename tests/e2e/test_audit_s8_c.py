"""Session 8 audit C, with a real uvicorn: a shutdown ends the invocations
still running with an answer and a record of its own; a queued call whose
client has disconnected never runs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.app import GatewayServer, create_app
from gateway.httpproto import header_limited_protocol

from .conftest import (
    ADMIN,
    GatewayProcess,
    Live,
    auth,
    e2e_settings,
    remove_data_dir,
    serving,
    short_tmp,
    wait_for,
)

SLEEPER = "import time\n\ndef handler(request, ctx):\n    time.sleep(60)\n    return 'woke'\n"
STOPPED = "the gateway stopped during this invocation"


def _record(data_dir: Path, inv_id: str) -> dict[str, Any]:
    """An invocation record, read from the database of a gateway that has exited
    (a gateway's next start would close a record left running as stopped too)."""
    with contextlib.closing(sqlite3.connect(f"file:{data_dir}/nsfaas.db?mode=ro", uri=True)) as db:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM invocations WHERE id = ?", (inv_id,)).fetchone()
    assert row is not None, inv_id
    return dict(row)


def _assert_stopped_answer(r: httpx.Response) -> str:
    assert r.status_code == 502, (r.status_code, r.text)
    inv_id = r.headers.get("x-invocation-id")
    assert inv_id, r.headers
    assert r.json() == {
        "error": {"code": "killed", "message": "the function was killed", "invocation_id": inv_id}
    }
    return inv_id


def _assert_stopped_record(data_dir: Path, inv_id: str) -> None:
    rec = _record(data_dir, inv_id)
    assert (rec["outcome"], rec["status"]) == ("killed", 502), rec
    assert (rec["error_type"], rec["error_message"]) == ("GatewayStopped", STOPPED), rec
    assert rec["wall_ms"] is not None  # finished by the gateway, not by the next start


@contextlib.asynccontextmanager
async def _server(data_dir: Path, drain_s: float, **overrides: Any) -> AsyncIterator[Any]:
    """GatewayServer (what `nsfaas serve` runs) in this loop, with a short drain."""
    settings = e2e_settings(data_dir, **overrides)
    app = create_app(settings)
    config = uvicorn.Config(
        app=app,
        host="127.0.0.1",
        port=0,
        http=header_limited_protocol(settings.max_header_bytes),
        log_config=None,
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=60,  # far beyond the drain: the gateway must act first
    )
    server = GatewayServer(config, app.state.gateway, drain_s=drain_s)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                assert not task.done(), "uvicorn stopped before it started"
                await asyncio.sleep(0.02)
        yield server
    finally:
        server.should_exit = True
        async with asyncio.timeout(60):
            await task


async def test_shutdown_answers_and_records_the_invocations_it_ends() -> None:
    """At uvicorn's graceful-shutdown deadline (15 s) a call still running got
    a plain-text 500 with no invocation id, and its record blamed the client
    ("the client went away"). The gateway now ends them itself first: a JSON
    502 `killed` with the id, and a record saying the gateway stopped; a call
    still waiting in the queue is ended the same way."""
    data_dir = short_tmp()
    try:
        async with _server(data_dir, drain_s=1.0, function_concurrency=1) as server:
            port = server.servers[0].sockets[0].getsockname()[1]
            gw = server.gateway
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                r = await c.put(
                    "/api/v1/functions/sleeper",
                    json={"source": SLEEPER, "timeout_s": 120},
                    headers=auth(),
                )
                assert r.status_code == 201, r.text
                calls = [asyncio.create_task(c.post("/fn/sleeper", headers=auth())) for _ in "ab"]
                assert await wait_for(
                    lambda: gw.scheduler.running == 1 and gw.scheduler.queued == 1, 30.0
                )
                await asyncio.sleep(0.5)  # the running one is in its jail by now
                t0 = time.monotonic()
                server.should_exit = True  # what SIGTERM does
                answers = await asyncio.gather(*calls)
                waited = time.monotonic() - t0
        ids = [_assert_stopped_answer(r) for r in answers]
        assert waited < 30, waited  # answered at the drain, long before uvicorn's 60 s
        for inv_id in ids:
            _assert_stopped_record(data_dir, inv_id)
    finally:
        remove_data_dir(data_dir)


@pytest.mark.slow
async def test_nsfaas_serve_answers_a_call_cut_off_by_sigterm(
    gateway_procs: Callable[..., GatewayProcess],
) -> None:
    """`nsfaas serve` itself: SIGTERM with a call that would sleep for a minute.
    It is ended at the drain deadline (12 s) with a JSON answer and its record,
    before uvicorn's (15 s) would cut it off without either."""
    data_dir = short_tmp()
    gp = gateway_procs(data_dir)
    await gp.start()
    async with httpx.AsyncClient(base_url=gp.url, timeout=60) as c:
        r = await c.put(
            "/api/v1/functions/sleeper",
            json={"source": SLEEPER, "timeout_s": 120},
            headers=auth(ADMIN),
        )
        assert r.status_code == 201, r.text
        call = asyncio.create_task(c.post("/fn/sleeper", headers=auth(ADMIN)))
        await asyncio.sleep(1.5)  # running (a cold start takes tens of ms)
        assert not call.done()
        gp.signal(signal.SIGTERM)
        answer = await call
    assert await gp.wait(30) == -signal.SIGTERM
    inv_id = _assert_stopped_answer(answer)
    _assert_stopped_record(data_dir, inv_id)


COUNTED = (
    "def handler(request, ctx):\n"
    "    ctx.kv.incr('ran')\n"
    "    return 'counted'\n"
)
SLOW = "import time\n\ndef handler(request, ctx):\n    time.sleep(4)\n    return 'slow'\n"


async def test_a_queued_call_whose_client_disconnected_never_runs() -> None:
    """Of 30 calls whose clients sent the request and disconnected at once, 24
    still ran, queued ones included: work could be queued without holding any
    connection. A call still waiting for a slot now leaves the queue when its
    client goes (recorded `killed`, "the client went away", never started)."""
    n = 5
    async with serving(max_concurrency=2, queue_timeout_s=30.0) as live:
        gw = live.app.state.gateway
        async with live.client() as c:
            await live.deploy(c, "slow", SLOW)
            await live.deploy(c, "counted", COUNTED)
            slow = [asyncio.create_task(c.post("/fn/slow", headers=live.auth)) for _ in "ab"]
            assert await wait_for(lambda: gw.scheduler.running == 2, 30.0)
            conns = [await asyncio.open_connection("127.0.0.1", live.port) for _ in range(n)]
            for _, writer in conns:
                writer.write(
                    b"POST /fn/counted HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n"
                    b"Authorization: Bearer " + live.key.encode() + b"\r\n\r\n{}"
                )
            assert await wait_for(lambda: gw.scheduler.queued == n, 10.0)
            for _, writer in conns:
                writer.close()
            # Out of the queue at once, while the slow calls still hold the slots.
            assert await wait_for(lambda: gw.scheduler.queued == 0, 2.0), gw.scheduler.queued
            assert gw.scheduler.running == 2
            for r in await asyncio.gather(*slow):
                assert r.status_code == 200, r.text
            await _no_more_calls(live, c)
            r = await c.get("/api/v1/kv/ran", headers=live.auth)
            assert r.status_code == 404, r.text  # not one of them ran
            r = await c.get("/api/v1/invocations?function=counted", headers=live.auth)
            records = r.json()["invocations"]
        assert len(records) == n, records
        for rec in records:
            assert (rec["outcome"], rec["error_type"]) == ("killed", "ClientGone"), rec
            assert rec["error_message"] == "the client went away" and rec["start"] is None, rec


async def _no_more_calls(live: Live, c: httpx.AsyncClient) -> None:
    """Wait until nothing runs or waits (a call that was wrongly kept would run now)."""
    gw = live.app.state.gateway
    assert await wait_for(lambda: gw.scheduler.running == 0 and gw.scheduler.queued == 0, 30.0)
    await asyncio.sleep(0.3)
    assert gw.scheduler.running == 0
