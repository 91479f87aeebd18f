"""Every syscall the seccomp policy denies, called through ctypes.

The policy answers EPERM for the deny-list, ENOSYS for clone3 (so libc falls
back to clone, whose flags seccomp can see) and EAFNOSUPPORT for a socket of
any family but AF_UNIX. Each call must fail with exactly that errno, the
process must survive it (an errno, not SIGSYS), and the next invocation works.

The arguments are chosen so that, where the kernel allows it, the call would
fail differently (or succeed harmlessly) without the filter: the host control
test below runs the same calls as the jail's uid on the host, unfiltered, and
checks that for those the jail's answer can only have come from seccomp. The
rest fail the capability check first on the host too (EPERM either way): for
them the filter is a second wall behind the dropped capabilities.
"""

from __future__ import annotations

import errno
import json
import subprocess
from typing import Any

import pytest

from tests.jailtest import Jail, body_json

# x86_64 syscall numbers
CLONE_NEWUSER, CLONE_FS, SIGCHLD = 0x10000000, 0x200, 17
BAD_PTR = 1  # an address that is never mapped: EFAULT if the kernel reads it
# name -> (nr, args, errno from the policy). "buf"/"path" are pointers, "pid" our pid.
CALLS: dict[str, tuple[int, list[Any], int]] = {
    "ptrace": (101, [16, 999999, 0, 0], errno.EPERM),  # PTRACE_ATTACH to no one
    "process_vm_readv": (310, ["pid", 0, 0, 0, 0, 0], errno.EPERM),
    "process_vm_writev": (311, ["pid", 0, 0, 0, 0, 0], errno.EPERM),
    "mount": (165, ["path", "path", "path", 0, 0], errno.EPERM),
    "umount2": (166, ["path", 0x80000000], errno.EPERM),  # bad flags
    "pivot_root": (155, ["path", "path"], errno.EPERM),
    "chroot": (161, ["path"], errno.EPERM),
    "unshare": (272, [0], errno.EPERM),  # flags 0 would be a harmless no-op
    "setns": (308, [-1, 0], errno.EPERM),
    "kexec_load": (246, [0, 0, 0, 0xDEAD0000], errno.EPERM),
    "kexec_file_load": (320, [-1, -1, 0, 0, 0xDEAD0000], errno.EPERM),
    "init_module": (175, [0, 0, 0], errno.EPERM),
    "finit_module": (313, [-1, 0, 0], errno.EPERM),
    "delete_module": (176, ["path", 0], errno.EPERM),
    "bpf": (321, [9999, 0, 0], errno.EPERM),  # no such command
    "perf_event_open": (298, [0, 0, -1, -1, 0], errno.EPERM),  # NULL attr
    "userfaultfd": (323, [1 | 0x40000000], errno.EPERM),  # user-mode only, bad flag
    "io_uring_setup": (425, [1, 0], errno.EPERM),  # NULL params
    "io_uring_enter": (426, [-1, 0, 0, 0, 0, 0], errno.EPERM),
    "io_uring_register": (427, [-1, 0, 0, 0], errno.EPERM),
    "keyctl": (250, [9999, 0, 0, 0, 0], errno.EPERM),  # no such operation
    "add_key": (248, [0, 0, 0, 0, 0], errno.EPERM),
    "request_key": (249, [0, 0, 0, 0], errno.EPERM),
    "personality": (135, [0xFFFFFFFF], errno.EPERM),  # a mere query without the filter
    "reboot": (169, [0, 0, 0, 0], errno.EPERM),  # bad magic
    "swapon": (167, [0, 0], errno.EPERM),
    "swapoff": (168, [0], errno.EPERM),
    "clock_settime": (227, [9999, 0], errno.EPERM),  # no such clock
    "settimeofday": (164, [0, BAD_PTR], errno.EPERM),
    "adjtimex": (159, [0], errno.EPERM),
    "clock_adjtime": (305, [9999, 0], errno.EPERM),  # no such clock
    "syslog": (103, [9999, 0, 0], errno.EPERM),
    "acct": (163, [0], errno.EPERM),
    "quotactl": (179, [0, 0, 0, 0], errno.EPERM),
    "ioctl_TIOCSTI": (16, [-1, 0x5412, "buf"], errno.EPERM),  # on a bad fd
    "clone_NEWUSER": (56, [CLONE_NEWUSER | CLONE_FS | SIGCHLD, 0, 0, 0, 0], errno.EPERM),
    "clone3": (435, [0, 0], errno.ENOSYS),
    "socket_AF_INET": (41, [2, 1, 0], errno.EAFNOSUPPORT),
    "kcmp": (312, ["pid", "pid", 0, 0, 0], errno.EPERM),
    "pidfd_getfd": (438, [-1, 0, 0], errno.EPERM),
    "open_by_handle_at": (304, [-1, 0, 0], errno.EPERM),
    "fsopen": (430, ["path", 0], errno.EPERM),
    "vhangup": (153, [], errno.EPERM),
    "iopl": (172, [0], errno.EPERM),
}

PROBE = """
import ctypes, json, os

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
BUF = ctypes.create_string_buffer(4096)
PATH = ctypes.create_string_buffer(b"/nonexistent-nsfaas")

def arg(a):
    if a == "buf":
        return ctypes.cast(BUF, ctypes.c_void_p)
    if a == "path":
        return ctypes.cast(PATH, ctypes.c_void_p)
    if a == "pid":
        return ctypes.c_long(os.getpid())
    return ctypes.c_long(a)

def call(nr, args):
    ctypes.set_errno(0)
    rc = libc.syscall(ctypes.c_long(nr), *[arg(a) for a in args])
    return [rc, ctypes.get_errno() if rc == -1 else 0]

def handler(request, ctx):
    spec = json.loads(request.body)
    return {"result": call(spec["nr"], spec["args"]), "alive": True}
"""


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_denied_syscall(jail: Jail, mode: str, name: str) -> None:
    nr, args, expected = CALLS[name]
    fn = jail.function(PROBE, mode)
    got = body_json(await fn(json.dumps({"nr": nr, "args": args})))
    assert got == {"result": [-1, expected], "alive": True}, (name, got)
    if mode == "warm":
        assert fn.alive
    await fn.assert_recovers()


async def test_threads_fork_and_subprocess_still_work(jail: Jail, mode: str) -> None:
    """The deny-list leaves what CPython needs: clone for threads and fork
    (after clone3's ENOSYS), and subprocess (vfork/posix_spawn + execve)."""
    src = """
import os, subprocess, sys, threading
from concurrent.futures import ThreadPoolExecutor

def handler(request, ctx):
    with ThreadPoolExecutor(4) as pool:
        squares = list(pool.map(lambda x: x * x, range(8)))
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    out = subprocess.run([sys.executable, "-I", "-S", "-c", "print('child says hi')"],
                         capture_output=True, text=True, check=True).stdout
    return {"threads": squares, "fork": os.waitstatus_to_exitcode(status), "subprocess": out}
"""
    fn = jail.function(src, mode)
    got = body_json(await fn())
    assert got == {"threads": [0, 1, 4, 9, 16, 25, 36, 49], "fork": 7,
                   "subprocess": "child says hi\n"}
    await fn.assert_recovers()


HOST_CONTROL = PROBE + """
import sys
assert os.getuid() == 65534 and os.geteuid() == 65534, "run the control unprivileged only"
out = {}
for name, (nr, args) in json.loads(sys.argv[1]).items():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # each call in its own process: unshare & co. change the caller
        os.write(w, json.dumps(call(nr, args)).encode())
        os._exit(0)
    os.close(w)
    out[name] = json.loads(os.read(r, 4096))
    os.waitpid(pid, 0)
print(json.dumps(out))
"""

# Calls the kernel refuses an unprivileged caller before looking at anything
# else: without the filter they fail with EPERM too.
CAPABILITY_FIRST = {"pivot_root", "reboot", "swapon", "swapoff", "syslog", "acct", "vhangup",
                    "fsopen"}


def host_answers(calls: dict[str, tuple[int, list[Any], int]]) -> dict[str, list[int]]:
    """What each call returns on the host, unfiltered, as an unprivileged uid:
    the control that shows the jail's answers come from its seccomp policy."""
    proc = subprocess.run(
        ["/usr/bin/python3", "-I", "-S", "-c", HOST_CONTROL,
         json.dumps({name: [nr, args] for name, (nr, args, _) in calls.items()})],
        capture_output=True, text=True, timeout=60, user=65534, group=65534, extra_groups=[],
        cwd="/", check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_host_control_the_jails_answers_come_from_seccomp() -> None:
    host = host_answers(CALLS)
    same = sorted(n for n, (_, _, want) in CALLS.items() if host[n] == [-1, want])
    assert same == sorted(CAPABILITY_FIRST), {n: host[n] for n in same}
    # The interesting ones: without the filter they would even have succeeded.
    for name in ("process_vm_readv", "unshare", "personality", "kcmp", "socket_AF_INET"):
        assert host[name][0] >= 0, (name, host[name])
    assert host["clone3"] == [-1, errno.EINVAL]


ZYGOTE_KNOBS = """
import os, resource

def handler(request, ctx):
    def errno_of(f):
        try:
            f()
            return "ok"
        except OSError as e:
            return e.errno
    hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    tries = {
        "pid1_nproc": errno_of(lambda: resource.prlimit(1, resource.RLIMIT_NPROC, (0, hard))),
        "pid1_as": errno_of(lambda: resource.prlimit(1, resource.RLIMIT_AS, (123456789, -1))),
        "pid1_affinity": errno_of(lambda: os.sched_setaffinity(1, {0})),
        "pid1_scheduler": errno_of(
            lambda: os.sched_setscheduler(1, os.SCHED_IDLE, os.sched_param(0))),
        "pid1_nice": errno_of(lambda: os.setpriority(os.PRIO_PROCESS, 1, 19)),
        "group_nice": errno_of(lambda: os.setpriority(os.PRIO_PGRP, 0, 19)),
        "own_affinity": errno_of(lambda: os.sched_setaffinity(0, {0})),
        "own_nice": errno_of(lambda: os.setpriority(os.PRIO_PROCESS, 0, 19)),
        "own_limit": errno_of(lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))),
    }
    seen = {
        "as": list(resource.prlimit(1, resource.RLIMIT_AS)),
        "scheduler": os.sched_getscheduler(1),
        "affinity": sorted(os.sched_getaffinity(1)),
    }
    return {"tries": tries, "zygote": seen}
"""


async def test_an_invocation_cannot_retune_its_zygote(jail: Jail, mode: str) -> None:
    """prlimit/sched_*/setpriority on pid 1 outlived the invocation: a lower
    RLIMIT_NPROC broke the next fork (502), and an rlimit value carried 64 bits
    to the next invocation. Refused (EPERM); a process still tunes itself."""
    fn = jail.function(ZYGOTE_KNOBS, mode)
    first = body_json(await fn())
    assert first["tries"] == {
        "pid1_nproc": 1, "pid1_as": 1, "pid1_affinity": 1, "pid1_scheduler": 1,
        "pid1_nice": 1, "group_nice": 1,
        "own_affinity": "ok", "own_nice": "ok", "own_limit": "ok",
    }, first
    second = body_json(await fn())
    assert second["zygote"] == first["zygote"], (first, second)
    assert second["zygote"]["as"] != [123456789, -1]
    await fn.assert_recovers()
