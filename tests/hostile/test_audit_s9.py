"""Session 9's audit, in real jails: host paths inside the bytecode a jail can
read, and page-cache residency of the shared host files."""

from __future__ import annotations

import errno

import pytest

from jail.errors import WorkerGone
from tests.jailtest import Jail, body_json, describe

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



# ---- 3. what a jail makes the gateway decode on its event loop is bounded --------------

BIG_HEADER = r"""
import json, os, struct

def handler(request, ctx):
    n = int(request.body or b"0")
    # A result frame of our own, its JSON header n list items long.
    head = json.dumps({"kind": "ok", "status": 200, "headers": [], "x": "\ud800",
                       "y": [[] for _ in range(n)]}).encode()
    os.write(3, struct.pack(">II", len(head), 2) + head + b"hi")
    os._exit(0)
"""


async def test_a_result_header_over_its_cap_is_no_result(jail: Jail, mode: str) -> None:
    """The result header was capped only by the frame protocol's 1 MiB: one with
    340,000 items and a lone surrogate cost the gateway about a second of CPU on
    its event loop, per call, shared by every tenant. Now 128 KiB: a bigger one
    is not an answer (NoResult) and is never decoded."""
    from jail.result import RESULT_MAX_HEADER

    fn = jail.function(BIG_HEADER, mode)
    r = await fn(b"100")  # a small one is an answer
    assert r.outcome == "ok" and r.body == b"hi", describe(r)
    r = await fn(str(RESULT_MAX_HEADER // 3).encode())  # "[]," is 3 bytes
    assert r.outcome == "error" and r.error_type == "NoResult", describe(r)
    await fn.assert_recovers()


EXIT_REPORTS = r"""
import json, os, stat, struct

# At import the runtime's control socket is open: fake reports of child
# exits, which the gateway used to decode, any number of them.
_frame = json.dumps({"op": "exited", "n": 1, "exit_code": 0}).encode()
for _fd in range(3, 64):
    try:
        if stat.S_ISSOCK(os.fstat(_fd).st_mode):
            for _ in range(3):
                os.write(_fd, struct.pack(">II", len(_frame), 0) + _frame)
    except OSError:
        pass

def handler(request, ctx):
    return "never"
"""


async def test_forged_exit_reports_break_only_their_own_worker(jail: Jail) -> None:
    """One report per child, for the child in use or the next: a second report
    of one child (or one out of range) breaks the control channel. The
    function's own worker fails; nothing else does."""
    r = await jail.cold(EXIT_REPORTS)
    assert r.outcome == "jail_failure", describe(r)
    assert "unexpected exit report" in (r.error_message or ""), describe(r)
    await jail.assert_good_function_works()


# ---- 4. what a child does after its answer is nobody else's outcome --------------------

LINGER = r"""
import json, os, struct, time

def handler(request, ctx):
    if request.body == b"raise":
        raise ValueError("plain error")
    head = json.dumps({"kind": "ok", "status": 200, "headers": []}).encode()
    os.write(3, struct.pack(">II", len(head), 8) + head + b"answered")  # the answer, early
    if request.body == b"pids":
        for _ in range(40):  # past the pids limit, after the answer
            try:
                if os.fork() == 0:
                    time.sleep(5)
                    os._exit(0)
            except OSError:
                pass
        time.sleep(0.2)
    else:
        hog = []
        while True:  # out of memory, after the answer
            hog.append(bytearray(1 << 20))
    os._exit(0)
"""


@pytest.mark.parametrize("after", ["pids", "oom"])
async def test_a_child_that_runs_on_after_its_answer_is_not_the_next_calls_limit(
    jail: Jail, after: str
) -> None:
    """The slot's counters were read when the answer was complete, while the
    child could run on for up to 0.5 s: its pids-limit hits or OOM kill were
    counted by the next call, a plain ValueError recorded as 502 killed/pids
    or oom (and a penalty strike)."""
    fn = jail.function(LINGER, "warm")
    for _ in range(2):
        r = await fn(after.encode())
        assert r.outcome == "ok" and r.body == b"answered", describe(r)
        r = await fn(b"raise")
        assert r.outcome == "error" and r.error_type == "ValueError", describe(r)
        assert r.limit_name is None, describe(r)
    await fn.assert_recovers()


# ---- 5. /tmp space held past the invocation ------------------------------------------

TMP_GHOST = r"""
import os, socket

def handler(request, ctx):
    free = os.statvfs("/tmp")
    out = {"free": [free.f_bfree, free.f_ffree]}
    if request.body == b"hold":
        fds = []
        for i in range(2):
            fd = os.open(f"/tmp/big{i}", os.O_CREAT | os.O_RDWR, 0o600)
            os.write(fd, b"S" * (6 << 20))
            os.unlink(f"/tmp/big{i}")
            fds.append(fd)
        # The files' fds, and the pair's own, in flight in the pair's queue:
        # a cycle only the kernel's socket garbage collection frees, later.
        a, b = socket.socketpair()
        socket.send_fds(a, [b"x"], fds + [a.fileno(), b.fileno()])
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()
    return out
"""


async def test_tmp_space_held_in_flight_does_not_reach_the_next_call(jail: Jail) -> None:
    """Unlinked /tmp files whose fds sat in a Unix socket's own queue outlived
    the invocation (until the kernel's collection of such cycles, 0.1-1 s):
    the next call on the worker found an "empty" /tmp it could write 4 KiB to.
    The zygote now waits for /tmp's free space to come back, or retires."""
    fn = jail.function(TMP_GHOST, "warm")
    fresh = body_json(await fn())["free"]
    for _ in range(3):
        await fn(b"hold")
        try:
            r = await fn()
        except WorkerGone:  # it retired; the pool gives the call to a new worker
            r = await fn()
        assert body_json(r)["free"] == fresh
    await fn.assert_recovers()


# ---- 6. log lines past the tenant's budget are dropped before they are decoded ---------

JSON_LINES = r"""
import json

def handler(request, ctx):
    line = json.dumps({"level": "info", "message": "m", "y": [[] for _ in range(200)]})
    for _ in range(300):
        print(line)
    ctx.log.info("structured", n=1)
    return "done"
"""


async def test_the_log_gate_sees_every_line_before_it_is_decoded(jail: Jail, mode: str) -> None:
    """JSON lines (stdout's that start with "{", every ctx.log line) were
    decoded on the event loop as they arrived, and only then counted against
    the tenant's log budget: a tenant over its budget still made the gateway
    parse up to 1 MiB per call. Now the budget is asked first (the
    invocation's log_gate), with each line's size as written."""
    seen: list[int] = []

    def gate(size: int) -> bool:
        seen.append(size)
        return len(seen) <= 10

    fn = jail.function(JSON_LINES, mode)
    r = await fn(log_gate=gate)
    assert r.outcome == "ok" and r.body == b"done", describe(r)
    assert len(seen) == 301, len(seen)  # every line asked once: 300 printed, 1 ctx.log
    assert len([e for e in r.logs if e.stream == "stdout"]) == 10
    assert r.logs[0].fields.get("y") == [[] for _ in range(200)]  # kept ones decoded
    assert r.logs_dropped == 291
    await fn.assert_recovers()


# ---- 7. a load error's message of 2,000 emoji is still a load error ---------------------

EMOJI_IMPORT_ERROR = """
raise ImportError("\\U0001F600" * 3000)

def handler(request, ctx):
    return "never"
"""


async def test_an_import_error_of_any_text_is_an_error_not_a_jail_failure(jail: Jail) -> None:
    """2,000 characters of message escape to up to 24 KB of JSON (an emoji is
    two \\uXXXX): over the 16 KiB control frame cap, the function's own import
    error was reported as 503 jail_failure."""
    r = await jail.cold(EMOJI_IMPORT_ERROR)
    assert (r.outcome, r.error_type) == ("error", "ImportError"), describe(r)
    assert (r.error_message or "").endswith("\U0001F600" * 10), describe(r)
