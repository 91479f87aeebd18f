"""HTTP framing a function cannot break, through a real uvicorn."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import Settings

ADMIN = "edges-admin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    port = _free_port()
    app = create_app(Settings(data_dir=tmp_path / "d", admin_key=ADMIN, default_timeout_s=5.0))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 headers={"Authorization": f"Bearer {ADMIN}"}) as c:
        yield c
    server.should_exit = True
    await task


@pytest.mark.parametrize(
    ("ret", "status", "extra"),
    [
        ('"body", 204', 204, {}),
        ('"body", 304', 304, {}),
        ('"x", 200, {"X-U": "\\U0001F600"}', 502, {}),
        ('"x", 200, {"X-L": "caf\\u00e9"}', 200, {}),
        ('"x", 200, {"Bad Name": "v"}', 502, {}),
        ('"x", 200, {"X-A": "a\\rb"}', 502, {}),
        ('"x", 200, {f"X-{i}": "v" for i in range(100)}', 502, {}),
        ('"x", 200, {"X-Big": "v" * 20000}', 502, {}),
        ("None", 200, {}),
    ],
)
async def test_function_responses_keep_http_framing(
    live: httpx.AsyncClient, ret: str, status: int, extra: dict[str, str]
) -> None:
    src = f"def handler(r, c):\n    return {ret}\n"
    r = await live.put("/api/v1/functions/edge", json={"source": src, "public": True})
    assert r.status_code in (200, 201), r.text
    r = await live.get("/fn/edge")
    assert r.status_code == status, r.text
    assert r.headers["x-invocation-id"]
    if status in (204, 304):
        assert r.content == b""
    if status == 502:
        assert r.json()["error"]["code"] == "bad_response"
    # the connection and the gateway are still fine
    assert (await live.get("/healthz")).status_code == 200


async def test_a_body_that_stops_arriving_is_a_408_and_frees_its_budget(tmp_path: Path) -> None:
    """Content-Length: 100 and 3 bytes, then silence: the request used to wait
    for ever, holding a connection and its share of the gateway's body budget."""
    port = _free_port()
    settings = Settings(
        data_dir=tmp_path / "d", admin_key=ADMIN, body_timeout_s=1.0, max_buffered_bytes=1000
    )
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                     headers={"Authorization": f"Bearer {ADMIN}"}) as c:
            src = "def handler(r, c):\n    return r.text()\n"
            r = await c.put("/api/v1/functions/echo", json={"source": src, "public": True})
            assert r.status_code == 201, r.text
            for method, path in (
                ("POST", "/fn/echo"), ("PUT", "/api/v1/kv/k"), ("POST", "/api/v1/tenants")
            ):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(
                    f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 900\r\n\r\n[1,".encode()
                )
                await writer.drain()
                head = await asyncio.wait_for(reader.read(65536), 10)
                writer.close()
                assert head.startswith(b"HTTP/1.1 408"), (path, head[:300])
                assert b'"body_timeout"' in head, head
            # 900 of the 1,000 budget bytes would still be held: this needs them.
            r = await c.post("/fn/echo", content=b"y" * 900)
            assert (r.status_code, r.text) == (200, "y" * 900)
    finally:
        server.should_exit = True
        await task
