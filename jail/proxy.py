"""The host-proxy server: one Unix socket per jail, the jail's only way out.

Identity is by construction: each worker gets its own socket in its own
directory (bound read-only into that jail at /run/nsfaas), and the worker
tells the proxy which invocation is running. Nothing the function sends is
trusted to say who it is. See docs/proxy.md for the protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import secrets
import shutil
import socket
import threading
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
SOCKET_NAME = "proxy.sock"
ACCEPT_RETRY_S = 1.0  # after accept() ran out of fds (EMFILE): try again then
# New connections per invocation: a token bucket. The SDK keeps one connection
# per process and reconnects only after the proxy closed it, so a function
# uses one or a few; a client that connects and closes in a loop costs the
# event loop an accept, a task and a stream each time (8 looping processes
# held it at 100% CPU). Past the budget the gateway stops accepting on that
# socket until a token is back: the rest wait in the kernel's backlog (their
# connect() blocks, or fails when it is full), at no cost to the gateway.
CONNECT_RATE_PER_S = 32.0
CONNECT_BURST = 16
CLONE_FS = 0x200


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
    """Token bucket: ``rate`` per second, bursts of ``burst`` (default ``2 * rate``)."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = 2 * rate if burst is None else burst
        self.tokens = self.burst
        self.at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def take(self) -> bool:
        if self.ready():
            self.tokens -= 1
            return True
        return False

    def ready(self) -> bool:
        """Whether a token is there (without taking it)."""
        self._refill()
        return self.tokens >= 1

    def wait_s(self) -> float:
        """Seconds until the next token."""
        self._refill()
        return max(0.0, (1 - self.tokens) / self.rate)


class HostProxy:
    """Serves one jail's socket. ``begin()``/``end()`` bracket each invocation.

    A connection serves the invocation that was running when it was accepted,
    and only while that invocation runs: ``begin()`` and ``end()`` close every
    connection there is, those the kernel still holds unaccepted included. So
    a process of a finished invocation (one that answered and lingers until
    the zygote kills it) gets ``no_invocation``, never the next one's identity,
    log or rate budget: the worker calls ``begin()`` only once the zygote has
    reported the previous child gone, and every connection that child made
    exists by then.
    """

    def __init__(
        self,
        root: Path,
        handler: ProxyHandler,
        *,
        rate_per_s: float = 200.0,
        connect_rate_per_s: float = CONNECT_RATE_PER_S,
        connect_burst: int = CONNECT_BURST,
    ) -> None:
        self.dir = root / secrets.token_hex(8)
        self.path = self.dir / SOCKET_NAME
        self.handler = handler
        self.rate_per_s = rate_per_s
        self.connect_rate_per_s = connect_rate_per_s
        self.connect_burst = connect_burst
        self.calls = 0
        self.accepted = 0  # connections accepted to be served (not those _reset drains)
        self._listener: socket.socket | None = None
        self._ctx: CallContext | None = None
        self._epoch = 0  # one per begin() and end(): what a connection was accepted in
        self._bucket = _Bucket(rate_per_s)
        self._connects = _Bucket(connect_rate_per_s, connect_burst)
        # Every connection's task, until it ends -> the epoch it was accepted in.
        self._tasks: dict[asyncio.Task[None], int] = {}
        self._conns: set[asyncio.Task[None]] = set()  # those admitted (MAX_CONNECTIONS)
        self._paused: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self.dir.mkdir(mode=0o711)
        sock = bind_unnamed(self.dir, SOCKET_NAME)
        try:
            # The jail's unprivileged uid must be able to connect; the directory is
            # bound read-only, so the jail can never replace the socket.
            os.chmod(self.path, 0o666)  # noqa: S103 (a socket, reachable only inside this jail)
            sock.listen(MAX_CONNECTIONS * 4)
            sock.setblocking(False)
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        except BaseException:
            sock.close()
            raise
        self._listener = sock

    def begin(self, ctx: CallContext) -> None:
        """A new invocation runs: only connections accepted from now on serve it."""
        if not self._reset():
            # Connections of before could still be waiting to be accepted:
            # this invocation goes without the proxy rather than share it.
            log.warning("proxy_backlog_not_drained", invocation_id=ctx.invocation_id)
            self._ctx = None
            return
        self._ctx = ctx
        self._bucket = _Bucket(self.rate_per_s)
        self._connects = _Bucket(self.connect_rate_per_s, self.connect_burst)
        if self._paused is not None:  # a spent budget was the last one's
            self._paused.cancel()
            self._resume()

    def end(self) -> None:
        """The invocation is over: drop its connections (its processes are gone too)."""
        self._reset()
        self._ctx = None

    def _reset(self) -> bool:
        """Close every connection made so far: those accepted (their tasks are
        cancelled) and those still waiting in the kernel's queue, which would
        otherwise be accepted into whatever invocation runs next. False if
        the queue could not be emptied (accept failed: out of fds)."""
        for task, epoch in self._tasks.items():
            if epoch == self._epoch:  # older ones were cancelled before
                task.cancel()
        self._epoch += 1
        listener = self._listener
        if listener is None:
            return True
        for _ in range(4096):  # bounded by the backlog (MAX_CONNECTIONS * 4)
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return True
            except OSError as exc:
                if exc.errno == errno.ECONNABORTED:
                    continue
                return False
            conn.close()
        return False

    def _accept(self) -> None:
        """The listener is readable: take every waiting connection, each bound
        to the invocation running now (or to none)."""
        listener = self._listener
        if listener is None:
            return
        loop = asyncio.get_running_loop()
        for _ in range(64):  # the rest on the next callback: others get a turn
            if not self._connects.ready():
                # The invocation's connection budget is spent: stop listening
                # until a token is back. What connects meanwhile waits in the
                # kernel's backlog (or is refused when it is full), unaccepted.
                loop.remove_reader(listener.fileno())
                self._paused = loop.call_later(self._connects.wait_s(), self._resume)
                return
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds: a readable listener would spin the loop. Pause.
                    log.warning("proxy_accept_failed", error=str(exc))
                    loop.remove_reader(listener.fileno())
                    self._paused = loop.call_later(ACCEPT_RETRY_S, self._resume)
                    return
                continue  # ECONNABORTED & co.: that one is gone
            self._connects.take()  # taken only for a connection there was
            self.accepted += 1
            # The task takes the socket out of `held` when it hands it to the
            # loop; one cancelled before it ever ran has it closed here.
            held = [conn]
            task = loop.create_task(self._serve(held, self._epoch))
            self._tasks[task] = self._epoch
            task.add_done_callback(functools.partial(self._ended, held))

    def _ended(self, held: list[socket.socket], task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)
        self._conns.discard(task)
        for conn in held:
            conn.close()

    def _admit(self, task: asyncio.Task[None], epoch: int) -> bool:
        """Whether the connection may be served: at most MAX_CONNECTIONS of the
        running invocation at once. Checked once the task runs, as a client
        that just closed some (their tasks end first) and reconnects expects."""
        live = sum(1 for t in self._conns if self._tasks.get(t) == epoch)
        if live >= MAX_CONNECTIONS:
            return False
        self._conns.add(task)
        return True

    def _resume(self) -> None:
        self._paused = None
        if self._listener is not None:
            asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    async def _serve(self, held: list[socket.socket], epoch: int) -> None:
        task = asyncio.current_task()
        assert task is not None
        writer: asyncio.StreamWriter | None = None
        try:
            # From here the loop owns the socket, and closes it if this fails.
            reader, writer = await asyncio.open_unix_connection(sock=held.pop())
            if not self._admit(task, epoch):
                await self._reply(writer, 0, error=("too_many_connections", "connection limit"))
                return
            while True:
                try:
                    # The frame starts with its first byte, not with a whole
                    # prefix: 3 bytes and silence held the connection 60 s.
                    first = await asyncio.wait_for(reader.readexactly(1), IDLE_TIMEOUT_S)
                    async with asyncio.timeout(FRAME_TIMEOUT_S):
                        prefix = first + await reader.readexactly(_frames.PREFIX.size - 1)
                        hlen, blen = _frames.PREFIX.unpack(prefix)
                        if hlen > MAX_HEADER or blen > MAX_BODY:
                            await self._reply(
                                writer, 0, error=("frame_too_large", "frame over cap")
                            )
                            return
                        raw = await reader.readexactly(hlen)
                        body = await reader.readexactly(blen) if blen else b""
                    header = _frames.decode_header(raw)
                except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
                    return
                except _frames.FrameError as exc:
                    await self._reply(writer, 0, error=("bad_frame", str(exc)))
                    return
                if not await self._dispatch(writer, epoch, header, body):
                    return  # the client is gone: nothing more to answer
        except asyncio.CancelledError:
            pass
        except OSError:
            pass  # the connection failed before it could be served
        except Exception:  # a bug here must not be "Task exception was never retrieved"
            log.exception("proxy_connection_failed")
        finally:
            self._conns.discard(task)  # at once: the client may reconnect meanwhile
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

    async def _dispatch(
        self, writer: asyncio.StreamWriter, epoch: int, header: dict[str, Any], body: bytes
    ) -> bool:
        """Answer one request; False if the answer could not be sent."""
        raw_id = header.get("id")
        id_ok = isinstance(raw_id, int) and not isinstance(raw_id, bool)
        call_id: int = raw_id if isinstance(raw_id, int) and id_ok else 0
        method, params = header.get("method"), header.get("params", {})
        # Only the invocation this connection was accepted in, while it runs.
        ctx = self._ctx if epoch == self._epoch else None
        self.calls += 1
        version = header.get("v")
        # 1, not true or 1.0 (Python's == says both equal 1).
        if type(version) is not int or version != PROTOCOL_VERSION:
            return await self._reply(
                writer, call_id, error=("bad_version", f"protocol v{PROTOCOL_VERSION}")
            )
        if not id_ok:
            return await self._reply(
                writer, 0, error=("bad_request", "id must be an integer")
            )
        if not isinstance(method, str) or not isinstance(params, dict):
            return await self._reply(
                writer, call_id, error=("bad_request", "method and params required")
            )
        if (why := not_strict_json(header)) is not None:
            return await self._reply(writer, call_id, error=("bad_request", why))
        if ctx is None:
            return await self._reply(
                writer, call_id, error=("no_invocation", "no invocation is running")
            )
        if not self._bucket.take():
            return await self._reply(
                writer, call_id, error=("rate_limited", "too many proxy calls")
            )
        try:
            result, data = await self.handler(ctx, method, params, body)
        except ProxyCallError as exc:
            return await self._reply(writer, call_id, error=(exc.code, exc.message))
        except Exception:
            # A bug in a method must cost its caller one call, not the
            # connection: the client would only see it closed.
            log.exception(
                "proxy_call_failed",
                method=method[:64],
                invocation_id=ctx.invocation_id,
                tenant=ctx.tenant,
            )
            return await self._reply(writer, call_id, error=("internal_error", "internal error"))
        return await self._reply(writer, call_id, result=result, data=data)

    async def _reply(
        self,
        writer: asyncio.StreamWriter,
        call_id: int,
        *,
        result: dict[str, Any] | None = None,
        data: bytes = b"",
        error: tuple[str, str] | None = None,
    ) -> bool:
        """Send one reply; False if the connection is closing or closed."""
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
        # The client may have closed (or been killed) while its pipelined
        # requests were still being answered: the transport is closing, or
        # closes under this write. Under uvloop a write to a closed transport
        # raises RuntimeError, not ConnectionError; either way the connection
        # is over, which is the client's doing, not an error of the gateway.
        if writer.transport.is_closing():
            return False
        try:
            writer.write(frame)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            return False
        return True

    async def aclose(self) -> None:
        self.end()
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(Exception):  # a loop already closed has no reader
                asyncio.get_running_loop().remove_reader(listener.fileno())
            listener.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def bind_unnamed(directory: Path, name: str) -> socket.socket:
    """A Unix stream socket at ``directory/name`` whose address is ``name`` alone.

    A peer's getpeername() returns the path the socket was bound with, and the
    jail's functions are peers: a bind by full path showed them the host's
    data dir and the socket directory's secret name. A relative bind needs
    the directory as working directory, which is the whole process's: so it
    is done by a short-lived thread that first gets a working directory of its
    own (unshare(CLONE_FS)). Where that is refused, the bind goes through the
    directory's fd (``/proc/self/fd/N/name``): no host path, only a number.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dirfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        failed: list[BaseException] = []
        bound: list[bool] = []

        def bind_from_inside() -> None:
            try:
                _unshare_cwd()  # raises if refused: then no chdir at all
                os.fchdir(dirfd)  # this thread's own working directory only
                sock.bind(name)
                bound.append(True)
            except BaseException as exc:  # reported below, never in the thread
                failed.append(exc)

        thread = threading.Thread(target=bind_from_inside, name="nsfaas-proxy-bind", daemon=True)
        thread.start()
        thread.join()
        if not bound:
            if failed and not isinstance(failed[0], _CwdNotPrivate):
                raise failed[0]
            sock.bind(f"/proc/self/fd/{dirfd}/{name}")
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dirfd)
    return sock


class _CwdNotPrivate(OSError):
    """unshare(CLONE_FS) was refused: the relative bind cannot be done safely."""


def _unshare_cwd() -> None:
    """Give the calling thread a working directory of its own."""
    unshare = getattr(os, "unshare", None)  # Python 3.12+
    if unshare is not None:
        try:
            unshare(CLONE_FS)
        except OSError as exc:
            raise _CwdNotPrivate(exc.errno, exc.strerror) from None
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(ctypes.c_int(CLONE_FS)) != 0:
        err = ctypes.get_errno()
        raise _CwdNotPrivate(err, os.strerror(err))
