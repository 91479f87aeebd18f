"""Shared memory mappings, which would carry state from one warm invocation to the next.

A warm worker forks every invocation from one zygote, so a MAP_SHARED mapping
the zygote made at import (anonymous, of a /tmp file, of a memfd, of
/dev/zero) would be the same memory in every child: a counter in it used to
read 1, 2, 3 on successive warm calls while module globals reset. The policy
refuses every mmap with MAP_SHARED (MAP_SHARED_VALIDATE has the same bit)
with EPERM, at import and at request time alike; MAP_PRIVATE mappings, which
CPython, the loader and ``mmap.ACCESS_COPY`` use, keep working.
"""

from __future__ import annotations

import errno

import pytest

from tests.jailtest import Jail, body_json, describe

# ``MAKE_MAPPING`` becomes an expression that makes a 4096-byte shared mapping.
COUNTER = """
import mmap, os

def _tmp_file():
    with open(f"/tmp/counter-{os.getpid()}", "w+b") as f:  # a new file each time
        f.write(bytes(4096))
        f.flush()
        return mmap.mmap(f.fileno(), 4096)

def _memfd(flags=mmap.MAP_SHARED):
    fd = os.memfd_create("counter")
    os.ftruncate(fd, 4096)
    try:
        return mmap.mmap(fd, 4096, flags=flags)
    finally:
        os.close(fd)

def _dev_zero():
    fd = os.open("/dev/zero", os.O_RDWR)
    try:
        return mmap.mmap(fd, 4096)
    finally:
        os.close(fd)

def _attempt():
    try:
        return MAKE_MAPPING, 0
    except OSError as exc:
        return None, exc.errno

SHM, IMPORT_ERRNO = _attempt()

def handler(request, ctx):
    # Without a shared mapping, count in a private one: it must start at 0.
    m = SHM if SHM is not None else mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
    count = int.from_bytes(m[:8], "little") + 1
    m[:8] = count.to_bytes(8, "little")
    _, request_errno = _attempt()
    return {"import_errno": IMPORT_ERRNO, "request_errno": request_errno, "count": count}
"""

SHARED = {
    "anonymous": "mmap.mmap(-1, 4096)",  # MAP_SHARED is Python's default
    "memfd_shared_validate": "_memfd(flags=0x03)",  # MAP_SHARED_VALIDATE (EINVAL if anonymous)
    "tmp_file": "_tmp_file()",  # /tmp is wiped after each call, the mapping would stay
    "memfd": "_memfd()",
    "dev_zero": "_dev_zero()",  # shared anonymous memory by another name
}


@pytest.mark.parametrize("kind", sorted(SHARED))
async def test_shared_mapping_is_refused_and_nothing_carries_over(
    jail: Jail, mode: str, kind: str
) -> None:
    fn = jail.function(COUNTER.replace("MAKE_MAPPING", SHARED[kind]), mode)
    got = [body_json(await fn()) for _ in range(2)]  # warm: the same zygote both times
    assert [g["count"] for g in got] == [1, 1], (kind, got)  # nothing carried over
    errnos = {(g["import_errno"], g["request_errno"]) for g in got}
    assert errnos == {(errno.EPERM, errno.EPERM)}, (kind, got)
    if mode == "warm":
        assert fn.alive and fn.restarts == 0
    await fn.assert_recovers()


async def test_module_that_needs_a_shared_mapping_fails_to_load(jail: Jail, mode: str) -> None:
    """The audit's function, unchanged: a clear load error instead of a shared counter."""
    fn = jail.function(
        "import mmap\nSHM = mmap.mmap(-1, 4096)\n\n"
        "def handler(request, ctx):\n    return 'never'\n",
        mode,
    )
    r = await fn()
    assert r.outcome == "error" and r.error_type == "PermissionError", describe(r)
    await jail.assert_good_function_works()


MPROTECT = """
import ctypes, os

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PROT_READ, PROT_WRITE, MAP_SHARED, MAP_PRIVATE = 1, 2, 1, 2
MAP_FAILED = ctypes.c_void_p(-1).value

def upgrade(fd):
    '''Map the writable fd read-only, then try to make the mapping writable.'''
    out = {}
    for name, flags in (("shared", MAP_SHARED), ("private", MAP_PRIVATE)):
        ctypes.set_errno(0)
        addr = libc.mmap(None, 4096, PROT_READ, flags, fd, 0)
        if addr == MAP_FAILED:
            out[name] = {"mmap_errno": ctypes.get_errno()}
            continue
        rc = libc.mprotect(addr, 4096, PROT_READ | PROT_WRITE)
        if rc == 0:
            ctypes.memset(addr, ord("x"), 1)
        out[name] = {"mprotect": rc, "file": os.pread(fd, 1, 0).hex()}
    return out

_fd = os.memfd_create("ro")
os.ftruncate(_fd, 4096)
AT_IMPORT = upgrade(_fd)
os.close(_fd)

def handler(request, ctx):
    fd = os.open("/tmp/ro", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 4096)
    return {"import": AT_IMPORT, "request": upgrade(fd)}
"""


async def test_read_only_shared_mapping_cannot_exist_to_be_made_writable(
    jail: Jail, mode: str
) -> None:
    """A read-only MAP_SHARED mapping of a writable fd is refused too (mprotect
    could otherwise turn it writable); a private one may become writable, but
    its writes stay in the process and never reach the file."""
    fn = jail.function(MPROTECT, mode)
    expected = {
        "shared": {"mmap_errno": errno.EPERM},
        "private": {"mprotect": 0, "file": "00"},
    }
    got = body_json(await fn())
    assert got == {"import": expected, "request": expected}, got
    await fn.assert_recovers()


PRIVATE = """
import mmap, os

ANON = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE)
with open("/function/handler.py", "rb") as f:
    CODE = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # a read-only file
FIRST = CODE[:8]

def bump(m):
    count = int.from_bytes(m[:8], "little") + 1
    m[:8] = count.to_bytes(8, "little")
    return count

def handler(request, ctx):
    with open("/tmp/private", "w+b") as f:
        f.write(bytes(4096))
        f.flush()
        copy = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY)
        copy[:5] = b"hello"
        on_disk = os.pread(f.fileno(), 5, 0)
    fresh = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE)
    fresh[-5:] = b"tail!"
    code_intact = CODE[:8] == FIRST  # an earlier child's write is not here
    CODE[:8] = b"changed!"
    return {
        "import_anon": bump(ANON),
        "import_copy_of_code": [code_intact, CODE[:8].decode()],
        "code_file_unchanged": open("/function/handler.py", "rb").read(8) == FIRST,
        "request_copy": [copy[:5].decode(), on_disk.hex()],
        "request_anon": fresh[-5:].decode(),
    }
"""


async def test_private_mappings_still_work_and_stay_private(jail: Jail, mode: str) -> None:
    fn = jail.function(PRIVATE, mode)
    for _ in range(2):  # warm: the zygote's private pages are copied on write
        got = body_json(await fn())
        assert got == {
            "import_anon": 1,
            "import_copy_of_code": [True, "changed!"],
            "code_file_unchanged": True,
            "request_copy": ["hello", "0000000000"],
            "request_anon": "tail!",
        }, got
    await fn.assert_recovers()


SEED = """
import mmap

with open("/tmp/seed", "wb") as f:
    f.write(bytes(4096))
with open("/tmp/seed", "rb") as f:
    VIEW = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY)

def handler(request, ctx):
    seen = VIEW[:8]
    try:
        with open("/tmp/seed", "r+b") as f:  # only the first invocation finds it
            f.write(b"leaked!!")
    except FileNotFoundError:
        pass
    return {"seen": seen.hex()}
"""


async def test_private_file_mapping_from_import_shows_nothing_of_an_earlier_call(
    jail: Jail,
) -> None:
    fn = jail.function(SEED, "warm")
    seen = [body_json(await fn())["seen"] for _ in range(2)]
    assert seen == ["00" * 8, "00" * 8], seen


SQLITE = """
import sqlite3

def run(path, *pragmas):
    try:
        db = sqlite3.connect(path)
        for p in pragmas:
            db.execute(p).fetchall()
        db.execute("CREATE TABLE t(x)")
        db.execute("INSERT INTO t VALUES (1)")
        db.commit()
        n = db.execute("SELECT count(*) FROM t").fetchone()[0]
        db.close()
        return n
    except sqlite3.Error as exc:
        return str(exc)

def handler(request, ctx):
    return {
        "rollback_journal": run("/tmp/a.db"),
        "memory": run(":memory:"),
        "mmap_io": run("/tmp/b.db", "PRAGMA mmap_size=1048576"),  # falls back to read()
        "wal": run("/tmp/c.db", "PRAGMA journal_mode=WAL"),  # the wal-index is a shared map
        "wal_exclusive": run("/tmp/d.db", "PRAGMA locking_mode=EXCLUSIVE",
                             "PRAGMA journal_mode=WAL"),  # keeps the wal-index on the heap
    }
"""


async def test_sqlite_works_except_shared_wal_index(jail: Jail, mode: str) -> None:
    """What the rule costs sqlite3, as docs/jail.md states it."""
    fn = jail.function(SQLITE, mode)
    got = body_json(await fn())
    assert got == {
        "rollback_journal": 1,
        "memory": 1,
        "mmap_io": 1,
        "wal": "disk I/O error",
        "wal_exclusive": 1,
    }, got
    await fn.assert_recovers()
