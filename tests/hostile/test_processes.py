"""Hostile functions against processes and identity: daemons that try to
outlive the invocation, signals to everything, privilege changes, nested
namespaces, exits that are not results."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from jail import Limits
from jail.cgroups import is_jail_uid
from tests.jailtest import (
    GOOD,
    Jail,
    ancestors,
    body_json,
    describe,
    gone,
    invocation,
    jail_uid_processes,
    processes_with,
)

DAEMON = """
import os, time

def handler(request, ctx):
    marker = request.text()
    pid = os.fork()
    if pid == 0:
        os.setsid()
        if os.fork() == 0:
            # a real daemon: new session, std fds on /dev/null, the pipes closed
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1024)
            os.execv("/usr/bin/python3", ["python3", "-I", "-S", "-c",
                     "import time\\nwhile True: time.sleep(0.05)", marker])
        os._exit(0)
    os.waitpid(pid, 0)  # the middle process is gone: the daemon is an orphan now
    time.sleep(float(request.headers.get("x-linger", "0.6")))
    return "spawned"
"""


async def test_a_daemon_does_not_outlive_the_invocation(jail: Jail, mode: str) -> None:
    marker = f"nsfaas-daemon-{uuid.uuid4().hex}"
    fn = jail.function(DAEMON, mode)
    task = asyncio.create_task(fn(marker))
    # Positive control: the daemon really runs (as the jail uid) while the handler lingers.
    seen: list[int] = []
    deadline = time.monotonic() + 5
    while not seen and not task.done() and time.monotonic() < deadline:
        seen = processes_with(marker)
        await asyncio.sleep(0.02)
    assert seen, "the daemon never showed up: the test would prove nothing"
    status = Path(f"/proc/{seen[0]}/status").read_text()  # noqa: ASYNC240 (procfs, instant)
    uids = next(ln.split()[1:] for ln in status.splitlines() if ln.startswith("Uid:"))
    # Its jail's own outside uid (65534 inside), real, effective, saved and fs alike.
    assert len(set(uids)) == 1 and is_jail_uid(int(uids[0])) and uids[0] != "65534", uids
    r = await task
    assert (r.outcome, r.body) == ("ok", b"spawned"), describe(r)
    if mode == "cold":
        # runner.run answers first; the jail's teardown follows in the background
        # (the zygote killed every straggler before it answered): once it has
        # settled, promptly, nothing of the jail is left.
        await jail.settle(within_s=3.0)
        assert processes_with(marker) == []
        assert jail_uid_processes() == {}
    else:
        # The zygote answers as soon as the result is whole and kills every
        # straggler right after (before it reads the next request): the daemon
        # is gone within moments while the worker itself lives on.
        assert await gone(marker, within_s=1.0), processes_with(marker)
        assert fn.alive and fn.worker is not None and fn.worker.jail_pid is not None
        zygote = fn.worker.jail_pid
        left = jail_uid_processes()
        # Only the zygote and the idle child it pre-forked for the next request.
        assert zygote in left and len(left) <= 2, left
        assert all(p == zygote or ancestors(p)[0] == zygote for p in left), left
    r = await fn.assert_recovers()
    assert processes_with(marker) == []


async def test_a_daemon_of_a_timed_out_invocation_is_gone_too(jail: Jail, mode: str) -> None:
    marker = f"nsfaas-daemon-{uuid.uuid4().hex}"
    fn = jail.function(DAEMON, mode, limits=Limits(timeout_s=1, memory_mb=64, pids=16))
    r = await fn(marker, headers=(("x-linger", "30"),))
    assert (r.outcome, r.limit_name) == ("timeout", "wall_time"), describe(r)
    await jail.settle(within_s=3.0)
    assert await gone(marker, within_s=1.0), processes_with(marker)
    if mode == "cold":
        assert jail_uid_processes() == {}
    else:
        # The gateway cancelled the call: the zygote killed the child and every
        # straggler, and the worker stays warm (the next call is not cold).
        assert fn.alive and fn.worker is not None and fn.worker.jail_pid is not None
        left = jail_uid_processes()
        zygote = fn.worker.jail_pid
        assert zygote in left and len(left) <= 2, left
        assert all(p == zygote or ancestors(p)[0] == zygote for p in left), left
    r = await fn.assert_recovers()
    assert r.start == ("warm" if mode == "warm" else "cold"), describe(r)


async def test_kill_everything_inside_the_jail(jail: Jail, mode: str) -> None:
    """kill(-1, SIGKILL) reaches only the jail's own pid namespace: a sibling
    dies, the handler itself and the zygote (pid 1) do not, and another
    tenant's warm worker is untouched."""
    bystander = await jail.worker(GOOD)
    src = """
import os, signal, time

def handler(request, ctx):
    child = os.fork()
    if child == 0:
        time.sleep(30)
        os._exit(0)
    os.kill(-1, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    os.kill(1, signal.SIGKILL)    # the zygote: ignored, it is the namespace's init
    os.kill(1, signal.SIGTERM)
    os.kill(0, signal.SIGKILL)    # the whole process group, the caller included
    return "unreachable"
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert (r.outcome, r.error_type) == ("killed", "Killed"), describe(r)
    assert r.error_message == "killed by SIGKILL"
    if mode == "warm":
        assert fn.alive, "the zygote must survive signals from its children"
    before = bystander.invocations
    assert bystander.alive
    b = await bystander.invoke(invocation("bystander"), start="warm")
    assert body_json(b) == {"good": True, "body": "bystander"}
    assert bystander.invocations == before + 1
    await fn.assert_recovers()


async def test_kill_minus_one_alone_finds_no_one(jail: Jail, mode: str) -> None:
    src = """
import os, signal

def handler(request, ctx):
    os.kill(-1, signal.SIGKILL)
    return "survived"
"""
    fn = jail.function(src, mode)
    r = await fn()
    # Linux spares the caller and pid 1: nobody else is in the jail to kill.
    assert (r.outcome, r.error_type) == ("error", "ProcessLookupError"), describe(r)
    assert r.error_message == "[Errno 3] No such process"
    await fn.assert_recovers()


async def test_privilege_changes_fail(jail: Jail, mode: str) -> None:
    src = """
import errno, os

def handler(request, ctx):
    out = {}
    for label, f in (
        ("setuid0", lambda: os.setuid(0)),
        ("setgid0", lambda: os.setgid(0)),
        ("seteuid0", lambda: os.seteuid(0)),
        ("setresuid0", lambda: os.setresuid(0, 0, 0)),
        ("setuid1000", lambda: os.setuid(1000)),
        ("setgroups", lambda: os.setgroups([0])),
        ("setuid_self", lambda: os.setuid(65534)),
    ):
        try:
            f()
            out[label] = "OK"
        except OSError as e:
            out[label] = [type(e).__name__, errno.errorcode[e.errno]]
    out["ids"] = [os.getresuid(), os.getresgid(), os.getgroups()]
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    # Only uid/gid 65534 exist in the jail's user namespace: any other id is not
    # even representable (EINVAL); changing groups needs a capability (EPERM).
    assert got == {
        "setuid0": ["OSError", "EINVAL"], "setgid0": ["OSError", "EINVAL"],
        "seteuid0": ["OSError", "EINVAL"], "setresuid0": ["OSError", "EINVAL"],
        "setuid1000": ["OSError", "EINVAL"], "setgroups": ["PermissionError", "EPERM"],
        "setuid_self": "OK",
        "ids": [[65534, 65534, 65534], [65534, 65534, 65534], []],
    }
    await fn.assert_recovers()


async def test_nested_user_namespace_via_unshare(jail: Jail, mode: str) -> None:
    src = """
import ctypes, errno, os

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x20000, 0x40000000, 0x20000000

def handler(request, ctx):
    out = {}
    for name, flags in (("user", CLONE_NEWUSER), ("user+mount", CLONE_NEWUSER | CLONE_NEWNS),
                        ("net", CLONE_NEWNET), ("pid", CLONE_NEWPID), ("none", 0)):
        ctypes.set_errno(0)
        rc = libc.unshare(flags)
        out[name] = [rc, errno.errorcode.get(ctypes.get_errno(), 0)]
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    assert got == {"user": [-1, "EPERM"], "user+mount": [-1, "EPERM"], "net": [-1, "EPERM"],
                   "pid": [-1, "EPERM"], "none": [-1, "EPERM"]}
    await fn.assert_recovers()


async def test_exit_before_returning_is_an_error(jail: Jail, mode: str) -> None:
    src = """
import os

def handler(request, ctx):
    print("about to leave")
    os._exit(0)
    return "never"
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert (r.outcome, r.error_type) == ("error", "NoResult"), describe(r)
    assert r.error_message == "the function exited (code 0) without returning a result"
    assert r.status is None and r.body == b""
    await fn.assert_recovers()


async def test_a_fake_result_on_stdout_is_a_log_line(jail: Jail, mode: str) -> None:
    src = """
import json, sys

def handler(request, ctx):
    print(json.dumps({"op": "done", "exit_code": 0, "status": 200, "body": "pwned"}))
    print(json.dumps({"kind": "ok", "status": 200, "headers": [["X-Pwned", "1"]]}))
    sys.stdout.flush()
    return ("real", 201)
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert (r.outcome, r.status, r.body) == ("ok", 201, b"real"), describe(r)
    assert dict(r.headers) == {"content-type": "text/plain; charset=utf-8"}
    assert [e.stream for e in r.logs] == ["stdout", "stdout"]
    assert r.logs[0].fields["body"] == "pwned"
    await fn.assert_recovers()


async def test_an_import_time_loop_is_bounded(jail: Jail) -> None:
    """Hostile code at import time: the cold start is bounded by the timeout."""
    src = "while True:\n    pass\n\ndef handler(request, ctx):\n    return 'x'\n"
    limits = Limits(timeout_s=1, memory_mb=64, pids=16)
    t0 = time.monotonic()
    r = await jail.cold(src, limits=limits)
    assert (r.outcome, r.limit_name) == ("timeout", "wall_time"), describe(r)
    assert time.monotonic() - t0 < 2.5
    await jail.settle(within_s=3.0)
    assert jail_uid_processes() == {}
    await jail.assert_good_function_works()


async def test_ptrace_of_the_zygote_and_signals_to_it(jail: Jail, mode: str) -> None:
    src = """
import ctypes, errno, os, signal

libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206

def handler(request, ctx):
    out = {}
    for name, req in (("attach", PTRACE_ATTACH), ("seize", PTRACE_SEIZE)):
        ctypes.set_errno(0)
        out[name] = [libc.ptrace(req, 1, 0, 0), errno.errorcode.get(ctypes.get_errno(), 0)]
    for sig in (signal.SIGSTOP, signal.SIGSEGV, signal.SIGINT):
        os.kill(1, sig)
    return out
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    assert got == {"attach": [-1, "EPERM"], "seize": [-1, "EPERM"]}
    if mode == "warm":
        assert fn.alive
    await fn.assert_recovers()



async def test_sigint_to_the_zygote_is_ignored_and_to_the_handler_is_an_error(
    jail: Jail, mode: str
) -> None:
    src = """
import os, signal, time

def handler(request, ctx):
    os.kill(1, signal.SIGINT)       # the zygote: must be ignored
    if request.text() == "self":
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    return "zygote untouched"
"""
    fn = jail.function(src, mode)
    r = await fn()
    assert (r.outcome, r.body) == ("ok", b"zygote untouched"), describe(r)
    r = await fn("self")
    assert (r.outcome, r.error_type) == ("error", "KeyboardInterrupt"), describe(r)
    if mode == "warm":
        assert fn.alive and fn.restarts == 0
    await fn.assert_recovers()


async def test_a_handler_that_answers_and_lingers_is_ended(jail: Jail, mode: str) -> None:
    """It writes a whole result itself, closes every pipe, then keeps running as
    another program: the answer stands, and the process is killed right after."""
    marker = f"nsfaas-linger-{uuid.uuid4().hex}"
    src = """
import os
import _frames

def handler(request, ctx):
    os.write(3, _frames.encode({"kind": "ok", "status": 200, "headers": []}, b"early"))
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2, 3, 4):
        os.dup2(null, fd)
    os.execv("/usr/bin/python3", ["python3", "-I", "-S", "-c",
             "while True: pass", request.text()])
"""
    fn = jail.function(src, mode)
    r = await fn(marker)
    assert (r.outcome, r.status, r.body) == ("ok", 200, b"early"), describe(r)
    if mode == "cold":
        await jail.settle(within_s=3.0)
        assert processes_with(marker) == []
    else:
        assert await gone(marker, within_s=1.5), processes_with(marker)
        assert fn.alive
    await fn.assert_recovers()
    assert processes_with(marker) == []
