"""Request bodies of every endpoint share the gateway's body budget: uploads and
KV values too, not only invocation bodies (40 slow 13 MB uploads held 600 MB)."""

from __future__ import annotations

import asyncio
import contextlib

from .conftest import ADMIN, serving


async def test_a_slow_upload_holds_its_share_of_the_body_budget() -> None:
    async with serving(max_buffered_bytes=100_000) as live, live.client(timeout=30) as c:
        _reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        head = (
            "PUT /api/v1/functions/slow HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {ADMIN}\r\nContent-Type: application/json\r\n"
            "Content-Length: 95000\r\n\r\n"
        )
        writer.write(head.encode() + b" " * 90_000)  # all but the last 5,000 bytes
        await writer.drain()
        try:
            for _ in range(100):  # until the gateway has read what was sent
                r = await c.put("/api/v1/kv/k", content=b"x" * 20_000, headers=live.auth)
                if r.status_code == 429:
                    break
                await asyncio.sleep(0.05)
            assert r.status_code == 429, r.text
            assert r.json()["error"]["code"] == "rejected" and "Retry-After" in r.headers
            r = await c.put(
                "/api/v1/functions/other",
                json={"source": "def handler(r, c):\n    return 1\n"},
                headers=live.auth,
            )
            assert r.status_code == 201, r.text  # small bodies still fit
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        for _ in range(100):  # the half-read upload's bytes come back
            r = await c.put("/api/v1/kv/k", content=b"x" * 20_000, headers=live.auth)
            if r.status_code == 204:
                break
            await asyncio.sleep(0.05)
        assert r.status_code == 204, r.text
        assert (await c.get("/api/v1/kv/k", headers=live.auth)).content == b"x" * 20_000
