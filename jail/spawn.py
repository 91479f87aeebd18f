"""Starting the jail's host-side processes without stalling the event loop.

``asyncio.create_subprocess_exec`` under uvloop forks the whole gateway: the
kernel copies its page tables (~5 ms for an 80 MB gateway here, longer as it
grows) while every request on the loop waits. ``subprocess.Popen`` uses
``vfork`` (the parent is suspended only until the child execs: ~0.5 ms). Its
pipes are wrapped in asyncio streams and its exit is watched through a pidfd,
so a ``Process`` here behaves like the asyncio one for what the jail needs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Sequence
from typing import IO


class Process:
    """A child process: ``returncode`` is set as soon as it exits (and it is reaped)."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdout: asyncio.StreamReader,
        stderr: asyncio.StreamReader,
    ) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.stdin: IO[bytes] | None = popen.stdin
        self.stdout = stdout
        self.stderr = stderr
        loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd = os.pidfd_open(popen.pid)
        loop.add_reader(self._pidfd, self._reap)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def _reap(self) -> None:
        if self._popen.poll() is None:
            return  # not yet a zombie (a spurious wake-up)
        asyncio.get_running_loop().remove_reader(self._pidfd)
        os.close(self._pidfd)
        if not self._exited.done():
            self._exited.set_result(self._popen.returncode)

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        if self._popen.returncode is not None:
            raise ProcessLookupError(self.pid)
        # Only _reap reaps it: until then the pid is this process's, even as a zombie.
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def read_some(fd: int) -> bytes | None:
    """One read of a non-blocking pipe: None if nothing is there yet, b"" at
    EOF or on an error (either way the writer is done)."""
    try:
        return os.read(fd, 65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def read_fd(fd: int) -> asyncio.StreamReader:
    """An asyncio stream over the read end of a pipe, which it owns: the fd is
    closed exactly once, at EOF (or a read error).

    Not ``loop.connect_read_pipe``: under uvloop it closes the fd twice, once
    through libuv and once through the file object (MagicStack/uvloop#763). The
    second close hit whatever had taken the fd number meanwhile: a blob being
    written (fsync: EBADF), a jail's result pipe, a pidfd, a launcher's pipe.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    os.set_blocking(fd, False)

    def readable() -> None:
        data = read_some(fd)
        if data is None:
            return
        if data:
            reader.feed_data(data)
            return
        loop.remove_reader(fd)
        os.close(fd)
        reader.feed_eof()

    loop.add_reader(fd, readable)
    return reader


async def spawn(argv: Sequence[str], *, stdin: bool, pass_fds: Sequence[int]) -> Process:
    """Start ``argv`` in a new session with piped stdout and stderr (and stdin
    if asked; /dev/null otherwise), passing ``pass_fds`` and closing the rest."""
    # Plain fds, not Popen's file objects: each end is closed once, by its owner.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        # Blocking on purpose: vfork returns as soon as the child execs (see above).
        popen = subprocess.Popen(  # noqa: S603, ASYNC220 (fixed host programs, no shell)
            list(argv),
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            pass_fds=tuple(pass_fds),
            start_new_session=True,
        )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        return Process(popen, read_fd(out_r), read_fd(err_r))
    except BaseException:
        popen.kill()
        popen.wait()
        raise
