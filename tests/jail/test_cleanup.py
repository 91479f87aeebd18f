"""No jail outlives its work: 200 invocations of every kind, then nothing left.

The test uses its own runner with a private cgroup parent and jail dir, so
that what it checks is exactly what its own jails could have left, even while
other jails run on the machine; its workers get a host-proxy socket each.
"""

from __future__ import annotations

import asyncio
import collections
import os
import random
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from jail import Invocation, JailResult, JailRunner, Limits, Worker
from jail.cgroups import CONTROLLERS
from jail.proxy import CallContext
from tests.jailtest import describe, jail_uid_processes, make_deploy, processes_with

MARK = f"nsfaas-cleanup-{uuid.uuid4().hex[:12]}"

SOURCES = {
    "ok": """
def handler(request, ctx):
    print("line", request.text())
    return {"n": ctx.kv.incr("n")}
""",
    "error": "def handler(request, ctx):\n    raise RuntimeError('boom')\n",
    "daemon": """
import os, time

def handler(request, ctx):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            os.closerange(3, 1024)
            os.execv("/usr/bin/python3", ["python3", "-I", "-S", "-c",
                     "import time\\nwhile True: time.sleep(0.05)", request.text()])
        os._exit(0)
    time.sleep(0.05)
    return "spawned"
""",
    "oom": """
def handler(request, ctx):
    hog = []
    while True:
        hog.append(bytearray(1 << 20))
""",
    "timeout": "import time\n\ndef handler(request, ctx):\n    time.sleep(60)\n",
    "pids": "import os\n\ndef handler(request, ctx):\n    while True:\n        os.fork()\n",
}
EXPECTED = {"ok": ("ok", None), "error": ("error", None), "daemon": ("ok", None),
            "oom": ("oom", "memory"), "timeout": ("timeout", "wall_time"),
            "pids": ("killed", "pids")}
COUNTS = {"ok": 120, "error": 20, "daemon": 20, "oom": 16, "timeout": 12, "pids": 12}
LIMITS = {kind: Limits(timeout_s=0.5 if kind == "timeout" else 5,
                      memory_mb=64 if kind == "pids" else 32, pids=12)
          for kind in SOURCES}


async def _proxy(ctx: CallContext, method: str, params: dict[str, Any], body: bytes
                 ) -> tuple[dict[str, Any], bytes]:
    assert method == "kv.incr"
    return {"value": 1}, b""


def _mountinfo() -> set[str]:
    return set(Path("/proc/self/mountinfo").read_text().splitlines())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def private_runner() -> Any:
    parent = f"nsfaas-cleanup-{os.getpid()}"
    jail_dir = Path(tempfile.mkdtemp(prefix="nsfaas-c-", dir="/tmp"))
    os.chmod(jail_dir, 0o711)  # noqa: S103 (the jail uid must traverse it)
    runner = JailRunner.create(jail_dir=jail_dir, cgroup_parent=parent)
    runner.proxy_handler = _proxy
    try:
        yield runner
    finally:
        shutil.rmtree(jail_dir, ignore_errors=True)
        runner.config.slots.close()
        for c in CONTROLLERS:
            d = Path("/sys/fs/cgroup") / c / parent
            if d.exists():
                for leftover in d.iterdir():
                    if leftover.is_dir():
                        leftover.rmdir()
                d.rmdir()


async def test_two_hundred_invocations_leave_nothing_behind(private_runner: JailRunner) -> None:
    runner = private_runner
    deploy = make_deploy(runner)
    code = {kind: deploy(src) for kind, src in SOURCES.items()}
    groups = [Path("/sys/fs/cgroup") / c / runner.config.cgroups.parent for c in CONTROLLERS]
    assert all(g.is_dir() for g in groups)

    mounts_before = _mountinfo()
    await asyncio.sleep(0)  # let the loop create whatever fds it keeps for good
    fds_before = _fds()

    plan = [kind for kind, n in COUNTS.items() for _ in range(n)]
    random.Random(7).shuffle(plan)  # noqa: S311 (a fixed test order, not a secret)
    assert len(plan) == 200
    warm: dict[str, Worker] = {}
    warm_locks = {kind: asyncio.Lock() for kind in SOURCES}
    sem = asyncio.Semaphore(6)
    outcomes: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: list[str] = []

    async def one(i: int, kind: str) -> None:
        inv = Invocation(f"c{i}", kind, 1, "t", body=f"{MARK}-{i}".encode())
        spec = runner.spec(code[kind], "handler:handler", LIMITS[kind])
        async with sem:
            r: JailResult
            if i % 2 == 0:
                r = await runner.run(spec, inv)
            else:
                async with warm_locks[kind]:
                    w = warm.get(kind)
                    if w is None or not w.alive:
                        if w is not None:
                            await w.aclose(kill=True)
                        w = Worker(runner.config, runner.spec(code[kind], "handler:handler",
                                                              LIMITS[kind], mode="warm"),
                                   proxy_handler=_proxy)
                        warm[kind] = w
                        async with asyncio.timeout(10):
                            await w.start()
                    r = await w.invoke(inv, start="warm")
        outcomes[(kind, r.outcome)] += 1
        if (r.outcome, r.limit_name) != EXPECTED[kind]:
            failures.append(f"{i} {kind}: {describe(r)}")

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, kind) for i, kind in enumerate(plan)))
    for w in warm.values():
        await w.aclose()
    async with asyncio.timeout(10):
        await runner.settle()  # cold jails answer first and finish their teardown after
    elapsed = time.monotonic() - t0

    assert failures == [], "\n".join(failures[:5])
    assert sum(outcomes.values()) == 200
    assert elapsed < 60, elapsed
    launchers = runner.config.launchers
    assert launchers is not None and launchers.used > 0  # cold starts took prepared ones
    await launchers.aclose()  # as the gateway's shutdown does

    # No process: neither a jail's nor a daemon's.
    assert jail_uid_processes() == {}
    assert processes_with(MARK) == []
    # No cgroup: no NSJAIL.* of nsjail's (empty leftovers count too); every slot
    # cgroup of the gateway's is free and empty, and closing the pool removes them.
    left = [str(d) for g in groups for d in g.iterdir() if d.name.startswith("NSJAIL.")]
    assert left == []
    slots = runner.config.slots
    assert slots.busy == set()
    used = sorted({d.name for g in groups for d in g.iterdir() if d.is_dir()})
    assert used and all(n.startswith("slot-") for n in used), used
    assert {n: slots.pids_in(n) for n in used if slots.pids_in(n)} == {}
    slots.close()
    assert [str(d) for g in groups for d in g.iterdir() if d.is_dir()] == []
    # No mount in the host's namespace.
    assert _mountinfo() == mounts_before
    # No temp dir: every worker's proxy directory is gone.
    assert list((runner.jail_dir / "sock").iterdir()) == []
    assert sorted(p.name for p in runner.jail_dir.iterdir()) == [
        "code", "dev", "nsjail-per-jail-uid.cfg", "runtime", "sock"
    ]
    # No fd: pipes, sockets and pidfds were all closed.
    await asyncio.sleep(0)
    assert abs(_fds() - fds_before) <= 2, (fds_before, _fds(), os.listdir("/proc/self/fd"))
