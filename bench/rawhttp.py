"""A lean HTTP/1.1 load client: keep-alive connections over asyncio streams.

The soak's open-loop client must not be what falls behind. httpx spends
~2-3 ms of CPU per request; at 240 requests a second that is 0.6-0.8 of a
core, on a 2-core machine the soak saturates on purpose (fork bombs, CPU
loops). The jails' cgroup, the gateway and the client then share the cores
about equally, the client got less than it needed, and its backlog counted
as the gateway's latency (the session-9 soaks: p99 in seconds while the
gateway's own records said 1-50 ms). This client costs a tenth of that: a
request is one write, an answer a header read and a body read.

It speaks just what the soak needs: GET, a Content-Length or chunked answer,
keep-alive, and a connection dropped before its expiry so it never races the
server's idle close.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


class HTTPError(Exception):
    """Transport or framing failure (the soak counts it as a lost call)."""


@dataclass(slots=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(slots=True)
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    used: float


class RawClient:
    def __init__(
        self, host: str, port: int, headers: dict[str, str] | None = None,
        max_connections: int = 256, keepalive_expiry: float = 2.0, timeout: float = 60.0,
    ) -> None:
        self.host, self.port = host, port
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {host}:{port}\r\n{extra}\r\n".encode()
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(max_connections)
        self._expiry = keepalive_expiry
        self._timeout = timeout

    async def get(self, target: str) -> Answer:
        async with self._slots:
            conn = await self._connection()
            try:
                async with asyncio.timeout(self._timeout):
                    conn.writer.write(b"GET " + target.encode() + b" HTTP/1.1\r\n" + self._head)
                    answer, keep = await _read_answer(conn.reader)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError) as exc:
                conn.writer.close()
                raise HTTPError(f"{type(exc).__name__}: {exc}") from exc
            if keep:
                conn.used = time.monotonic()
                self._idle.append(conn)
            else:
                conn.writer.close()
            return answer

    async def _connection(self) -> _Conn:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if now - conn.used < self._expiry:
                return conn
            conn.writer.close()
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as exc:
            raise HTTPError(f"connect: {exc}") from exc
        return _Conn(reader, writer, now)

    async def aclose(self) -> None:
        for conn in self._idle:
            conn.writer.close()
        self._idle.clear()


async def _read_answer(reader: asyncio.StreamReader) -> tuple[Answer, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")  # no trailers are sent
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    keep = headers.get("connection", "").lower() != "close"
    return Answer(status, headers, body), keep
