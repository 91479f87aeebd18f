"""HostProxy's identity rules and its socket, on a real Unix socket (no jail).

A connection serves only the invocation it was accepted in: one made before
``begin()`` (accepted, or still in the kernel's queue) never serves the
invocation that begins. The socket's address names nothing of the host. A
client that closed before its reply was written is no error of the
gateway's, under asyncio or uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import re
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
import uvloop

from jail import proxy
from jail.proxy import CallContext, HostProxy, ProxyCallError

OLD = CallContext(invocation_id="inv-old", tenant="t", function="f", version=1)
NEW = CallContext(invocation_id="inv-new", tenant="t", function="f", version=1)


class Methods:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    async def __call__(self, ctx: CallContext, method: str, params: dict[str, Any],
                       body: bytes) -> tuple[dict[str, Any], bytes]:
        self.seen.append((ctx.invocation_id, method))
        if method == "echo":
            return {"params": params}, body
        raise ProxyCallError("unknown_method", method)


def frame(method: str = "echo", call_id: int = 1) -> bytes:
    head = json.dumps({"v": 1, "id": call_id, "method": method, "params": {}}).encode()
    return struct.pack(">II", len(head), 0) + head


def reply(sock: socket.socket) -> dict[str, Any] | None:
    """The next reply's header, or None if the proxy closed the connection."""
    try:
        prefix = sock.recv(8, socket.MSG_WAITALL)
        if len(prefix) < 8:
            return None
        hlen, blen = struct.unpack(">II", prefix)
        head: dict[str, Any] = json.loads(sock.recv(hlen, socket.MSG_WAITALL))
        if blen:
            sock.recv(blen, socket.MSG_WAITALL)
        return head
    except ConnectionError:
        return None


@pytest.fixture
async def server() -> AsyncIterator[tuple[HostProxy, Methods]]:
    root = Path(tempfile.mkdtemp(prefix="nsfaas-p-", dir="/tmp"))  # a short socket path
    methods = Methods()
    srv = HostProxy(root, methods)
    await srv.start()
    try:
        yield srv, methods
    finally:
        await srv.aclose()
        shutil.rmtree(root, ignore_errors=True)


def client(srv: HostProxy) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(srv.path))  # completes at once: the kernel queues it for accept()
    return s


async def test_a_connection_still_queued_at_begin_never_serves_that_invocation(
    server: tuple[HostProxy, Methods],
) -> None:
    """A process of the finished invocation connected and sent a call, and the
    gateway had not accepted it yet when the next invocation began: accepted
    later, it was served as the next invocation."""
    srv, methods = server
    srv.begin(OLD)
    srv.end()
    with client(srv) as s:
        s.sendall(frame())
        srv.begin(NEW)  # no await since the connect: the loop has not accepted it
        assert await asyncio.to_thread(reply, s) is None
    with client(srv) as fresh:
        fresh.sendall(frame())
        got = await asyncio.to_thread(reply, fresh)
        assert got is not None and got["ok"], got
    assert methods.seen == [("inv-new", "echo")]


async def test_a_connection_accepted_between_invocations_never_serves_the_next(
    server: tuple[HostProxy, Methods],
) -> None:
    """Accepted while no invocation ran, it got no_invocation, and kept it
    only until the next invocation began, whose identity it then had."""
    srv, methods = server
    srv.begin(OLD)
    srv.end()
    with client(srv) as s:
        s.sendall(frame())
        got = await asyncio.to_thread(reply, s)
        assert got is not None and got["code"] == "no_invocation", got
        srv.begin(NEW)
        with contextlib.suppress(OSError):
            s.sendall(frame(call_id=2))
        got = await asyncio.to_thread(reply, s)
        assert got is None or got["code"] == "no_invocation", got
    assert methods.seen == []


async def test_a_connection_of_an_invocation_never_serves_the_next(
    server: tuple[HostProxy, Methods],
) -> None:
    srv, methods = server
    srv.begin(OLD)
    with client(srv) as s:
        s.sendall(frame())
        got = await asyncio.to_thread(reply, s)
        assert got is not None and got["ok"], got
        srv.end()
        srv.begin(NEW)
        with contextlib.suppress(OSError):
            s.sendall(frame(call_id=2))
        assert await asyncio.to_thread(reply, s) is None
    assert methods.seen == [("inv-old", "echo")]


# ---- the socket's address ---------------------------------------------------------


async def test_the_sockets_address_is_its_bare_name(server: tuple[HostProxy, Methods]) -> None:
    """A peer's getpeername() is the path the socket was bound with: it was
    the host path <jail dir>/sock/<secret>/proxy.sock."""
    srv, _ = server
    with client(srv) as s:
        assert s.getpeername() == "proxy.sock"
    assert srv.path.exists()


async def test_without_a_private_cwd_the_address_is_a_fd_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where unshare(CLONE_FS) is refused, the bind goes through the
    directory's fd: still no host path, and the process's cwd is untouched."""

    def refused() -> None:
        raise proxy._CwdNotPrivate(1, "refused")

    monkeypatch.setattr(proxy, "_unshare_cwd", refused)
    cwd = os.getcwd()
    root = Path(tempfile.mkdtemp(prefix="nsfaas-p-", dir="/tmp"))
    srv = HostProxy(root, Methods())
    try:
        await srv.start()
        srv.begin(NEW)
        with client(srv) as s:
            peer = s.getpeername()
            s.sendall(frame())
            got = await asyncio.to_thread(reply, s)
        assert re.fullmatch(r"/proc/self/fd/\d+/proxy\.sock", peer), peer
        assert got is not None and got["ok"], got
        assert os.getcwd() == cwd
    finally:
        await srv.aclose()
        assert not srv.dir.exists()
        shutil.rmtree(root, ignore_errors=True)


def test_the_bind_never_moves_the_processs_cwd(tmp_path: Path) -> None:
    cwd = os.getcwd()
    sock = proxy.bind_unnamed(tmp_path, "x.sock")
    try:
        assert sock.getsockname() == "x.sock"
        assert (tmp_path / "x.sock").is_socket()
        assert os.getcwd() == cwd
        assert not Path(cwd, "x.sock").exists()
    finally:
        sock.close()


# ---- a client that closes before its reply ---------------------------------------------


def _closed_under_a_call(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> tuple[list[str], list[str]]:
    """A call is in flight when its client closes with a reply it never read
    (so the proxy's side of the connection is reset and its transport
    closed); then the call's reply is written. Returns (the loop's unhandled
    exceptions, error-level log events)."""

    async def main() -> list[str]:
        unhandled: list[str] = []
        asyncio.get_running_loop().set_exception_handler(
            lambda _loop, context: unhandled.append(
                f"{context.get('message')}: {context.get('exception')!r}"
            )
        )
        release = asyncio.Event()
        entered = asyncio.Event()

        async def methods(ctx: CallContext, method: str, params: dict[str, Any],
                          body: bytes) -> tuple[dict[str, Any], bytes]:
            if method == "slow":
                entered.set()
                await release.wait()
            return {}, b""

        root = Path(tempfile.mkdtemp(prefix="nsfaas-p-", dir="/tmp"))
        srv = HostProxy(root, methods)
        await srv.start()
        srv.begin(NEW)
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(srv.path))
            s.sendall(frame("echo") + frame("slow", 2))
            await entered.wait()
            await asyncio.sleep(0.05)  # the echo's reply sits unread in s
            s.close()  # unread data: the proxy's end is reset, its transport closes
            await asyncio.sleep(0.1)
            release.set()  # now the slow call's reply is written
            await asyncio.sleep(0.1)
        finally:
            await srv.aclose()
            shutil.rmtree(root, ignore_errors=True)
        gc.collect()  # a task that died unretrieved reports it when collected
        await asyncio.sleep(0)
        return unhandled

    with structlog.testing.capture_logs() as logs:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            unhandled = runner.run(main())
    errors = [str(e) for e in logs if e.get("log_level") in ("error", "critical", "exception")]
    return unhandled, errors


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_reply_to_a_client_that_closed_is_no_error(loop: str) -> None:
    """Under uvloop a write to a closed transport raises RuntimeError (not
    ConnectionError), which escaped the connection's task: "Unhandled
    exception in client_connected_cb" (1100 pipelined kv.incr on 8
    connections, each closed after reading one reply, did it by chance)."""
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    unhandled, errors = _closed_under_a_call(factory)
    assert unhandled == []
    assert errors == []
