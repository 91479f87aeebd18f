"""Session 8's audit, second round, in real jails: a proxy connection flood,
dnotify and fadvise on the host's files, locks on the host's /dev/null, and
pidfds of the gateway.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from jail import Worker
from jail.proxy import CONNECT_BURST, CONNECT_RATE_PER_S
from tests.hostile.test_audit_s8 import Recorder, _worker, workers  # noqa: F401 (fixture)
from tests.jailtest import Jail, body_json, describe, invocation

# ---- 1. a connection flood costs the gateway (almost) nothing ------------------------

# Body "flood": 8 forked children connect to the proxy socket and close, in a
# loop, for FLOOD_S; the parent waits for them. Any other body: three ctx.kv
# calls through the SDK.
FLOOD_S = 2.0
FLOOD = r"""
import os, socket, time

def handler(request, ctx):
    if request.body != b"flood":
        return {"kv": [ctx.kv.incr("n") for _ in range(3)]}
    kids = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            t0, n = time.monotonic(), 0
            while time.monotonic() - t0 < 2.0:  # FLOOD_S
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.settimeout(0.05)  # the backlog is full when the gateway stops accepting
                try:
                    s.connect("/run/nsfaas/proxy.sock")
                    n += 1
                except OSError:
                    pass
                s.close()
            os._exit(min(n, 255))
        kids.append(pid)
    return {"connected": sum(os.WEXITSTATUS(os.waitpid(p, 0)[1]) for p in kids)}
"""


async def test_a_connection_flood_is_accepted_only_within_the_budget(
    jail: Jail, workers: list[Worker]  # noqa: F811 (the fixture)
) -> None:
    """8 processes connecting and closing in a loop kept the gateway's event
    loop at 100% CPU (another tenant's p50 3.2 -> 77 ms with 4 such calls).
    Now the gateway accepts at most the invocation's connection budget and
    leaves the rest in the kernel's backlog; the next invocation's calls work."""
    rec = Recorder()
    w = await _worker(jail, workers, FLOOD, "warm", rec)
    assert w.proxy is not None
    cpu0, t0 = time.process_time(), time.monotonic()
    r = await w.invoke(invocation(b"flood"), start="warm")
    cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
    assert r.outcome == "ok", describe(r)
    # The gateway (this process) spent a fraction of the flood on it.
    assert cpu < 0.3 * wall, (cpu, wall, r.body)
    accepted = w.proxy.accepted
    assert accepted <= CONNECT_BURST + CONNECT_RATE_PER_S * wall + 2, (accepted, wall)
    after = w.proxy.accepted
    got = body_json(await w.invoke(invocation(b""), start="warm"))
    assert got == {"kv": [1, 2, 3]}, got
    assert w.proxy.accepted == after + 1  # the SDK's one connection


# ---- 2, 3, 6. dnotify, fadvise DONTNEED, the gateway's pidfd ---------------------------

POSIX_FADV_DONTNEED, POSIX_FADV_NOREUSE = 4, 5

KERNEL_KNOBS = r"""
import errno, fcntl, os, socket, struct

def outcome(f):
    try:
        f()
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

def handler(request, ctx):
    stdlib = os.path.dirname(os.__file__)
    out = {}
    for name, d in (("stdlib", stdlib), ("runtime", "/opt/nsfaas"), ("code", "/function")):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        out["notify " + name] = outcome(lambda: fcntl.fcntl(fd, 1026, 0x80000007))  # F_NOTIFY, DN_*
        os.close(fd)
    fd = os.open(os.path.join(stdlib, "pydoc.py"), os.O_RDONLY)
    for advice in (4, 5, os.POSIX_FADV_WILLNEED, os.POSIX_FADV_SEQUENTIAL):  # DONTNEED, NOREUSE
        out[f"fadvise {advice}"] = outcome(lambda: os.posix_fadvise(fd, 0, 0, advice))
    out["getfl"] = fcntl.fcntl(fd, fcntl.F_GETFL) & 3 == os.O_RDONLY
    os.close(fd)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect("/run/nsfaas/proxy.sock")
    out["peerpidfd"] = outcome(lambda: s.getsockopt(1, 77, 4))  # SO_PEERPIDFD
    out["passpidfd"] = outcome(lambda: s.setsockopt(1, 76, 1))  # SO_PASSPIDFD
    out["peercred"] = outcome(lambda: s.getsockopt(1, 17, 12))  # SO_PEERCRED
    s.close()
    a, b = socket.socketpair()
    out["peerpidfd own pair"] = outcome(lambda: a.getsockopt(1, 77, 4))
    return out
"""


@pytest.mark.parametrize("spec_mode", ["once", "warm"])
async def test_dnotify_fadvise_dontneed_and_pidfds_of_the_peer_are_refused(
    jail: Jail, workers: list[Worker], spec_mode: str  # noqa: F811
) -> None:
    """dnotify on a read-only bind watched the host's directory (every jail
    start, every stdlib import of other tenants); POSIX_FADV_DONTNEED evicted
    a bound host file from the host's page cache; SO_PEERPIDFD on the proxy
    connection (and SO_PASSPIDFD, SCM_PIDFD with each reply) gave a pidfd of
    the gateway. All EPERM now; the other advice values, F_GETFL and
    SO_PEERCRED are unchanged."""
    w = await _worker(jail, workers, KERNEL_KNOBS, spec_mode, Recorder())
    got = body_json(await w.invoke(invocation(b""), start="warm"))
    assert got == {
        "notify stdlib": "EPERM", "notify runtime": "EPERM", "notify code": "EPERM",
        f"fadvise {POSIX_FADV_DONTNEED}": "EPERM", f"fadvise {POSIX_FADV_NOREUSE}": "ok",
        f"fadvise {os.POSIX_FADV_WILLNEED}": "ok", f"fadvise {os.POSIX_FADV_SEQUENTIAL}": "ok",
        "getfl": True,
        "peerpidfd": "EPERM", "passpidfd": "EPERM", "peercred": "ok",
        "peerpidfd own pair": "EPERM",
    }, got


HOST_KNOBS = r"""
import fcntl, json, os, signal, sys
signal.signal(signal.SIGIO, signal.SIG_IGN)  # dnotify's signal: each event would kill
d = sys.argv[1]
fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
fcntl.fcntl(fd, 1026, 0x80000007)  # F_NOTIFY, DN_ACCESS | DN_MODIFY | DN_CREATE | DN_MULTISHOT
f = os.open(os.path.join(d, "pydoc.py"), os.O_RDONLY)
os.posix_fadvise(f, 0, 0, 5)  # NOREUSE
print(json.dumps({"uid": os.getuid(), "notify": "ok", "fadvise": "ok"}))
"""


def test_host_control_dnotify_works_for_the_jails_uid_without_the_filter() -> None:
    """As the jail's uid on the host, unfiltered, F_NOTIFY on the stdlib dir
    succeeds: the jail's EPERM comes from seccomp."""
    stdlib = subprocess.run(["/usr/bin/python3", "-I", "-S", "-c", "import os; print("
                             "os.path.dirname(os.__file__))"], capture_output=True,
                            text=True, check=True).stdout.strip()
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", HOST_KNOBS, stdlib],
        capture_output=True, text=True, timeout=60, user=65534, group=65534, extra_groups=[],
        cwd="/", check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"uid": 65534, "notify": "ok", "fadvise": "ok"}


EVICT = r"""
import os

def handler(request, ctx):
    fd = os.open(request.text(), os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, 4)  # POSIX_FADV_DONTNEED
        return {"errno": 0}
    except OSError as exc:
        return {"errno": exc.errno}
"""


def _resident_pages(path: str) -> int:
    out = subprocess.run(["fincore", "-n", "-b", "-o", "PAGES", path], capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
async def test_fadvise_dontneed_leaves_the_hosts_page_cache_alone(jail: Jail, mode: str) -> None:
    """A bound host file read on the host stays in its page cache after a
    jail's POSIX_FADV_DONTNEED (fincore showed 6 -> 0 pages)."""
    stdlib = [dst for _, dst in jail.runner.config.interpreter.binds
              if os.path.isfile(os.path.join(dst, "os.py"))]  # noqa: ASYNC240
    assert stdlib, jail.runner.config.interpreter.binds
    path = str(Path(stdlib[0], "pydoc.py"))
    Path(path).read_bytes()  # noqa: ASYNC240 (a few pages, into the page cache)
    before = _resident_pages(path)
    assert before > 0
    fn = jail.function(EVICT, mode)
    got = body_json(await fn(path))
    after = _resident_pages(path)  # others may read more of it meanwhile, never less
    assert (got, after >= before) == ({"errno": errno.EPERM}, True), (before, after)
    await fn.assert_recovers()


# ---- 4. locks on the jail's /dev/null are not the host's --------------------------------

LOCKS = r"""
import fcntl, os, struct, time

def handler(request, ctx):
    out = {}
    fd = os.open("/dev/null", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 0)
    ofd = os.open("/dev/null", os.O_RDWR)
    # F_OFD_SETLK (37): a write lock on bytes 200-299
    fcntl.fcntl(ofd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 200, 100, 0))
    out["locked"] = True
    time.sleep(1.5)
    for name, (major, minor) in {"null": (1, 3), "zero": (1, 5), "urandom": (1, 9)}.items():
        st = os.stat("/dev/" + name)
        out[name] = [os.major(st.st_rdev), os.minor(st.st_rdev), oct(st.st_mode)]
        out[name + " id"] = [st.st_dev, st.st_ino]
    z = os.open("/dev/zero", os.O_RDONLY)
    out["zero"].append(os.read(z, 8) == bytes(8))
    u = os.open("/dev/urandom", os.O_RDONLY)
    out["urandom"].append(len(os.read(u, 16)) == 16)
    out["null"].append(os.write(fd, b"x" * 100) == 100 and os.read(fd, 1) == b"")
    return out
"""


async def test_a_jails_locks_on_dev_null_do_not_lock_the_hosts(jail: Jail, mode: str) -> None:
    """flock, a POSIX (lockf) and an OFD range lock a jail held on /dev/null sat
    on the host's inode: host root's `flock -n /dev/null true` failed. The jail
    now has nodes of its own (same devices, mode 0666), so the host's locks
    never conflict with it, and /dev/null, /dev/zero, /dev/urandom still work."""
    fn = jail.function(LOCKS, mode)
    call = asyncio.create_task(fn())
    failures: list[str] = []
    checks = 0
    while not call.done():
        fd = os.open("/dev/null", os.O_RDWR)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                failures.append(f"flock: {exc}")
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 300, 0)
            except OSError as exc:
                failures.append(f"lockf: {exc}")
            checks += 1
        finally:
            os.close(fd)  # releases both
        await asyncio.sleep(0.05)
    got = body_json(call.result())
    assert got["locked"] is True, got
    assert checks > 10 and failures == [], (checks, failures[:3])
    host = os.stat("/dev/null")
    assert got["null id"] != [host.st_dev, host.st_ino], got
    assert got["null"] == [1, 3, oct(0o20666), True], got
    assert got["zero"] == [1, 5, oct(0o20666), True], got
    assert got["urandom"] == [1, 9, oct(0o20666), True], got
    await fn.assert_recovers()


def test_host_control_flock_on_dev_null_is_a_lock_on_the_host_inode(tmp_path: Path) -> None:
    """The host side of the check above sees a lock another process holds on
    /dev/null (so an empty failure list means the jail's were elsewhere)."""
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-I", "-S", "-c",
         "import fcntl, os, sys, time; fd = os.open('/dev/null', os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); open(sys.argv[1], 'w').close(); time.sleep(5)",
         str(ready)])
    try:
        for _ in range(100):
            if ready.exists():
                break
            time.sleep(0.05)
        fd = os.open("/dev/null", os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()
