"""Session 9's audit, in real jails: host paths inside the bytecode a jail can
read, and page-cache residency of the shared host files."""

from __future__ import annotations

import errno

from tests.jailtest import Jail, body_json

# ---- 1. no host path in any .pyc a function can read ------------------------------

PYC_NAMES = r"""
import marshal, os

def handler(request, ctx):
    names = {}
    for d in ("/function/__pycache__", "/opt/nsfaas/__pycache__"):
        for n in sorted(os.listdir(d)):
            with open(os.path.join(d, n), "rb") as f:
                code = marshal.loads(f.read()[16:])
            found = set()
            todo = [code]
            while todo:  # every code object: nested functions and classes too
                c = todo.pop()
                found.add(c.co_filename)
                todo += [k for k in c.co_consts if hasattr(k, "co_filename")]
            names[d + "/" + n] = sorted(found)
    return names
"""


async def test_bytecode_names_only_the_paths_the_jail_sees(jail: Jail, mode: str) -> None:
    """The gateway compiles the runtime and each function's code on the host:
    co_filename in the .pyc was the host path (the data dir, and the gateway's
    pid in the runtime's temporary directory name), readable with one
    marshal.loads. Now it is the in-jail path."""
    fn = jail.function(PYC_NAMES, mode)
    got = body_json(await fn())
    assert any(k.startswith("/function/__pycache__/handler.") for k in got), got
    assert any(k.startswith("/opt/nsfaas/__pycache__/bootstrap.") for k in got), got
    for pyc, names in got.items():
        folder = pyc.split("/__pycache__/")[0]
        stem = pyc.rsplit("/", 1)[1].split(".")[0]
        assert names == [f"{folder}/{stem}.py"], (pyc, names)
    await fn.assert_recovers()


# ---- 2. page-cache residency of shared host files ----------------------------------

NOWAIT = r"""
import os

def handler(request, ctx):
    fd = os.open(os.__file__, os.O_RDONLY)  # a stdlib file, bound from the host
    buf = bytearray(4096)
    out = {}
    try:
        os.preadv(fd, [buf], 0, os.RWF_NOWAIT)
        out["nowait"] = "read"
    except OSError as e:
        out["nowait"] = e.errno
    out["plain"] = os.preadv(fd, [buf], 0, 0)  # preadv2 without the flag still works
    os.close(fd)
    return out
"""


async def test_a_non_blocking_read_cannot_probe_the_shared_page_cache(
    jail: Jail, mode: str
) -> None:
    """preadv2(RWF_NOWAIT) says EAGAIN for a page not in the page cache and
    reads in nothing: on a stdlib file bound from the host, tenant B saw which
    modules tenant A had imported (imaplib: 17 pages after A's import, 0 before).
    Refused with EOPNOTSUPP, whatever the page's state."""
    fn = jail.function(NOWAIT, mode)
    got = body_json(await fn())
    assert got == {"nowait": errno.EOPNOTSUPP, "plain": 4096}, got
    await fn.assert_recovers()

