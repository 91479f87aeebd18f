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

import errno

from tests.jailtest import Jail, body_json

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
