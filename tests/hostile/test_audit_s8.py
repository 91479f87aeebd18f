"""Session 8's audit, in real jails: a lingering child's proxy calls, Linux AIO,
host-wide syscalls (sync, sysinfo, core scheduling, the LDT), the device
nodes' inodes, and the proxy socket's address.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from jail import JailRunner, Worker
from jail.proxy import CallContext, ProxyCallError
from tests.hostile.test_seccomp import PROBE, host_answers
from tests.jailtest import FAST, Jail, body_json, describe, invocation

# ---- 1. a child that answered early never speaks for the next invocation ---------

# Invocation "attack" writes its whole answer at once (the gateway answers on
# it), then keeps calling the proxy's `log` on fresh raw connections for
# 0.4 s, until the zygote kills it (EXIT_GRACE_S, 0.5 s). Any other body:
# five ctx.kv.incr calls through the SDK, and what each returned.
LINGER = r"""
import json, os, socket, struct, time
import _frames

def frame(i, message):
    head = json.dumps({"v": 1, "id": i, "method": "log",
                       "params": {"level": "warning", "message": message, "fields": {}}}).encode()
    return struct.pack(">II", len(head), 0) + head

def handler(request, ctx):
    if request.body == b"attack":
        os.write(3, _frames.encode({"kind": "ok", "status": 200, "headers": []}, b"early"))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.4:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("/run/nsfaas/proxy.sock")
                for i in range(50):
                    s.sendall(frame(i, "INJECTED by " + ctx.invocation_id))
                    hlen, blen = struct.unpack(">II", s.recv(8))
                    s.recv(hlen)
                s.close()
            except OSError:
                pass
        return "never"
    got = []
    for _ in range(5):
        try:
            got.append(ctx.kv.incr("n"))
        except Exception as exc:
            got.append(getattr(exc, "code", repr(exc)))
    return {"kv": got}
"""


class Recorder:
    """The gateway's side of the proxy, cut down: who called what."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []  # (invocation id, method, message)
        self.counter = 0

    async def __call__(self, ctx: CallContext, method: str, params: dict[str, Any],
                       body: bytes) -> tuple[dict[str, Any], bytes]:
        self.seen.append((ctx.invocation_id, method, str(params.get("message", ""))))
        if method == "log":
            return {}, b""
        if method == "kv.incr":
            self.counter += 1
            return {"value": self.counter}, b""
        raise ProxyCallError("unknown_method", method)


@pytest.fixture
async def workers(runner: JailRunner) -> AsyncIterator[list[Worker]]:
    started: list[Worker] = []
    try:
        yield started
    finally:
        for w in started:
            await w.aclose(kill=True)


async def _worker(jail: Jail, workers: list[Worker], source: str, mode: str,
                  handler: Recorder, **kw: Any) -> Worker:
    w = Worker(jail.runner.config, jail.spec(source, FAST, mode=mode), proxy_handler=handler,
               **kw)
    workers.append(w)
    async with asyncio.timeout(15):
        await w.start()
    return w


async def test_a_child_that_answered_early_never_speaks_for_the_next_invocation(
    jail: Jail, workers: list[Worker]
) -> None:
    """Its new connections after its answer get no_invocation: none of its log
    lines lands in the next invocation's record, and it spends none of the
    next invocation's rate budget (50 calls/s here, bursts of 100: the
    attacker alone makes thousands)."""
    rec = Recorder()
    w = await _worker(jail, workers, LINGER, "warm", rec, proxy_rate_per_s=50.0)
    attack, victim = invocation(b"attack"), invocation(b"")
    r1 = await w.invoke(attack, start="warm")
    assert (r1.outcome, r1.body) == ("ok", b"early"), describe(r1)
    assert w.proxy is not None
    calls = w.proxy.calls
    r2 = await w.invoke(victim, start="warm")
    assert body_json(r2) == {"kv": [1, 2, 3, 4, 5]}, describe(r2)
    in_victim = [s for s in rec.seen if s[0] == victim.invocation_id]
    assert [s[1] for s in in_victim] == ["kv.incr"] * 5, in_victim[:5]
    # The attack did run (its calls reached the proxy, as no_invocation) ...
    assert w.proxy.calls - calls - 5 > 100
    # ... and none of them was served, in its own name or another's.
    assert not [s for s in rec.seen if "INJECTED" in s[2]]
    r3 = await w.invoke(invocation(b""), start="warm")
    assert body_json(r3) == {"kv": [6, 7, 8, 9, 10]}, describe(r3)


# ---- 2, 3. the new seccomp denials ---------------------------------------------

# name -> (nr, args, errno from the policy); arguments as in test_seccomp.
PR_SCHED_CORE, PR_SCHED_CORE_GET, PR_SCHED_CORE_SHARE_TO = 62, 0, 2
NEW_DENIALS: dict[str, tuple[int, list[Any], int]] = {
    # Linux AIO: fs.aio-nr is one counter for the whole host.
    "io_setup": (206, [1, 0], errno.ENOSYS),  # NULL context pointer: EFAULT unfiltered
    "io_destroy": (207, [0], errno.ENOSYS),
    "io_getevents": (208, [0, 0, 0, 0, 0], errno.ENOSYS),
    "io_submit": (209, [0, 0, 0], errno.ENOSYS),
    "io_cancel": (210, [0, 0, 0], errno.ENOSYS),
    "io_pgetevents": (333, [0, 0, 0, 0, 0, 0], errno.ENOSYS),
    # Host-wide: the machine's thread count, load and free memory.
    "sysinfo": (99, ["buf"], errno.ENOSYS),
    "modify_ldt": (154, [0, "buf", 16], errno.EPERM),  # a read of the (empty) LDT
    "sync": (162, [], errno.EPERM),
    "syncfs": (306, [-1], errno.EPERM),
    "prctl_sched_core_get": (157, [PR_SCHED_CORE, PR_SCHED_CORE_GET, 0, 0, "buf"], errno.EPERM),
    "prctl_sched_core_share_to_pid1": (
        157, [PR_SCHED_CORE, PR_SCHED_CORE_SHARE_TO, 1, 0, 0], errno.EPERM),
}


@pytest.mark.parametrize("name", sorted(NEW_DENIALS))
async def test_new_denied_syscall(jail: Jail, mode: str, name: str) -> None:
    nr, args, expected = NEW_DENIALS[name]
    fn = jail.function(PROBE, mode)
    got = body_json(await fn(json.dumps({"nr": nr, "args": args})))
    assert got == {"result": [-1, expected], "alive": True}, (name, got)
    await fn.assert_recovers()


def test_host_control_the_new_answers_come_from_seccomp() -> None:
    """Unfiltered, as the jail's uid on the host, none of these calls gives the
    jail's answer (sync and sysinfo even succeed), except SHARE_TO pid 1,
    which the host refuses an unprivileged caller too (pid 1 is root's)."""
    host = host_answers(NEW_DENIALS)
    same = sorted(n for n, (_, _, want) in NEW_DENIALS.items() if host[n] == [-1, want])
    assert same in ([], ["prctl_sched_core_share_to_pid1"]), {n: host[n] for n in same}
    assert host["sync"] == [0, 0] and host["sysinfo"] == [0, 0]


AIO_HOG = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def handler(request, ctx):
    got = []
    for _ in range(8):
        c = ctypes.c_ulong(0)
        ctypes.set_errno(0)
        rc = libc.syscall(ctypes.c_long(206), ctypes.c_long(4096), ctypes.byref(c))
        got.append([rc, ctypes.get_errno() if rc == -1 else 0])
    time.sleep(1.0)  # an AIO context lives as long as its process: hold them
    return got
"""


async def test_aio_reserves_nothing_of_the_host_counter(jail: Jail, mode: str) -> None:
    """fs.aio-nr is the host's: one jail took all 65536 and host root's
    io_setup failed with EAGAIN. Now io_setup answers ENOSYS and the counter
    does not move while the function runs."""
    counter = Path("/proc/sys/fs/aio-nr")
    before = int(counter.read_text())  # noqa: ASYNC240 (procfs: never blocks)
    fn = jail.function(AIO_HOG, mode)
    call = asyncio.create_task(fn())
    peak = before
    while not call.done():
        peak = max(peak, int(counter.read_text()))  # noqa: ASYNC240
        await asyncio.sleep(0.02)
    assert body_json(call.result()) == [[-1, errno.ENOSYS]] * 8
    assert peak < before + 4096, (before, peak)
    await fn.assert_recovers()


WHAT_STILL_WORKS = """
import ctypes, errno, os

def handler(request, ctx):
    def outcome(f):
        try:
            return ["ok", f()]
        except OSError as exc:
            return [errno.errorcode.get(exc.errno, exc.errno), None]
    path = "/tmp/data"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    os.write(fd, b"x" * 4096)
    libc = ctypes.CDLL(None, use_errno=True)
    name = ctypes.create_string_buffer(b"renamed")
    return {
        "fsync": outcome(lambda: os.fsync(fd)),
        "fdatasync": outcome(lambda: os.fdatasync(fd)),
        "phys_pages": outcome(lambda: os.sysconf("SC_PHYS_PAGES")),
        "avphys_pages": outcome(lambda: os.sysconf("SC_AVPHYS_PAGES")),
        "phys_pages_by_number": outcome(lambda: os.sysconf(os.sysconf_names["SC_PHYS_PAGES"])),
        "page_size": outcome(lambda: os.sysconf("SC_PAGE_SIZE") > 0),
        "cpu_count": os.cpu_count() is not None and os.cpu_count() >= 1,
        "prctl_set_name": libc.prctl(15, name, 0, 0, 0),  # PR_SET_NAME: prctl as such works
        "sorted": sorted(range(20000, 0, -1))[:3],
    }
"""


async def test_what_a_function_still_has(jail: Jail, mode: str) -> None:
    """fsync/fdatasync of its own files, prctl other than core scheduling, the
    CPU count and page size. sysconf's physical/available pages, which glibc
    derives from sysinfo (and from an uninitialised struct when sysinfo
    fails: a huge negative number), raise OSError(ENOSYS) instead."""
    fn = jail.function(WHAT_STILL_WORKS, mode)
    got = body_json(await fn())
    assert got == {
        "fsync": ["ok", None], "fdatasync": ["ok", None],
        "phys_pages": ["ENOSYS", None], "avphys_pages": ["ENOSYS", None],
        "phys_pages_by_number": ["ENOSYS", None],
        "page_size": ["ok", True], "cpu_count": True,
        "prctl_set_name": 0, "sorted": [1, 2, 3],
    }, got
    await fn.assert_recovers()


# ---- 4. the device nodes are read-only binds --------------------------------------

DEVICES = """
import errno, os

def handler(request, ctx):
    def outcome(f):
        try:
            f()
            return "ok"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, str(exc.errno))
    def write(path):
        fd = os.open(path, os.O_WRONLY)
        try:
            assert os.write(fd, b"x" * 1000) == 1000
        finally:
            os.close(fd)
    def read(path):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert len(os.read(fd, 64)) == 64
        finally:
            os.close(fd)
    out = {"write /dev/null": outcome(lambda: write("/dev/null")),
           "read /dev/zero": outcome(lambda: read("/dev/zero")),
           "read /dev/urandom": outcome(lambda: read("/dev/urandom")),
           "read /dev/null": outcome(lambda: os.read(os.open("/dev/null", os.O_RDONLY), 1))}
    for path in ("/dev/null", "/dev/zero", "/dev/urandom"):
        out[path] = [outcome(lambda: os.utime(path)),
                     outcome(lambda: os.chmod(path, 0o600)),
                     outcome(lambda: os.chown(path, 65534, 65534)),
                     outcome(lambda: os.setxattr(path, "user.x", b"1"))]
    return out
"""


async def test_device_nodes_work_but_their_host_inodes_cannot_change(
    jail: Jail, mode: str
) -> None:
    """Reads and writes still work (a character device ignores the mount's
    read-only flag for I/O); the inode cannot change: utime on the writable
    bind changed the host's /dev/null mtime, which every other jail (and the
    host) could read."""
    host_before = os.stat("/dev/null")
    fn = jail.function(DEVICES, mode)
    got = body_json(await fn())
    assert got == {
        "write /dev/null": "ok", "read /dev/zero": "ok", "read /dev/urandom": "ok",
        "read /dev/null": "ok",
        **{p: ["EROFS"] * 4 for p in ("/dev/null", "/dev/zero", "/dev/urandom")},
    }, got
    host_after = os.stat("/dev/null")
    assert (host_after.st_mtime_ns, host_after.st_mode) == (
        host_before.st_mtime_ns, host_before.st_mode)
    await fn.assert_recovers()


# ---- 5. the proxy socket's address shows no host path --------------------------------

PEER = """
import socket

def handler(request, ctx):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/nsfaas/proxy.sock")
    try:
        return {"peer": s.getpeername(), "own": s.getsockname()}
    finally:
        s.close()
"""


@pytest.mark.parametrize("spec_mode", ["once", "warm"])
async def test_the_proxy_sockets_address_shows_no_host_path(
    jail: Jail, workers: list[Worker], spec_mode: str
) -> None:
    """getpeername() gave the host path <data dir>/jail/sock/<secret>/proxy.sock."""
    rec = Recorder()
    w = await _worker(jail, workers, PEER, spec_mode, rec)
    assert w.proxy is not None
    got = body_json(await w.invoke(invocation(b""), start="warm"))
    assert got == {"peer": "proxy.sock", "own": ""}, got
    assert w.proxy.dir.name not in json.dumps(got)
