"""Upload checking in a process of its own.

Checking an upload tokenizes and parses every ``.py`` file (``gateway.upload``;
nothing is imported or run) and deflates the archive the store keeps: about
0.6 s of CPU per 100 KB of Python, up to ~10 s for the largest upload. In the
gateway's process that held the interpreter lock, so every request and
invocation of every tenant slowed down while one tenant's upload was checked
(three at once: 20x). Here it runs in one long-lived child process (a fresh
interpreter, started with ``vfork``+``exec``, not a fork of the gateway's
threads) at a lower CPU priority, under an address-space limit and a time
limit: the gateway only waits for a pipe, in a thread.

The protocol, both ways: a 4-byte big-endian length, a JSON header, then raw
bytes whose sizes the header gives. The gateway never unpickles what the
child says (the child has parsed hostile input).

A check that runs out of time or memory, or ends its process, is refused as
413 ``too_complex``, and the process is replaced before the next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any, cast

from .upload import UploadError, UploadErrorCode, UploadLimits

__all__ = ["CheckerPool", "CodeChecker"]

# Under contention the checker yields to the gateway and the jails: an upload
# waits a little longer, calls do not.
CHECKER_NICE = 10
_LEN = struct.Struct(">I")
_ROOT = str(Path(__file__).resolve().parent.parent)  # where the gateway package is


class CheckerGone(Exception):
    """The checker process ended (killed, crashed, out of memory) mid-check."""


def _write(out: IO[bytes], header: dict[str, Any], *blobs: bytes) -> None:
    raw = json.dumps(header, default=str).encode()
    out.write(_LEN.pack(len(raw)) + raw)
    for blob in blobs:
        out.write(blob)
    out.flush()


def _read_exact(src: IO[bytes], n: int) -> bytes:
    data = src.read(n)
    if data is None or len(data) != n:
        raise CheckerGone
    return data


def _read(src: IO[bytes]) -> dict[str, Any]:
    (n,) = _LEN.unpack(_read_exact(src, _LEN.size))
    header = json.loads(_read_exact(src, n))
    if not isinstance(header, dict):
        raise CheckerGone
    return header


class CodeChecker:
    """One checker process, started at its first check and replaced after a
    check it could not finish. Its checks run one at a time."""

    def __init__(self, *, timeout_s: float, memory_mb: int) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = asyncio.Lock()
        self._io = threading.Lock()  # a killed check's thread may still be reading

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            # No preexec_fn: vfork, not a copy of the gateway. Our own program.
            self._proc = subprocess.Popen(  # noqa: S603
                [sys.executable, "-I", "-c",
                 f"import sys; sys.path.insert(0, {_ROOT!r}); "
                 "from gateway.checker import serve; serve()", str(self.memory_mb)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                close_fds=True,
            )
        return self._proc

    def _roundtrip(self, header: dict[str, Any], payload: bytes) -> tuple[bytes, int]:
        with self._io:
            proc = self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                _write(proc.stdin, header, payload)
                reply = _read(proc.stdout)
                if reply.get("ok") is True:
                    blob = _read_exact(proc.stdout, int(reply["zip_bytes"]))
                    return blob, int(reply["disk_bytes"])
            except (OSError, ValueError, KeyError, TypeError, struct.error):
                raise CheckerGone from None
        if reply.get("ok") is False and isinstance(reply.get("code"), str):
            detail = reply.get("detail")
            raise UploadError(cast(UploadErrorCode, reply["code"]), str(reply.get("message", "")),
                              detail if isinstance(detail, dict) else None)
        if reply.get("ok") == "memory":
            raise MemoryError
        raise CheckerGone

    async def check(
        self, source: bytes | None, archive: bytes | None, entrypoint: str, limits: UploadLimits
    ) -> tuple[bytes, int]:
        """The zip the store keeps and the bytes its unpacked code may take on
        disk (``CodeBundle.disk_bytes``); UploadError if the code is refused."""
        payload = source if source is not None else archive
        assert payload is not None
        header: dict[str, Any] = {
            "kind": "source" if source is not None else "archive",
            "entrypoint": entrypoint,
            "limits": dataclasses.asdict(limits),
            "size": len(payload),
        }
        async with self._lock:
            try:
                return await asyncio.wait_for(
                    asyncio.to_thread(self._roundtrip, header, payload), self.timeout_s
                )
            except TimeoutError:
                self.close()
                raise UploadError(
                    "too_complex",
                    f"checking the code took over {self.timeout_s:g} s",
                    {"limit_s": self.timeout_s},
                ) from None
            except MemoryError:
                self.close()  # it survived, but with a heap at its limit
                raise UploadError(
                    "too_complex",
                    f"checking the code needed over {self.memory_mb} MiB",
                    {"limit_mb": self.memory_mb},
                ) from None
            except CheckerGone:
                self.close()
                raise UploadError(
                    "too_complex", "the code checker's process ended while checking this code"
                ) from None
            except asyncio.CancelledError:
                # The gateway is stopping (or the request was cancelled): the
                # check may run for seconds more; end it with the request.
                self.close()
                raise

    def close(self) -> None:
        """Kill the process (a check in progress ends with it)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        # Reaped by the thread below, not here: this may run on the event loop.
        threading.Thread(target=_reap, args=(proc,), daemon=True).start()


class CheckerPool:
    """A few checkers; a check takes a free one. Callers queue per tenant
    first (one check of a tenant at a time), so one tenant holding a checker
    with uploads that take the whole time limit, again and again (an 8.8 MB
    zip of slow-to-parse f-strings: 60 s each), holds one, not all: another
    tenant's upload waited 55 s behind a single checker. The most recently
    used free checker goes first: under light load one process does all."""

    def __init__(self, size: int, *, timeout_s: float, memory_mb: int) -> None:
        self.checkers = [CodeChecker(timeout_s=timeout_s, memory_mb=memory_mb)
                         for _ in range(size)]
        self._free: asyncio.LifoQueue[CodeChecker] | None = None

    @property
    def pids(self) -> set[int]:
        return {c.pid for c in self.checkers if c.pid is not None}

    async def check(
        self, source: bytes | None, archive: bytes | None, entrypoint: str, limits: UploadLimits
    ) -> tuple[bytes, int]:
        """``CodeChecker.check`` on a free checker (waiting for one, in turn)."""
        if self._free is None:  # made on the loop that uses it
            self._free = asyncio.LifoQueue()
            for checker in reversed(self.checkers):
                self._free.put_nowait(checker)
        checker = await self._free.get()
        try:
            return await checker.check(source, archive, entrypoint, limits)
        finally:
            self._free.put_nowait(checker)

    def close(self) -> None:
        for checker in self.checkers:
            checker.close()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        proc.wait(30)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


# -- the child -----------------------------------------------------------------------------


def serve() -> None:
    """The checker process: ``argv[1]`` is its memory limit in MiB."""
    import ctypes
    import gc
    import resource
    import signal

    # The gateway's Ctrl-C reaches its whole process group; the gateway, not
    # this child, decides what happens to a check in progress.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(CHECKER_NICE)
    limit = int(sys.argv[1]) * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc: Any = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    src, out = sys.stdin.buffer, sys.stdout.buffer
    while True:
        try:
            header = _read(src)
        except CheckerGone:
            return  # the gateway closed the pipe
        payload = _read_exact(src, int(header["size"]))
        reply, blob = _check_one(header, payload)
        _write(out, reply, blob)
        del payload, blob
        # Give a large check's heap back (pymalloc frees empty arenas; glibc
        # keeps the rest until asked).
        gc.collect()
        if libc is not None:
            libc.malloc_trim(0)


def _check_one(header: dict[str, Any], payload: bytes) -> tuple[dict[str, Any], bytes]:
    from .upload import bundle_from_source, bundle_from_zip

    limits = UploadLimits(**header["limits"])
    check = bundle_from_source if header["kind"] == "source" else bundle_from_zip
    try:
        bundle = check(payload, entrypoint=header["entrypoint"], limits=limits)
        blob = bundle.to_zip()
    except UploadError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message, "detail": exc.detail}, b""
    except MemoryError:
        return {"ok": "memory"}, b""
    return {"ok": True, "zip_bytes": len(blob), "disk_bytes": bundle.disk_bytes()}, blob
