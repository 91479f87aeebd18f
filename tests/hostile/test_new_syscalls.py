"""Syscalls newer than the seccomp policy's last review answer ENOSYS.

The policy is a deny-list on DEFAULT ALLOW, so every syscall a kernel added
after the review used to be allowed: statmount/listmount (Linux 6.8) showed
the whole mount table, host paths of the code and the proxy socket directory
included. Each number from 457 up to 511 (where the x32 range begins) is now
refused with ENOSYS, what a kernel without it would say, except the ones
reviewed and allowed (mseal). The arguments are such that the kernel itself
would answer something else (EFAULT, EBADF, EINVAL) for those this kernel has.
"""

from __future__ import annotations

import errno
import json

import pytest

from tests.jailtest import Jail, body_json

# x86_64 numbers; 470 and up do not exist on 6.18 (ENOSYS from the kernel).
NEW = {
    "statmount": 457, "listmount": 458, "lsm_get_self_attr": 459, "lsm_set_self_attr": 460,
    "lsm_list_modules": 461, "setxattrat": 463, "getxattrat": 464, "listxattrat": 465,
    "removexattrat": 466, "open_tree_attr": 467, "file_getattr": 468, "file_setattr": 469,
    "future_470": 470, "future_490": 490, "future_511": 511,
}

PROBE = """
import ctypes, json

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def handler(request, ctx):
    out = {}
    for name, nr in json.loads(request.body).items():
        ctypes.set_errno(0)
        # NULL pointers, a bad fd, zero sizes: a plain error wherever the kernel looks.
        rc = libc.syscall(ctypes.c_long(nr), ctypes.c_long(0), ctypes.c_long(0),
                          ctypes.c_long(0), ctypes.c_long(0), ctypes.c_long(0))
        out[name] = [rc, ctypes.get_errno() if rc == -1 else 0]
    return out
"""

MOUNTS = """
import ctypes, struct

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
LSMT_ROOT = 0xFFFFFFFFFFFFFFFF

def handler(request, ctx):
    req = ctypes.create_string_buffer(struct.pack("<IIQQQ", 32, 0, LSMT_ROOT, 0, 0))
    ids = (ctypes.c_uint64 * 64)()
    ctypes.set_errno(0)
    n = libc.syscall(ctypes.c_long(458), ctypes.c_void_p(ctypes.addressof(req)),
                     ctypes.c_void_p(ctypes.addressof(ids)), ctypes.c_long(64), ctypes.c_long(0))
    return {"listmount": [n, ctypes.get_errno() if n == -1 else 0]}
"""


async def test_new_syscalls_answer_enosys(jail: Jail, mode: str) -> None:
    fn = jail.function(PROBE, mode)
    got = body_json(await fn(json.dumps(NEW)))
    assert got == {name: [-1, errno.ENOSYS] for name in NEW}, got
    if mode == "warm":
        assert fn.alive
    await fn.assert_recovers()


async def test_the_mount_table_cannot_be_listed(jail: Jail, mode: str) -> None:
    """The audit's probe: listmount of the jail's root listed every mount."""
    fn = jail.function(MOUNTS, mode)
    assert body_json(await fn()) == {"listmount": [-1, errno.ENOSYS]}
    await fn.assert_recovers()


@pytest.mark.parametrize("name", ["mseal"])
async def test_reviewed_new_syscalls_stay_allowed(jail: Jail, mode: str, name: str) -> None:
    """mseal only takes permissions away from its caller's own mappings (a
    libc may seal its own RELRO): allowed, so it answers as the kernel does
    (0 for an empty range), not ENOSYS."""
    fn = jail.function(PROBE, mode)
    got = body_json(await fn(json.dumps({name: 462})))
    assert got == {name: [0, 0]}, got
