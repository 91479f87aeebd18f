"""A burst of short calls waits for a busy warm worker instead of cold-starting."""

from __future__ import annotations

import asyncio
import sys

import pytest

from jail import Invocation, JailRunner, Limits
from jail.pool import WarmPool
from tests.jailtest import Deploy, describe

QUICK = "def handler(request, ctx):\n    return 'quick'\n"
SLOW = "import time\ndef handler(request, ctx):\n    time.sleep(0.3)\n    return 'slow'\n"


async def test_short_calls_queue_for_the_busy_worker(runner: JailRunner, deploy: Deploy) -> None:
    pool = WarmPool(runner.config, max_idle_per_key=1, idle_s=30)  # no hot spare
    pool.start()
    try:
        spec = runner.spec(deploy(QUICK), "handler:handler", Limits(timeout_s=5))
        key = "t/quick@1:a"
        first = await pool.run(key, spec, Invocation("i0", "quick", 1, "t"))
        assert first.start == "cold", describe(first)
        for i in range(5):  # a few warm calls: the pool learns they take milliseconds
            r = await pool.run(key, spec, Invocation(f"w{i}", "quick", 1, "t"))
            assert (r.start, r.body) == ("warm", b"quick"), describe(r)
        assert pool.stats.started == 1
        burst = await asyncio.gather(
            *(pool.run(key, spec, Invocation(f"b{i}", "quick", 1, "t")) for i in range(3))
        )
        assert [r.body for r in burst] == [b"quick"] * 3
        # One worker served all three in turn: waiting a few milliseconds for it
        # beat starting two more jails (tens of milliseconds each).
        assert [r.start for r in burst] == ["warm"] * 3, [describe(r) for r in burst]
        assert pool.stats.started == 1
    finally:
        await pool.aclose()


async def test_long_calls_do_not_wait(runner: JailRunner, deploy: Deploy) -> None:
    pool = WarmPool(runner.config, max_idle_per_key=1, idle_s=30)
    pool.start()
    try:
        spec = runner.spec(deploy(SLOW), "handler:handler", Limits(timeout_s=5))
        key = "t/slow@1:a"
        await pool.run(key, spec, Invocation("i0", "slow", 1, "t"))
        await pool.run(key, spec, Invocation("i1", "slow", 1, "t"))  # warm: ~300 ms
        burst = await asyncio.gather(
            *(pool.run(key, spec, Invocation(f"b{i}", "slow", 1, "t")) for i in range(2))
        )
        assert [r.body for r in burst] == [b"slow"] * 2
        # Longer than a start: the second call gets a worker of its own at once.
        assert sorted(r.start for r in burst) == ["cold", "warm"], [describe(r) for r in burst]
        assert pool.stats.started == 2
    finally:
        await pool.aclose()


async def test_calls_that_keep_waiting_scale_the_version_out(
    runner: JailRunner, deploy: Deploy
) -> None:
    pool = WarmPool(runner.config, max_idle_per_key=3, idle_s=30)
    pool.start()
    try:
        spec = runner.spec(deploy(QUICK), "handler:handler", Limits(timeout_s=5))
        key = "t/quick@1:b"
        for i in range(6):  # one cold start, then warm calls (and a hot spare)
            await pool.run(key, spec, Invocation(f"w{i}", "quick", 1, "t"))
        for _ in range(20):
            burst = await asyncio.gather(
                *(pool.run(key, spec, Invocation(f"b{i}", "quick", 1, "t")) for i in range(4))
            )
            assert [r.body for r in burst] == [b"quick"] * 4
            # Waiting calls take whichever worker is free first; none starts cold.
            assert [r.start for r in burst] == ["warm"] * 4, [describe(r) for r in burst]
            if pool.stats.started >= 3:
                break
            await asyncio.sleep(0.05)  # the background start finishes
        # A third worker was started for the waiting calls, and no more than
        # max_idle_per_key: four concurrent calls share three workers.
        assert pool.stats.started == 3
        await asyncio.gather(
            *(pool.run(key, spec, Invocation(f"c{i}", "quick", 1, "t")) for i in range(4))
        )
        await asyncio.sleep(0.2)
        assert pool.stats.started == 3
    finally:
        await pool.aclose()


async def test_background_workers_respect_the_memory_budget(
    runner: JailRunner, deploy: Deploy
) -> None:
    """Workers started in the background (a hot version's second worker) went
    to the idle list unchecked: 83 idle workers of 32 MB sat over a 2,048 MB
    budget until some later call. Budget here: three 64 MB workers."""
    pool = WarmPool(runner.config, max_idle_per_key=4, idle_s=30, memory_budget_mb=3 * 64)
    pool.start()
    try:
        for n in range(4):
            spec = runner.spec(deploy(QUICK + f"# {n}\n"), "handler:handler",
                               Limits(timeout_s=5, memory_mb=64))
            for i in range(2):  # twice in a row: hot, so a second worker starts
                r = await pool.run(f"t/q{n}@1:a", spec, Invocation(f"i{n}{i}", "q", 1, "t"))
                assert r.body == b"quick", describe(r)
        for _ in range(100):  # let the background starts finish
            if not any(e.starting for e in pool._keys.values()):
                break
            await asyncio.sleep(0.05)
        idle = [w for e in pool._keys.values() for w in e.idle]
        assert sum(w.spec.limits.memory_mb for w in idle) <= 3 * 64, len(idle)
        assert pool.stats.evicted > 0
    finally:
        await pool.aclose()


async def test_one_tenants_big_worker_does_not_evict_the_others(
    runner: JailRunner, deploy: Deploy
) -> None:
    """The budget was one LRU across tenants: one call of tenant A's function
    with a large memory limit closed tenant B's idle workers, so B's next calls
    were cold (B could see that: a channel, and a denial of warm starts). Now
    the tenant holding the most idle memory gives way first. Budget: 192 MB;
    B keeps two 64 MB workers, A's 160 MB worker is the one that goes."""
    pool = WarmPool(runner.config, max_idle_per_key=1, idle_s=30, memory_budget_mb=3 * 64)
    pool.start()
    try:
        small = Limits(timeout_s=5, memory_mb=64)
        b_specs = [runner.spec(deploy(QUICK + f"# b{n}\n"), "handler:handler", small)
                   for n in range(2)]
        for n, spec in enumerate(b_specs):
            r = await pool.run(f"tb/q{n}@1:a", spec, Invocation(f"b{n}", "q", 1, "tb"))
            assert r.body == b"quick", describe(r)
        started = pool.stats.started
        big = runner.spec(deploy(QUICK + "# a\n"), "handler:handler",
                          Limits(timeout_s=5, memory_mb=160))
        r = await pool.run("ta/big@1:a", big, Invocation("a0", "big", 1, "ta"))
        assert r.body == b"quick", describe(r)
        idle = {k: len(e.idle) for k, e in pool._keys.items() if e.idle}
        assert idle == {"tb/q0@1:a": 1, "tb/q1@1:a": 1}, idle
        for n, spec in enumerate(b_specs):  # B's calls are still warm: no new worker
            r = await pool.run(f"tb/q{n}@1:a", spec, Invocation(f"b{n}x", "q", 1, "tb"))
            assert r.body == b"quick", describe(r)
        assert pool.stats.started == started + 1  # A's worker only
    finally:
        await pool.aclose()


IDLE_BURNER = """
import os

def _burn():
    if os.fork() == 0:  # in every forked child: a CPU loop nobody waits for
        while True:
            pass

os.register_at_fork(after_in_child=_burn)

def handler(request, ctx):
    return 'quick'
"""


IDLE_CHURN = """
import os, signal, time

_managing = False

def _manage():
    global _managing
    if _managing:
        return  # a burner: the hook runs in every fork, the manager's too
    if os.fork() == 0:  # a manager whose children the kernel reaps: no CPU in any total
        _managing = True
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        while True:
            if os.fork() == 0:
                t0 = time.monotonic()
                while time.monotonic() - t0 < 0.02:
                    pass
                os._exit(0)
            time.sleep(0.03)

os.register_at_fork(after_in_child=_manage)

def handler(request, ctx):
    return 'quick'
"""


@pytest.mark.parametrize("source", [IDLE_BURNER, IDLE_CHURN], ids=["loop", "churn"])
async def test_an_idle_worker_whose_jail_burns_cpu_is_closed(
    runner: JailRunner, deploy: Deploy, source: str
) -> None:
    """Tenant code can run in a warm jail with no call in flight: an at-fork hook
    runs in each pre-forked child. Its CPU loops ran until the next call or the
    idle timeout (120 s), unseen by timeouts, concurrency caps and the penalty
    box. An idle worker that uses CPU is now closed within a few seconds; a
    quiet one stays."""
    pool = WarmPool(runner.config, max_idle_per_key=1, idle_s=60)
    pool.start()
    try:
        lim = Limits(timeout_s=5, memory_mb=64)
        burner = runner.spec(deploy(source), "handler:handler", lim)
        quiet = runner.spec(deploy(QUICK + "# quiet\n"), "handler:handler", lim)
        for key, spec in (("t/burn@1:a", burner), ("t/quiet@1:a", quiet)):
            r = await pool.run(key, spec, Invocation("i-" + key, "f", 1, "t"))
            assert r.body == b"quick", describe(r)
        for _ in range(80):  # up to 8 s: looked at once a second, closed at the third look
            if pool.stats.busy_idle:
                break
            await asyncio.sleep(0.1)
        assert pool.stats.busy_idle == 1
        idle = {k: len(e.idle) for k, e in pool._keys.items() if e.idle}
        assert idle == {"t/quiet@1:a": 1}, idle
    finally:
        await pool.aclose()


async def _burst_in(runner: JailRunner, slot: str, seconds: float) -> None:
    """A CPU burst of ``seconds`` run inside a slot (joined before it starts)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import sys, time\nsys.stdin.read(1)\nt = time.monotonic()\n"
        f"while time.monotonic() - t < {seconds}: pass\n",
        stdin=asyncio.subprocess.PIPE,
    )
    for procs in runner.config.slots.procs_files(slot):
        procs.write_text(str(proc.pid))
    assert proc.stdin is not None
    proc.stdin.write(b"x")
    await proc.stdin.drain()
    assert await proc.wait() == 0
    await asyncio.sleep(0.4)  # v1 counts CFS periods as its timer fires: a little late


async def test_an_idle_worker_busy_at_one_look_only_is_kept(
    runner: JailRunner, deploy: Deploy
) -> None:
    """The settling of a worker's last call (the runtime's clean-up, the next
    child's fork) can fall after the watch's first look on a busy machine, and
    on cgroup v1 any wake-up counts a whole CFS period: a quiet worker was
    closed now and then (a full test run caught it). One small busy look is not
    enough; two in a row are, and so is IDLE_CPU_MS_TOTAL since the first look,
    which a burner busy at every other look reaches. The watch is driven by
    hand here; the bursts are 60 ms of CPU run inside the worker's slot."""
    pool = WarmPool(runner.config, max_idle_per_key=1, idle_s=60)  # no loop: looks by hand
    try:
        spec = runner.spec(deploy(QUICK), "handler:handler", Limits(timeout_s=5, memory_mb=64))
        r = await pool.run("t/q@1:a", spec, Invocation("i-1", "f", 1, "t"))
        assert r.body == b"quick", describe(r)
        (worker,) = pool._keys["t/q@1:a"].idle
        assert worker.slot is not None
        await asyncio.sleep(1.2)  # past IDLE_WATCH_S since its call
        pool.watch_idle()  # the first look: the baseline
        await _burst_in(runner, worker.slot, 0.06)
        pool.watch_idle()  # busy: 60 ms of CPU, one to three periods on v1
        assert worker.idle_busy_looks == 1
        assert list(pool._keys["t/q@1:a"].idle) == [worker] and pool.stats.busy_idle == 0
        await asyncio.sleep(1.0)
        pool.watch_idle()  # quiet again
        assert worker.idle_busy_looks == 0
        assert list(pool._keys["t/q@1:a"].idle) == [worker] and pool.stats.busy_idle == 0
        r = await pool.run("t/q@1:a", spec, Invocation("i-2", "f", 1, "t"))
        assert r.body == b"quick" and r.start == "warm", describe(r)

        # Busy at every other look: never two in a row, but it adds up.
        await asyncio.sleep(1.2)
        pool.watch_idle()
        for _ in range(8):
            await _burst_in(runner, worker.slot, 0.06)
            pool.watch_idle()
            if pool.stats.busy_idle:
                break
            await asyncio.sleep(0.6)
            pool.watch_idle()
            if pool.stats.busy_idle:  # the burst counted late, at two looks in a row
                break
        assert pool.stats.busy_idle == 1 and not pool._keys["t/q@1:a"].idle
    finally:
        await pool.aclose()
