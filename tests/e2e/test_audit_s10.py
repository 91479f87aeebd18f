"""Session 10's audit through a real uvicorn: an upload whose client left while
it waited for a checker is not checked."""

from __future__ import annotations

import asyncio
import json

from tests.e2e.conftest import serving


def _heavy(tag: int, lines: int = 12_000) -> str:
    body = "".join(f"a{j} = [{j}, {j * 7}, {j * 13}, {j + 5}, {j * 3}, 6, 7, 8]\n"
                   for j in range(lines))
    return body + f"def handler(r, c):\n    return {tag}\n"


async def test_an_upload_whose_client_left_while_it_waited_is_not_checked() -> None:
    """Queued uploads were checked after their clients had gone: a tenant's
    backlog held a checker for minutes after its script ended. A waiting
    upload whose client left is dropped when its turn comes."""
    async with serving() as live:
        async with live.client() as c:
            r = await c.post("/api/v1/tenants", json={"name": "leaver"}, headers=live.auth)
            key = {"Authorization": f"Bearer {r.json()['key']}"}
        gw = live.app.state.gateway
        checked: list[int] = []
        real = gw.checker.check

        async def counted(source: bytes, *args: object, **kw: object) -> object:
            checked.append(len(source))
            return await real(source, *args, **kw)

        gw.checker.check = counted
        bodies = [json.dumps({"source": _heavy(i)}).encode() for i in range(3)]

        async def upload_and_leave(body: bytes) -> None:
            _, writer = await asyncio.open_connection("127.0.0.1", live.port)
            writer.write(
                b"PUT /api/v1/functions/big HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: {key['Authorization']}\r\n".encode()
                + b"Content-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await asyncio.sleep(0.3)  # the body is in; its check has begun or waits
            writer.close()

        await asyncio.gather(*(upload_and_leave(b) for b in bodies))
        for _ in range(100):  # the first check runs to its end
            if not gw.tenant_uploads:
                break
            await asyncio.sleep(0.1)
        assert gw.tenant_uploads == {}
        assert len(checked) == 1, checked  # the two that waited were never checked
