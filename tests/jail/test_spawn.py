"""jail.spawn: host processes started with vfork and watched through a pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import pytest

from jail.spawn import spawn

CHILD = """
import os, sys
line = sys.stdin.readline().strip()
print("out:" + line, flush=True)
print("err", file=sys.stderr, flush=True)
os.write(int(sys.argv[1]), b"fd\\n")
sys.exit(3)
"""
PROBE = """
import os, sys, time
try:
    os.write(int(sys.argv[1]), b"leak")
except OSError:
    print("closed", flush=True)
time.sleep(30)
"""


async def test_pipes_exit_status_and_passed_fds() -> None:
    r, w = os.pipe()
    try:
        proc = await spawn(
            [sys.executable, "-c", CHILD, str(w)],
            stdin=True,
            pass_fds=(w,),
        )
    finally:
        os.close(w)
    assert proc.stdin is not None
    proc.stdin.write(b"hello\n")
    proc.stdin.close()
    assert await proc.stdout.read() == b"out:hello\n"
    assert await proc.stderr.read() == b"err\n"
    assert await proc.wait() == 3
    assert proc.returncode == 3
    assert os.read(r, 100) == b"fd\n"
    os.close(r)


async def test_exit_is_noticed_without_a_wait() -> None:
    proc = await spawn(["/bin/true"], stdin=False, pass_fds=())
    for _ in range(500):  # the pidfd wakes the loop, which reaps it
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.01)
    assert proc.returncode == 0
    with pytest.raises(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)  # reaped: its pid may belong to someone else now


async def test_kill_and_unpassed_fds_stay_closed() -> None:
    r, w = os.pipe()
    proc = await spawn(
        [sys.executable, "-c", PROBE, str(w)],
        stdin=False,
        pass_fds=(),
    )
    os.close(w)
    assert await proc.stdout.readline() == b"closed\n"
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), 5) == -signal.SIGKILL
    os.close(r)


def test_each_pipe_is_closed_once_under_uvloop() -> None:
    """The gateway runs on uvloop, whose connect_read_pipe closed a pipe's fd
    twice (MagicStack/uvloop#763): once at EOF and again when the file object
    went. By then the number belonged to something else (a blob being written,
    a jail's result pipe): EBADF in fsync, lost results, leaked zombies."""
    import gc

    import uvloop

    async def main() -> list[int]:
        before = len(os.listdir("/proc/self/fd"))
        proc = await spawn([sys.executable, "-c", "print('hi')"], stdin=False, pass_fds=())
        assert proc.stdout is not None and proc.stderr is not None
        assert await proc.stdout.read() == b"hi\n"
        assert await proc.stderr.read() == b""
        assert await proc.wait() == 0
        for _ in range(3):
            await asyncio.sleep(0)
        # Closed at EOF by their one owner, while the Process is still alive:
        # nothing is left for a file object or a transport to close later.
        assert len(os.listdir("/proc/self/fd")) == before
        # Take the freed numbers, then let go of everything of the process.
        mine = [os.open("/dev/null", os.O_RDONLY) for _ in range(8)]
        del proc
        gc.collect()
        for _ in range(3):
            await asyncio.sleep(0.01)
        return mine

    loop = uvloop.new_event_loop()
    try:
        mine = loop.run_until_complete(main())
    finally:
        loop.close()
    gc.collect()
    try:
        for fd in mine:
            os.fstat(fd)  # EBADF: someone else's close took it
    finally:
        for fd in mine:
            with contextlib.suppress(OSError):
                os.close(fd)
