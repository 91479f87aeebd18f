"""HostProxy and the runtime's client, face to face: no jail, no gateway.

The server is the real HostProxy on a real Unix socket, the client the real
``nsfaas`` ``_Proxy`` (blocking, so it runs in a thread); only the methods
behind the proxy are this file's own.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jail import proxy
from jail.proxy import CallContext, HostProxy, ProxyCallError
from jail.runtime import _frames, sdk
from jail.runtime.sdk import ProxyError

CTX = CallContext(invocation_id="inv-1", tenant="t", function="f", version=1)


class Methods:
    """What the gateway would serve, cut down to what these tests need."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.server: HostProxy | None = None

    async def __call__(
        self, ctx: CallContext, method: str, params: dict[str, Any], body: bytes
    ) -> tuple[dict[str, Any], bytes]:
        self.seen.append(method)
        if method == "echo":
            return {"params": params}, body
        if method == "boom":
            raise RuntimeError("a bug in a method")
        if method == "unencodable":
            return {"x": object()}, b""
        if method == "end":  # the invocation ends while this call is in flight
            assert self.server is not None
            self.server.end()
            await asyncio.sleep(1)
        raise ProxyCallError("unknown_method", method)


@pytest.fixture
async def served() -> AsyncIterator[tuple[HostProxy, Methods, sdk._Proxy]]:
    root = Path(tempfile.mkdtemp(prefix="nsfaas-p-", dir="/tmp"))  # a short socket path
    methods = Methods()
    server = HostProxy(root, methods)
    methods.server = server
    await server.start()
    server.begin(CTX)
    client = sdk._Proxy(str(server.path))
    try:
        yield server, methods, client
    finally:
        client._drop()
        await server.aclose()
        shutil.rmtree(root, ignore_errors=True)


async def call(client: sdk._Proxy, method: str, body: bytes = b"", **params: Any) -> Any:
    """The reply's params (what echo sent back), or the error code."""
    try:
        reply, _ = await asyncio.to_thread(client.call, method, body, **params)
    except ProxyError as exc:
        return exc.code
    return reply.get("params")


async def test_a_method_that_fails_is_answered_internal_error_and_the_connection_stays(
    served: tuple[HostProxy, Methods, sdk._Proxy],
) -> None:
    _, _, client = served
    assert await call(client, "echo", n=1) == {"n": 1}
    sock = client._sock
    assert await call(client, "boom") == "internal_error"
    assert await call(client, "echo", n=2) == {"n": 2}
    assert await call(client, "unencodable") == "internal_error"
    assert await call(client, "echo", n=3) == {"n": 3}
    assert client._sock is sock


@pytest.mark.parametrize(
    "params",
    [
        {"key": "\ud800"},
        {"fields": {"a": ["ok", {"b": "\udfff"}]}},
        {"fields": {"\ud800": 1}},
        {"timeout": math.nan},
        {"fields": {"a": [1.5, -math.inf]}},
    ],
)
async def test_headers_that_are_not_strict_json_are_bad_request_before_any_method(
    served: tuple[HostProxy, Methods, sdk._Proxy], params: dict[str, Any]
) -> None:
    """Python's parser takes "\\ud800" (no store or log can hold it) and NaN
    (no JSON renderer writes it); the proxy takes neither."""
    _, methods, client = served
    assert await call(client, "echo", **params) == "bad_request"
    assert methods.seen == []
    sock = client._sock
    assert await call(client, "echo", key="ok \U0001d11e") == {"key": "ok \U0001d11e"}
    assert client._sock is sock


async def test_the_client_refuses_an_oversized_frame_without_sending_it(
    served: tuple[HostProxy, Methods, sdk._Proxy],
) -> None:
    server, methods, client = served
    assert await call(client, "echo", n=1) == {"n": 1}
    sock = client._sock
    calls = server.calls
    assert await call(client, "echo", url="a" * proxy.MAX_HEADER) == "frame_too_large"
    assert await call(client, "echo", b"x" * (proxy.MAX_BODY + 1)) == "frame_too_large"
    assert server.calls == calls
    assert await call(client, "echo", n=2) == {"n": 2}
    assert client._sock is sock
    assert methods.seen == ["echo", "echo"]


def test_the_client_caps_are_the_proxy_caps() -> None:
    assert (sdk._MAX_HEADER, sdk._MAX_BODY) == (proxy.MAX_HEADER, proxy.MAX_BODY)


async def test_the_client_reconnects_after_the_proxy_closed_an_idle_connection(
    served: tuple[HostProxy, Methods, sdk._Proxy],
) -> None:
    server, _, client = served
    assert await call(client, "echo", n=1) == {"n": 1}
    sock = client._sock
    server.end()  # closes every connection, as the idle timeout would
    for _ in range(100):
        if not server._conns:
            break
        await asyncio.sleep(0.01)
    server.begin(CTX)
    assert await call(client, "echo", n=2) == {"n": 2}
    assert client._sock is not sock


async def test_a_connection_closed_mid_call_is_proxy_closed_then_the_next_call_works(
    served: tuple[HostProxy, Methods, sdk._Proxy],
) -> None:
    server, _, client = served
    assert await call(client, "end") == "proxy_closed"
    assert client._sock is None
    server.begin(CTX)
    assert await call(client, "echo", n=1) == {"n": 1}


async def test_a_refused_connection_is_dropped_and_the_next_call_reconnects(
    served: tuple[HostProxy, Methods, sdk._Proxy],
) -> None:
    server, _, client = served
    others = [
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(proxy.MAX_CONNECTIONS)
    ]
    try:
        for s in others:
            s.connect(str(server.path))
        for _ in range(100):
            if len(server._conns) == proxy.MAX_CONNECTIONS:
                break
            await asyncio.sleep(0.01)
        assert await call(client, "echo") == "too_many_connections"
        assert client._sock is None
    finally:
        for s in others:
            s.close()
    for _ in range(100):
        if not server._conns:
            break
        await asyncio.sleep(0.01)
    assert await call(client, "echo", n=1) == {"n": 1}


@pytest.mark.parametrize(
    ("head", "code"),
    [
        ({"v": True, "id": 3, "method": "echo", "params": {}}, "bad_version"),
        ({"v": 1.0, "id": 3, "method": "echo", "params": {}}, "bad_version"),
        ({"v": 1, "id": "3", "method": "echo", "params": {}}, "bad_request"),
        ({"v": 1, "id": 2.5, "method": "echo", "params": {}}, "bad_request"),
        ({"v": 1, "method": "echo", "params": {}}, "bad_request"),
    ],
)
async def test_the_protocol_is_taken_as_written(
    served: tuple[HostProxy, Methods, sdk._Proxy], head: dict[str, Any], code: str
) -> None:
    """`v: true` and `v: 1.0` passed as version 1, and a string id was answered
    `ok` with id 0 (docs/proxy.md: v is 1, id an integer)."""
    server, methods, _ = served
    reader, writer = await asyncio.open_unix_connection(str(server.path))
    try:
        writer.write(_frames.encode(head, b""))
        await writer.drain()
        prefix = await reader.readexactly(_frames.PREFIX.size)
        hlen, blen = _frames.PREFIX.unpack(prefix)
        reply = _frames.decode_header(await reader.readexactly(hlen))
        await reader.readexactly(blen)
    finally:
        writer.close()
    assert (reply["ok"], reply["code"]) == (False, code), reply
    assert methods.seen == []
