"""Launchers that join a jail's cgroups before they are needed.

A jail's processes must be born inside its cgroup slot, so whatever execs
nsjail first writes its own pid into the slot's ``cgroup.procs`` files. On
cgroup v1 that write waits for an RCU grace period (the thread-group lock is
a per-CPU rwsem): ~12 ms here, with wide jitter, on every cold start. A
prepared launcher pays it ahead of time: a small process started into a free
slot that waits, already joined, for the nsjail command line and then execs
it. Taking one is a pipe write; the pool refills itself in the background.
When none is ready (a burst of cold starts, the first start) the worker uses
the plain ``sh`` launcher of ``command.py`` and pays the join itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from dataclasses import dataclass

import structlog

from . import cgroups as cg
from .spawn import Process, spawn

log = structlog.get_logger("nsfaas.jail")

# Fixed text; the cgroup.procs paths are arguments, the command comes on stdin
# (NUL-separated) and is never interpreted by a shell.
LAUNCHER = """\
import os, sys
pid = str(os.getpid())
for path in sys.argv[1:4]:
    with open(path, "w") as f:
        f.write(pid)
os.write(1, b"+")
data = sys.stdin.buffer.read()
if not data:
    sys.exit(0)
argv = data.split(b"\\0")
null = os.open("/dev/null", os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
os.execv(argv[0], argv)
"""


@dataclass(slots=True)
class Prepared:
    """A launcher waiting in ``slot`` with the jail's ends of its channels."""

    proc: Process
    slot: str
    ctl: socket.socket  # the gateway's end of the control channel
    ctl_fd: int  # the jail's end, as numbered inside the launcher
    log_r: int  # nsjail's log, read end
    log_fd: int  # nsjail's log, write end, as numbered inside the launcher

    def launch(self, argv: list[str]) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        # A few KiB into an empty pipe: the write never blocks.
        stdin.write(b"\0".join(os.fsencode(a) for a in argv))
        stdin.close()


class Launchers:
    """Up to ``spare`` prepared launchers (0 disables them)."""

    def __init__(
        self,
        python: str,
        slots: cg.SlotPool,
        *,
        spare: int = 2,
        limits: cg.SlotLimits | None = None,
    ) -> None:
        self.python = python
        self.slots = slots
        self.spare = spare
        # The usual function's limits, written ahead too: taking a launcher for
        # a function with exactly these limits then costs no cgroup writes.
        self.limits = limits
        self._ready: list[Prepared] = []
        self._refill: asyncio.Task[None] | None = None
        self._discards: set[asyncio.Task[None]] = set()
        self._closed = False
        self.failures = 0
        self.used = 0  # jail starts that found a prepared launcher

    @property
    def ready(self) -> int:
        return len(self._ready)

    @property
    def held(self) -> set[str]:
        """The slots that idle launchers occupy (each holds one waiting process)."""
        return {p.slot for p in self._ready}

    def take(self) -> Prepared | None:
        """A prepared launcher, or None; starts a refill either way."""
        if self._closed or self.spare <= 0:
            return None
        prepared = None
        while self._ready and prepared is None:
            p = self._ready.pop()
            if p.proc.returncode is None:
                prepared = p
            else:  # it died waiting: free its slot (the task is kept until it ends)
                task = asyncio.get_running_loop().create_task(self._discard(p))
                self._discards.add(task)
                task.add_done_callback(self._discards.discard)
        self.fill()
        if prepared is not None:
            self.used += 1
        return prepared

    def fill(self) -> None:
        """Start preparing launchers up to ``spare`` in the background."""
        if self._closed or self.spare <= 0 or self.failures >= 3:
            return
        if self._refill is None or self._refill.done():
            self._refill = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._ready) < self.spare and self.failures < 3:
            try:
                prepared = await self._prepare()
            except (OSError, asyncio.IncompleteReadError) as exc:
                self.failures += 1  # three in a row: stay on the plain launcher
                log.warning("launcher_prepare_failed", error=str(exc))
                continue
            if self._closed:
                await self._discard(prepared)
                return
            self.failures = 0
            self._ready.append(prepared)

    async def _prepare(self) -> Prepared:
        slot = self.slots.acquire_free(self.limits)
        if slot is None:  # mkdir of a new slot is slow: a thread
            slot = await asyncio.to_thread(self.slots.acquire, self.limits)
        try:
            host, jail = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            self.slots.release(slot)
            raise
        log_r, log_w = os.pipe()
        try:
            procs = [str(p) for p in self.slots.procs_files(slot)]
            procs += procs[-1:] * (3 - len(procs))
            proc = await spawn(
                [self.python, "-I", "-S", "-c", LAUNCHER, *procs[:3]],
                stdin=True,
                pass_fds=(jail.fileno(), log_w),
            )
        except OSError:
            host.close()
            os.close(log_r)
            self.slots.release(slot)
            raise
        finally:
            ctl_fd = jail.fileno()
            jail.close()
            os.close(log_w)
        prepared = Prepared(proc, slot, host, ctl_fd, log_r, log_w)
        try:
            assert proc.stdout is not None
            async with asyncio.timeout(10):
                if await proc.stdout.readexactly(1) != b"+":
                    raise OSError("the launcher did not join its cgroup")
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
            await self._discard(prepared)
            raise OSError(f"the launcher did not start: {exc}") from None
        return prepared

    async def _discard(self, p: Prepared) -> None:
        if p.proc.returncode is None:
            if p.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    p.proc.stdin.close()  # EOF: the launcher exits without exec
            try:
                await asyncio.wait_for(p.proc.wait(), 2.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.kill()
                await p.proc.wait()
        p.ctl.close()
        with contextlib.suppress(OSError):
            os.close(p.log_r)
        for _ in range(100):  # the exited launcher leaves the cgroup a moment later
            if not self.slots.pids_in(p.slot):
                break
            await asyncio.sleep(0.01)
        self.slots.release(p.slot)

    async def aclose(self) -> None:
        self._closed = True
        if self._refill is not None:
            await asyncio.gather(self._refill, return_exceptions=True)
        ready, self._ready = self._ready, []
        await asyncio.gather(
            *(self._discard(p) for p in ready), *self._discards, return_exceptions=True
        )
