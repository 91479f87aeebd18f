"""Hostile functions against the limits: pids, memory, wall time, CPU time,
output, open files and the CPU share. Each asserts its exact outcome and
limit, then that the same code and a good function still work."""

from __future__ import annotations

import asyncio
import time

import pytest

from jail import Limits
from jail.command import RUNTIME_MEMORY_MB
from tests.jailtest import Jail, body_json, describe, invocation

LIM = Limits(timeout_s=5, memory_mb=64, pids=16)
SHORT = Limits(timeout_s=1, memory_mb=64, pids=16)


async def test_fork_bomb_hits_the_pids_limit(jail: Jail, mode: str) -> None:
    src = """
import os

def handler(request, ctx):
    while True:
        os.fork()
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("killed", "pids", 16.0), describe(r)
    assert r.error_message == "hit the process limit"
    assert any("BlockingIOError" in e.message for e in r.logs), describe(r)
    await fn.assert_recovers()


async def test_a_fork_bomb_that_swallows_errors_times_out(jail: Jail, mode: str) -> None:
    """It never ends by itself (every process keeps retrying): the wall clock ends it."""
    src = """
import os

def handler(request, ctx):
    while True:
        try:
            os.fork()
        except OSError:
            pass
"""
    fn = jail.function(src, mode, limits=SHORT)
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("timeout", "wall_time", 1.0), describe(r)
    await fn.assert_recovers()


async def test_a_fork_bomb_on_a_small_cpu_quota_times_out_and_the_worker_stays(
    jail: Jail, mode: str
) -> None:
    """At a tenth of a core (the penalty box) 15 spinning processes use up the
    quota the zygote shares; the gateway kills them from outside at the
    deadline, so the warm worker survives and the next call is warm."""
    src = """
import os

def handler(request, ctx):
    if request.text() == "calm":
        return "calm"
    while True:
        try:
            os.fork()
        except OSError:
            pass
"""
    low = Limits(timeout_s=1, memory_mb=64, pids=16, cpu_ms_per_sec=100)
    fn = jail.function(src, mode, limits=low)
    for _ in range(3):
        r = await fn()
        assert (r.outcome, r.limit_name) == ("timeout", "wall_time"), describe(r)
        if mode == "warm":
            assert fn.alive and fn.restarts == 0, "the cancel must finish within its grace"
    r = await fn("calm")
    assert (r.outcome, r.body) == ("ok", b"calm"), describe(r)
    if mode == "warm":
        assert fn.alive and fn.restarts == 0
        assert r.start == "warm"
    await fn.assert_recovers()


async def test_thread_bomb_hits_the_pids_limit(jail: Jail, mode: str) -> None:
    src = """
import threading, time

def handler(request, ctx):
    threads = []
    while True:
        t = threading.Thread(target=time.sleep, args=(60,), daemon=True)
        t.start()
        threads.append(t)
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("killed", "pids", 16.0), describe(r)
    assert any("can't start new thread" in e.message for e in r.logs), describe(r)
    await fn.assert_recovers()


async def test_memory_bomb_is_oom(jail: Jail, mode: str) -> None:
    src = """
def handler(request, ctx):
    hog = []
    while True:
        hog.append(bytearray(1 << 20))
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("oom", "memory", 64.0), describe(r)
    # Stopped at its limit: the jail's cgroup holds the function's 64 MB plus the
    # runtime's share, and the peak RSS also counts pages shared with the zygote.
    assert r.peak_memory_mb is not None
    assert 48 < r.peak_memory_mb < 64 + RUNTIME_MEMORY_MB + 16, describe(r)
    await fn.assert_recovers()


async def test_memory_bomb_in_threads_is_oom(jail: Jail, mode: str) -> None:
    src = """
import threading

def hog(store):
    while True:
        store.append(b"x" * (1 << 20))

def handler(request, ctx):
    store = []
    ts = [threading.Thread(target=hog, args=(store,)) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
"""
    fn = jail.function(src, mode, limits=LIM)
    r = await fn()
    assert (r.outcome, r.limit_name) == ("oom", "memory"), describe(r)
    await fn.assert_recovers()


async def test_cpu_loop_times_out_on_the_wall_clock(jail: Jail, mode: str) -> None:
    # cpu_s above the timeout: with the default (ceil(timeout_s)) a one-thread
    # loop reaches its CPU seconds and its wall time in the same instant, and
    # either may be the one that ends it (both are "timeout").
    src = "def handler(request, ctx):\n    while True:\n        pass\n"
    fn = jail.function(src, mode, limits=Limits(timeout_s=1, memory_mb=64, pids=16, cpu_s=5))
    t0 = time.monotonic()
    r = await fn()
    elapsed = time.monotonic() - t0
    assert (r.outcome, r.limit_name, r.limit_value) == ("timeout", "wall_time", 1.0), describe(r)
    assert r.error_message == "exceeded 1 s"
    # cold: the wall clock also holds the jail's start-up (the timeout is the handler's)
    assert 1000 <= r.wall_ms < (1400 if mode == "warm" else 2000), describe(r)
    assert elapsed < 2.5  # the jail is torn down promptly too
    await fn.assert_recovers()


async def test_cpu_time_limit_below_the_timeout(jail: Jail, mode: str) -> None:
    """RLIMIT_CPU (cpu_s) ends a CPU loop before the wall clock does (with room
    to spare on a busy machine, where one CPU second takes longer than one second)."""
    src = "def handler(request, ctx):\n    while True:\n        pass\n"
    fn = jail.function(src, mode, limits=Limits(timeout_s=8, memory_mb=64, pids=16, cpu_s=1))
    r = await fn()
    assert (r.outcome, r.limit_name, r.limit_value) == ("timeout", "cpu_time", 1.0), describe(r)
    # rusage lags RLIMIT_CPU's own count on a busy machine (880 ms seen at 1 s)
    assert r.cpu_ms is not None and 500 <= r.cpu_ms < 2500, describe(r)
    assert r.wall_ms < 8000
    await fn.assert_recovers()


@pytest.mark.parametrize("how", ["time.sleep(10**6)", "threading.Event().wait()",
                                 "select.select([], [], [])", "os.read(0, 1)",
                                 "signal.pause()"])
async def test_sleep_forever_times_out_close_to_the_timeout(jail: Jail, mode: str,
                                                            how: str) -> None:
    src = f"""
import os, select, signal, threading, time

def handler(request, ctx):
    {how}
    return "woke up"
"""
    if how == "os.read(0, 1)":
        # stdin is /dev/null in the jail: a read returns at once (EOF)
        fn = jail.function(src, mode, limits=SHORT)
        r = await fn()
        assert (r.outcome, r.body) == ("ok", b"woke up"), describe(r)
        await fn.assert_recovers()
        return
    fn = jail.function(src, mode, limits=SHORT)
    t0 = time.monotonic()
    r = await fn()
    elapsed = time.monotonic() - t0
    assert (r.outcome, r.limit_name) == ("timeout", "wall_time"), describe(r)
    assert 1000 <= r.wall_ms < (1400 if mode == "warm" else 2000), describe(r)
    assert elapsed < 2.5
    await fn.assert_recovers()


@pytest.mark.parametrize("stream", ["stdout", "stderr", "ctx", "lines"])
async def test_100mb_of_output_is_output_limit(jail: Jail, mode: str, stream: str) -> None:
    src = f"""
import sys

def handler(request, ctx):
    line = "x" * 1023
    stream = "{stream}"
    for _ in range(100 * 1024):
        if stream == "stdout":
            sys.stdout.write(line + "\\n")
        elif stream == "stderr":
            sys.stderr.write(line + "\\n")
        elif stream == "ctx":
            ctx.log.info(line)
        else:
            for _ in range(1024):
                print("y")
    return "finished"
"""
    fn = jail.function(src, mode, limits=LIM)
    t0 = time.monotonic()
    r = await fn()
    assert (r.outcome, r.limit_name) == ("output_limit", "output"), describe(r)
    # Short lines meet the line cap first: the record names the cap that was hit.
    assert r.limit_value == (LIM.log_lines if stream == "lines" else LIM.log_bytes), describe(r)
    assert r.logs_truncated
    assert r.body == b"" and r.status is None
    kept = sum(len(e.message) + 1 for e in r.logs)
    assert 0 < kept <= LIM.log_bytes
    assert len(r.logs) <= LIM.log_lines
    assert time.monotonic() - t0 < 4  # cut off early, not after writing 100 MB
    await fn.assert_recovers()


@pytest.mark.parametrize("prefix", ["framed", "garbage"])
async def test_a_flood_on_the_result_fd_is_output_limit(jail: Jail, mode: str, prefix: str) -> None:
    """Endless bytes on the result fd, behind a frame prefix that promises a
    small answer or behind none at all: the gateway stops at the response cap
    and kills the child; it does not read until the timeout."""
    src = f"""
import os, struct

def handler(request, ctx):
    # framed: a valid header length and a body far over the cap; garbage: no frame
    os.write(3, struct.pack(">II", 2, 1 << 30) if "{prefix}" == "framed" else b"\\xff" * 8)
    block = b"z" * 65536
    while True:
        os.write(3, block)
"""
    fn = jail.function(src, mode, limits=Limits(timeout_s=10, memory_mb=64, pids=16))
    t0 = time.monotonic()
    r = await fn()
    assert (r.outcome, r.limit_name) == ("output_limit", "response"), describe(r)
    assert time.monotonic() - t0 < 5  # stopped at the cap, long before the 10 s timeout
    await fn.assert_recovers()


async def test_an_import_time_thread_flooding_the_channels_retires_the_worker(
    jail: Jail,
) -> None:
    """A thread the module starts at import lives in the zygote, which is never
    killed between invocations; if it writes to the children's output channels
    (inherited there), the gateway stops reading them past a cap and retires the
    worker instead of reading forever."""
    src = """
import os, stat, threading, time

def _is_socket(fd):
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False

CTL = next(fd for fd in range(3, 64) if _is_socket(fd))  # the runtime's control socket

def flood(fd):
    time.sleep(0.5)  # after the channels arrived
    block = b"w" * 65536
    try:
        while True:
            os.write(fd, block)
    except OSError:
        pass

for fd in range(5, 13):  # a thread each: a write to a full channel blocks
    if fd != CTL:
        threading.Thread(target=flood, args=(fd,), daemon=True).start()

def handler(request, ctx):
    return "answered"
"""
    worker = await jail.worker(src, limits=Limits(timeout_s=5, memory_mb=64, pids=32))
    r = await worker.invoke(invocation("x"), start="warm")
    assert r.outcome in ("ok", "output_limit"), describe(r)
    for _ in range(100):
        if not worker.alive:
            break
        await asyncio.sleep(0.05)
    assert not worker.alive, "a worker whose zygote floods its channels must be retired"
    await jail.assert_good_function_works()


async def test_open_files_limit(jail: Jail, mode: str) -> None:
    src = """
import errno, os

def handler(request, ctx):
    fds = []
    try:
        while True:
            fds.append(os.open("/dev/null", os.O_RDONLY))
    except OSError as e:
        return {"errno": errno.errorcode[e.errno], "highest": max(fds)}
"""
    fn = jail.function(src, mode, limits=Limits(timeout_s=5, memory_mb=64, open_files=40))
    got = body_json(await fn())
    assert got == {"errno": "EMFILE", "highest": 39}
    await fn.assert_recovers()


BURNER = """
import os, time

def handler(request, ctx):
    n = os.cpu_count()
    t0 = time.monotonic()
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:
                pass
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    t = os.times()
    return {"cores": n, "wall_ms": (time.monotonic() - t0) * 1000,
            "cpu_ms": (t.children_user + t.children_system) * 1000}
"""


async def test_cpu_burner_on_every_core_is_held_to_its_share(jail: Jail, mode: str) -> None:
    """cpu_ms_per_sec=500: the jail gets half a core, however many it burns.

    nsjail sets a CFS period of one second with a quota of 500 ms, so over a
    window of w ms the jail can get at most 0.5 * w plus one period's quota
    (the window need not start on a period boundary). Unlimited, the burners
    would get cores * w (3000 ms on two cores).
    """
    limits = Limits(timeout_s=8, memory_mb=64, pids=16, cpu_ms_per_sec=500)
    fn = jail.function(BURNER, mode, limits=limits)
    r = await fn()
    got = body_json(r)
    assert got["cores"] >= 2
    wall = got["wall_ms"]
    assert wall >= 1500
    assert got["cpu_ms"] <= 0.5 * wall + 500 + 100, got
    assert r.cpu_ms is not None and r.cpu_ms <= 0.5 * wall + 500 + 150, describe(r)
    assert got["cpu_ms"] >= 100, got  # the burners did run (even on a busy machine)
    await fn.assert_recovers()


async def test_cpu_loop_with_default_limits_is_a_timeout(jail: Jail, mode: str) -> None:
    """Default cpu_s = ceil(timeout_s): the first of the two equal limits ends it."""
    src = "def handler(request, ctx):\n    while True:\n        pass\n"
    fn = jail.function(src, mode, limits=SHORT)
    r = await fn()
    assert r.outcome == "timeout", describe(r)
    assert (r.limit_name, r.limit_value) in (("wall_time", 1.0), ("cpu_time", 1.0)), describe(r)
    assert r.wall_ms < (1400 if mode == "warm" else 2000), describe(r)
    await fn.assert_recovers()
