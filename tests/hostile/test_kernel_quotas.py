"""Per-user kernel counters that every jail shares with the host's root.

nsjail (root) creates each jail's user namespace, and the kernel's ucounts
charge a namespace's processes to its creator too: a jail's pending signals
and inotify instances counted against root's own limits. One invocation could
queue ~96k real-time signals (root's RLIMIT_SIGPENDING: host root's sigqueue
then failed with EAGAIN) or take all 128 inotify instances (root's
inotify_init failed with EMFILE). The zygote now lowers RLIMIT_SIGPENDING,
soft and hard, before anything of the function runs, and seccomp refuses
inotify_init/inotify_init1.
"""

from __future__ import annotations

import asyncio
import errno
from dataclasses import replace
from pathlib import Path

from tests.jailtest import FAST, Jail, body_json, jail_uid_processes

SIGPENDING = 64  # the zygote's limit (jail/runtime/bootstrap.py)

SIGQUEUE = """
import ctypes, os, resource, signal, time

libc = ctypes.CDLL(None, use_errno=True)

class sigval(ctypes.Union):
    _fields_ = [("i", ctypes.c_int), ("p", ctypes.c_void_p)]

def fill():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGRTMIN])
    n = 0
    while n < 200000 and libc.sigqueue(os.getpid(), signal.SIGRTMIN, sigval(0)) == 0:
        n += 1
    return n, ctypes.get_errno()

def handler(request, ctx):
    limit = list(resource.getrlimit(resource.RLIMIT_SIGPENDING))
    try:
        resource.setrlimit(resource.RLIMIT_SIGPENDING, (100000, 100000))
        raised = "raised"
    except (ValueError, OSError) as e:
        raised = type(e).__name__
    # Three processes at once: the limit is on the jail's one counter.
    r, w = os.pipe()
    kids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            n, _ = fill()
            os.write(w, n.to_bytes(4, "little"))
            time.sleep(0.5)  # hold them while the others queue theirs
            os._exit(0)
        kids.append(pid)
    own, err = fill()
    others = [int.from_bytes(os.read(r, 4), "little") for _ in kids]
    for pid in kids:
        os.waitpid(pid, 0)
    return {"limit": limit, "raise": raised, "own": own, "errno": err, "others": others}
"""


async def test_pending_signals_are_capped_per_jail(jail: Jail, mode: str) -> None:
    fn = jail.function(SIGQUEUE, mode)
    got = body_json(await fn())
    assert got["limit"] == [SIGPENDING, SIGPENDING], got
    assert got["raise"] == "ValueError", got  # above the hard limit
    assert got["errno"] == errno.EAGAIN, got
    # The jail's processes share one count (one uid in one user namespace).
    assert 0 < got["own"] + sum(got["others"]) <= SIGPENDING, got
    await fn.assert_recovers()
    got = body_json(await fn())  # nothing left pending from the last call
    assert got["limit"] == [SIGPENDING, SIGPENDING], got
    assert 0 < got["own"] + sum(got["others"]) <= SIGPENDING, got


INOTIFY = """
import ctypes

def handler(request, ctx):
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, call in (("inotify_init", lambda: libc.inotify_init()),
                       ("inotify_init1", lambda: libc.inotify_init1(0))):
        ctypes.set_errno(0)
        rc = call()
        out[name] = [rc, ctypes.get_errno() if rc < 0 else 0]
    return out
"""


async def test_inotify_instances_are_refused(jail: Jail, mode: str) -> None:
    fn = jail.function(INOTIFY, mode)
    got = body_json(await fn())
    assert got == {"inotify_init": [-1, errno.EPERM], "inotify_init1": [-1, errno.EPERM]}, got
    if mode == "warm":
        assert fn.alive
    await fn.assert_recovers()


# One jail raises its outside uid's pipe-buffer count past fs.pipe-user-pages-soft
# (16,384 pages here) and holds it: four processes, 25 pipes each, each pipe
# resized to 1 MiB (the count is charged at resize, no memory needed).
PIPE_HOG = """
import fcntl, os, time

def hold(n):
    pipes = []
    for _ in range(n):
        r, w = os.pipe()
        try:
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ
        except OSError:
            break
        pipes.append((r, w))
    return pipes

def handler(request, ctx):
    kids = []
    for _ in range(3):
        pid = os.fork()
        if pid == 0:
            held = hold(25)
            time.sleep(3)
            os._exit(0)
        kids.append(pid)
    held = hold(25)
    time.sleep(0.5)  # every process has resized what it could
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 1 << 20)
        over = False
    except OSError:
        over = True  # this jail's uid is past the soft limit (the positive control)
    time.sleep(2.5)
    for pid in kids:
        os.waitpid(pid, 0)
    return {"over": over}
"""

PIPE_USER = """
import fcntl, os

def handler(request, ctx):
    r, w = os.pipe()
    default = fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ of a new pipe
    try:
        grown = fcntl.fcntl(w, 1031, 1 << 20)
    except OSError as e:
        grown = -e.errno
    return {"default": default, "grown": grown}
"""


async def test_pipe_buffers_of_one_jail_do_not_shrink_anothers(jail: Jail, mode: str) -> None:
    """Pipe buffers are counted per outside uid. When every jail ran as uid
    65534, one jail holding 100 pipes of 1 MiB put that uid over the soft
    limit, and every other tenant's jail then got one-page pipes that could not
    grow (F_SETPIPE_SZ: EPERM). Each jail now has its own outside uid."""
    hog = jail.function(PIPE_HOG, mode, limits=replace(FAST, timeout_s=10.0))
    user = jail.function(PIPE_USER, mode)
    assert body_json(await user()) == {"default": 65536, "grown": 1 << 20}
    held = asyncio.create_task(hog())
    await asyncio.sleep(1.5)  # the hog holds its pipes for 3 s
    got = body_json(await user())
    assert body_json(await held) == {"over": True}
    assert got == {"default": 65536, "grown": 1 << 20}, got
    await hog.assert_recovers()


WHO = """
import os, time

def handler(request, ctx):
    time.sleep(float(request.query.get("s", "0")))
    return {"ids": [os.getuid(), os.geteuid(), os.getgid()], "pid": os.getpid()}
"""


async def test_each_jail_has_its_own_outside_uid(jail: Jail) -> None:
    """Two warm workers and a cold jail, alive at once: 65534 inside each,
    three different uids outside, each its cgroup slot's."""
    slots = jail.runner.config.slots
    a, b = jail.function(WHO, "warm"), jail.function(WHO + "#b", "warm")
    assert body_json(await a())["ids"] == [65534] * 3
    assert body_json(await b())["ids"] == [65534] * 3
    cold = asyncio.create_task(jail.cold(WHO, query_string="s=1"))
    outside = {}
    for fn in (a, b):
        w = fn.worker
        assert w is not None and w.jail_pid is not None and w.slot is not None
        uid = _uid(w.jail_pid)
        assert uid == slots.uid(w.slot) and uid != 65534, uid
        outside[w.jail_pid] = uid
    await asyncio.sleep(0.5)
    others = [p for p, _ in jail_uid_processes().items() if p not in outside]
    outside.update({p: _uid(p) for p in others})
    assert body_json(await cold)["ids"] == [65534] * 3
    # the cold jail's processes share one uid that neither worker has
    assert len(set(outside.values())) >= 3, outside
    await a.assert_recovers()


def _uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("Uid:")))
