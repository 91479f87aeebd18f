"""The host-proxy server: one Unix socket per jail, the jail's only way out.

Identity is by construction: each worker gets its own socket in its own
directory (bound read-only into that jail at /run/nsfaas), and the worker
tells the proxy which invocation is running. Nothing the function sends is
trusted to say who it is. See docs/proxy.md for the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from .result import not_strict_json
from .runtime import _frames

log = structlog.get_logger("nsfaas.proxy")

PROTOCOL_VERSION = 1
MAX_HEADER = 64 * 1024
MAX_BODY = 2 * 1024 * 1024
MAX_CONNECTIONS = 8
FRAME_TIMEOUT_S = 5.0  # a started frame must complete within this
IDLE_TIMEOUT_S = 60.0  # an idle connection is closed after this


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling: set by the gateway for the invocation now running."""

    invocation_id: str
    tenant: str
    function: str
    version: int
    egress_allow: tuple[str, ...] = ()
    depth: int = 0
    deadline: float = 0.0  # monotonic
    extra: dict[str, Any] = field(default_factory=dict)


class ProxyCallError(Exception):
    """An error reply: ``code`` is stable, ``message`` is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


ProxyHandler = Callable[
    [CallContext, str, dict[str, Any], bytes], Awaitable[tuple[dict[str, Any], bytes]]
]


def _error_head(call_id: int, code: str, message: str) -> dict[str, Any]:
    return {"v": 1, "id": call_id, "ok": False, "code": code, "message": message[:1000]}


class _Bucket:
    """Token bucket: ``rate`` calls per second, bursts of ``2 * rate``."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = 2 * rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(2 * self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class HostProxy:
    """Serves one jail's socket. ``begin()``/``end()`` bracket each invocation."""

    def __init__(self, root: Path, handler: ProxyHandler, *, rate_per_s: float = 200.0) -> None:
        self.dir = root / secrets.token_hex(8)
        self.path = self.dir / "proxy.sock"
        self.handler = handler
        self.rate_per_s = rate_per_s
        self.calls = 0
        self._server: asyncio.Server | None = None
        self._ctx: CallContext | None = None
        self._bucket = _Bucket(rate_per_s)
        self._conns: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.dir.mkdir(mode=0o711)
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
        # The jail's unprivileged uid must be able to connect; the directory is
        # bound read-only, so the jail can never replace the socket.
        os.chmod(self.path, 0o666)  # noqa: S103 (a socket, reachable only inside this jail)

    def begin(self, ctx: CallContext) -> None:
        self._ctx = ctx
        self._bucket = _Bucket(self.rate_per_s)

    def end(self) -> None:
        """The invocation is over: drop its connections (its processes are gone too)."""
        self._ctx = None
        for task in list(self._conns):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= MAX_CONNECTIONS:
            await self._reply(writer, 0, error=("too_many_connections", "connection limit"))
            writer.close()
            return
        self._conns.add(task)
        try:
            while True:
                try:
                    prefix = await asyncio.wait_for(
                        reader.readexactly(_frames.PREFIX.size), IDLE_TIMEOUT_S
                    )
                    hlen, blen = _frames.PREFIX.unpack(prefix)
                    if hlen > MAX_HEADER or blen > MAX_BODY:
                        await self._reply(writer, 0, error=("frame_too_large", "frame over cap"))
                        return
                    async with asyncio.timeout(FRAME_TIMEOUT_S):
                        raw = await reader.readexactly(hlen)
                        body = await reader.readexactly(blen) if blen else b""
                    header = _frames.decode_header(raw)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                except _frames.FrameError as exc:
                    await self._reply(writer, 0, error=("bad_frame", str(exc)))
                    return
                await self._dispatch(writer, header, body)
        except asyncio.CancelledError:
            pass
        finally:
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(
        self, writer: asyncio.StreamWriter, header: dict[str, Any], body: bytes
    ) -> None:
        raw_id = header.get("id")
        call_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else 0
        method, params = header.get("method"), header.get("params", {})
        ctx = self._ctx
        self.calls += 1
        if header.get("v") != PROTOCOL_VERSION:
            await self._reply(
                writer, call_id, error=("bad_version", f"protocol v{PROTOCOL_VERSION}")
            )
        elif not isinstance(method, str) or not isinstance(params, dict):
            await self._reply(writer, call_id, error=("bad_request", "method and params required"))
        elif (why := not_strict_json(header)) is not None:
            await self._reply(writer, call_id, error=("bad_request", why))
        elif ctx is None:
            await self._reply(writer, call_id, error=("no_invocation", "no invocation is running"))
        elif not self._bucket.take():
            await self._reply(writer, call_id, error=("rate_limited", "too many proxy calls"))
        else:
            try:
                result, data = await self.handler(ctx, method, params, body)
            except ProxyCallError as exc:
                await self._reply(writer, call_id, error=(exc.code, exc.message))
            except Exception:
                # A bug in a method must cost its caller one call, not the
                # connection: the client would only see it closed.
                log.exception(
                    "proxy_call_failed",
                    method=method[:64],
                    invocation_id=ctx.invocation_id,
                    tenant=ctx.tenant,
                )
                await self._reply(writer, call_id, error=("internal_error", "internal error"))
            else:
                await self._reply(writer, call_id, result=result, data=data)

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        call_id: int,
        *,
        result: dict[str, Any] | None = None,
        data: bytes = b"",
        error: tuple[str, str] | None = None,
    ) -> None:
        if error is not None:
            head = _error_head(call_id, *error)
        else:
            head = {**(result or {}), "v": 1, "id": call_id, "ok": True}
        try:
            frame = _frames.encode(head, data)
        except (TypeError, ValueError):
            # A method returned something JSON cannot carry: a bug in the
            # gateway, answered like one rather than leaving the call unanswered.
            log.exception("proxy_reply_unencodable", reply_keys=sorted(map(str, head)))
            frame = _frames.encode(_error_head(call_id, "internal_error", "internal error"))
        with contextlib.suppress(ConnectionError):
            writer.write(frame)
            await writer.drain()

    async def aclose(self) -> None:
        self.end()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._conns:
            await asyncio.gather(*self._conns, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)
