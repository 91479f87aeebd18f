"""What a warm invocation may see of earlier ones on the same worker: nothing
made at invocation time (memory, fds, threads, processes, /tmp); what the
module did at import time is shared by design (docs/jail.md)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

from jail import Invocation, JailRunner, Limits
from jail.pool import WarmPool
from tests.jailtest import Deploy, Jail, body_json, describe

STATE = """
import os, threading, time
IMPORTED_AT = time.time()          # import time: shared by every invocation of this worker
CALLS = []                         # module global, mutated by each invocation

def handler(request, ctx):
    CALLS.append(1)
    fd = os.open("/dev/null", os.O_RDONLY)        # an fd left open on purpose
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
    return {"calls": len(CALLS), "fd": fd, "threads": threading.active_count(),
            "imported_at": IMPORTED_AT, "pid": os.getpid()}
"""


async def test_no_invocation_state_reaches_the_next(jail: Jail) -> None:
    worker = await jail.worker(STATE)
    first = await worker.invoke(Invocation("a", "f", 1, "t"), start="warm")
    second = await worker.invoke(Invocation("b", "f", 1, "t"), start="warm")
    a, b = body_json(first), body_json(second)
    assert a["calls"] == 1 and b["calls"] == 1, (describe(first), describe(second))
    assert a["fd"] == b["fd"]  # the same lowest free fd: the first one's fd is gone
    assert a["threads"] == b["threads"] == 2  # main + its own thread; none carried over
    assert a["pid"] != b["pid"]  # a fresh process every time
    assert a["imported_at"] == b["imported_at"]  # import-time state is the worker's


async def test_a_new_version_never_runs_old_code(runner: JailRunner, deploy: Deploy) -> None:
    old = deploy("def handler(r, c):\n    return 'old'\n")
    new = deploy("def handler(r, c):\n    return 'new'\n")
    pool = WarmPool(runner.config, idle_s=30)
    pool.start()
    try:
        lim = Limits(timeout_s=5)
        spec_old = runner.spec(old, "handler:handler", lim)
        spec_new = runner.spec(new, "handler:handler", lim)
        inv = Invocation("i", "f", 1, "t")
        # an in-flight call on the old version while the new one arrives
        slow = asyncio.create_task(pool.run("t/f@1:a", spec_old, inv))
        r_new = await pool.run("t/f@2:b", spec_new, replace(inv, version=2))
        r_old = await slow
        assert r_old.body == b"old" and r_new.body == b"new"
        for _ in range(3):
            r = await pool.run("t/f@2:b", spec_new, replace(inv, version=2))
            assert r.body == b"new", describe(r)
        assert all(k.startswith("t/f@2") for k in pool._keys if pool._keys[k].idle)
    finally:
        await pool.aclose()


def test_fixture_paths_are_short(runner: JailRunner) -> None:
    assert len(str(Path(runner.jail_dir) / "sock" / ("x" * 16) / "proxy.sock")) < 100
