"""What a warm invocation could leave on the worker's shared kernel objects
for the next one: /tmp's own metadata and the five channels' file status.

The wipe used to empty /tmp but not reset the directory itself (its mode,
times and xattrs carried data to the next call; `chmod 0500 /tmp` broke every
later call on that worker), and the channels are the same pipes for every
child of a worker (O_NONBLOCK and the pipe size one invocation set stayed for
the next: more than a pipe's worth of output then failed with a 500). Each test
runs cold too: there every call is a fresh jail, which is what warm must match.
"""

from __future__ import annotations

import json

from tests.jailtest import Jail, body_json, describe

TMP_META = """
import ctypes, fcntl, json, os, stat

FS_IOC_GETFLAGS, FS_IOC_SETFLAGS = 0x80086601, 0x40086602
FS_NODUMP_FL, FS_NOATIME_FL = 0x40, 0x80

def flags():
    fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
        return int.from_bytes(buf[:4], "little")
    except OSError as e:
        return "errno %d" % e.errno
    finally:
        os.close(fd)

def handler(request, ctx):
    st = os.stat("/tmp")
    seen = {
        "mode": oct(stat.S_IMODE(st.st_mode)),
        "times": [st.st_atime_ns, st.st_mtime_ns],
        "xattrs": {k: len(os.getxattr("/tmp", k)) for k in os.listxattr("/tmp")},
        "flags": flags(),
        "writable": os.access("/tmp", os.W_OK),
    }
    how = json.loads(request.body or b"{}")
    done = {}
    if how.get("xattr"):
        os.setxattr("/tmp", "user.secret", b"from an earlier invocation" * 2000)
        done["xattr"] = True
    if how.get("flags"):
        fd = os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.ioctl(fd, FS_IOC_SETFLAGS, (FS_NODUMP_FL | FS_NOATIME_FL).to_bytes(8, "little"))
            done["flags"] = flags()
        except OSError as e:
            done["flags"] = "errno %d" % e.errno
        os.close(fd)
    if how.get("utime"):
        os.utime("/tmp", ns=(1234567890123456789, 987654321987654321))
        done["utime"] = True
    if "mode" in how:
        os.chmod("/tmp", int(how["mode"], 8))
        done["mode"] = how["mode"]
    return {"seen": seen, "done": done}
"""


async def test_tmp_metadata_is_reset_between_invocations(jail: Jail, mode: str) -> None:
    """xattrs (tens of KiB), atime/mtime (128 bits), inode flags and the mode
    of /tmp itself must not reach the next invocation."""
    fn = jail.function(TMP_META, mode)
    tamper = {"xattr": True, "flags": True, "utime": True, "mode": "0700"}
    first = body_json(await fn(json.dumps(tamper)))
    fresh = first["seen"]
    assert fresh["mode"] == "0o1777" and fresh["xattrs"] == {} and fresh["writable"], first
    assert first["done"]["xattr"] and first["done"]["utime"], first
    worker = fn.worker
    second = body_json(await fn())
    seen = second["seen"]
    assert seen["xattrs"] == {}, seen
    assert seen["mode"] == "0o1777" and seen["writable"], seen
    assert seen["flags"] == fresh["flags"], (first, seen)
    assert seen["times"] != [1234567890123456789, 987654321987654321], seen
    if mode == "warm":
        # The same worker, and exactly what its first invocation saw.
        assert fn.worker is worker and fn.alive, "a reset, not a retirement"
        assert seen["times"] == fresh["times"], (fresh, seen)
    await fn.assert_recovers()


TMP_LOCK = """
import os

def handler(request, ctx):
    how = request.text()
    if how.startswith("chmod "):
        os.chmod("/tmp", int(how.split()[1], 8))
        return "locked"
    with open("/tmp/scratch.txt", "w") as f:
        f.write("hello")
    return {"wrote": open("/tmp/scratch.txt").read()}
"""


async def test_a_locked_tmp_is_writable_again_next_time(jail: Jail, mode: str) -> None:
    """chmod 0500 (or 0) on /tmp made every later call on that warm worker fail
    with PermissionError until the worker was evicted."""
    fn = jail.function(TMP_LOCK, mode)
    for locked in ("0500", "0000", "0100"):
        r = await fn(f"chmod {locked}")
        assert r.outcome == "ok" and r.body == b"locked", describe(r)
        worker = fn.worker
        r = await fn("write")
        assert body_json(r) == {"wrote": "hello"}, (locked, describe(r))
        if mode == "warm":
            assert fn.worker is worker and fn.alive, "a reset, not a retirement"
    await fn.assert_recovers()


CHANNELS = """
import fcntl, os, sys

F_SETPIPE_SZ, F_GETPIPE_SZ = 1031, 1032

def state():
    return {str(fd): [fcntl.fcntl(fd, fcntl.F_GETFL), fcntl.fcntl(fd, F_GETPIPE_SZ),
                      fcntl.fcntl(fd, fcntl.F_GETOWN), fcntl.fcntl(fd, fcntl.F_GETSIG)]
            for fd in (1, 2, 3, 4)}

def handler(request, ctx):
    before = state()
    if request.text() == "tamper":
        for fd in (1, 2, 3, 4):
            fcntl.fcntl(fd, fcntl.F_SETFL,
                        fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK | os.O_APPEND)
            fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
            fcntl.fcntl(fd, fcntl.F_SETSIG, 40)
        return {"before": before, "after": state()}
    for i in range(2000):
        print("x" * 100)
    ctx.log.info("y" * 10000)
    return {"before": before, "big": "z" * 300000}
"""


async def test_channel_flags_and_sizes_do_not_reach_the_next_invocation(
    jail: Jail, mode: str
) -> None:
    """O_NONBLOCK and F_SETPIPE_SZ on fds 1-4 changed the worker's shared pipes:
    the next invocation that printed more than a pipe's worth failed with
    BlockingIOError (500), and the pipe size carried a few bits (so would the
    SIGIO owner and signal)."""
    fn = jail.function(CHANNELS, mode)
    first = body_json(await fn("tamper"))
    fresh = first["before"]
    assert all(not flags & 0o4000 for flags, *_ in fresh.values()), fresh  # O_NONBLOCK
    assert all(before != after for before, after in
               zip(fresh.values(), first["after"].values(), strict=True)), first
    worker = fn.worker
    r = await fn("talk")
    got = body_json(r)
    assert got["before"] == fresh, (fresh, got["before"])
    assert got["big"] == "z" * 300000
    out = [e.message for e in r.logs if e.stream == "stdout"]
    assert out.count("x" * 100) == 2000, describe(r)
    assert any(e.message == "y" * 10000 for e in r.logs if e.stream == "ctx"), describe(r)
    if mode == "warm":
        assert fn.worker is worker and fn.alive, "restored, not retired"
    await fn.assert_recovers()


SELF_TAMPER = """
import fcntl, os, sys

F_SETPIPE_SZ = 1031

def handler(request, ctx):
    sys.stdout.write("a" * 7000)  # buffered: the runtime's flush writes it
    sys.stderr.write("b" * 7000)
    for fd in (1, 2, 3, 4):
        fcntl.fcntl(fd, F_SETPIPE_SZ, 4096)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    ctx.log.info("c" * 10000)
    if request.text() == "raise":
        raise ValueError("d" * 1000)
    return {"big": "e" * 300000}
"""


async def test_nonblocking_channels_set_during_the_invocation_still_answer(
    jail: Jail, mode: str
) -> None:
    """A function that makes its own channels non-blocking and tiny before it
    returns: the runtime's flushes and result write wait for the gateway to
    read instead of failing (a lost result was a 500), and the outcome is the
    normal one, with every byte."""
    fn = jail.function(SELF_TAMPER, mode)
    r = await fn("return")
    assert body_json(r) == {"big": "e" * 300000}, describe(r)
    text = "".join(e.message for e in r.logs if e.stream == "stdout")
    assert text == "a" * 7000, describe(r)
    text = "".join(e.message for e in r.logs if e.stream == "stderr")
    assert text == "b" * 7000, describe(r)
    assert [e.message for e in r.logs if e.stream == "ctx"] == ["c" * 10000], describe(r)
    worker = fn.worker
    r = await fn("raise")
    assert r.outcome == "error" and r.error_type == "ValueError", describe(r)
    assert r.error_message == "d" * 1000, describe(r)
    if mode == "warm":
        assert fn.worker is worker and fn.alive
    await fn.assert_recovers()
