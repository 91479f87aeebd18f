"""Prepared launchers: joined to a cgroup slot before a cold start needs one."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

from jail import JailRunner, Limits
from jail.cgroups import SlotLimits, cpu_weight, long_call_weight
from jail.launcher import Launchers
from jail.worker import LONG_CALL_S
from tests.jailtest import Jail, describe, invocation, make_deploy

BOMB = "def handler(request, ctx):\n    x = bytearray(200 << 20)\n    return len(x)\n"
HELLO = "def handler(request, ctx):\n    return {'hello': request.text()}\n"


async def _until_ready(launchers: Launchers, n: int) -> None:
    async with asyncio.timeout(15):
        while launchers.ready < n:
            await asyncio.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_cold_starts_take_prepared_launchers_with_the_functions_limits() -> None:
    jail_dir = Path(tempfile.mkdtemp(prefix="nsfaas-l-", dir="/tmp"))
    os.chmod(jail_dir, 0o711)  # noqa: S103 (the jail uid must traverse it)
    runner = await asyncio.to_thread(JailRunner.create, jail_dir=jail_dir, spare_launchers=2)
    try:
        launchers = runner.config.launchers
        assert launchers is not None
        slots = runner.config.slots
        deploy = make_deploy(runner)
        hello = runner.spec(deploy(HELLO), "handler:handler", Limits(timeout_s=5, memory_mb=64))
        bomb = runner.spec(deploy(BOMB), "handler:handler", Limits(timeout_s=5, memory_mb=64))

        # Nothing prepared yet: the first start joins its slot itself, and asks for spares.
        r = await runner.run(hello, invocation("one"))
        assert (r.outcome, r.body) == ("ok", b'{"hello": "one"}'), describe(r)
        assert launchers.used == 0
        await _until_ready(launchers, 2)
        # Each waits inside its slot's cgroups already (every controller's cgroup.procs).
        waiting = {p.slot: p.proc.pid for p in launchers._ready}
        for slot, pid in waiting.items():
            for procs in slots.procs_files(slot):
                assert str(pid) in procs.read_text().split(), (procs, pid)

        # The next cold start execs nsjail from one of them, with this function's
        # limits written to that slot: the memory limit holds.
        r = await runner.run(bomb, invocation("boom"))
        assert launchers.used == 1
        assert (r.outcome, r.limit_name) == ("oom", "memory"), describe(r)
        r = await runner.run(hello, invocation("two"))
        assert (r.outcome, r.body) == ("ok", b'{"hello": "two"}'), describe(r)
        assert launchers.used == 2
        await runner.settle()

        # Shutdown: the idle launchers exit without exec and their slots are freed.
        await _until_ready(launchers, 2)
        pids = [p.proc.pid for p in launchers._ready]
        held = launchers.held
        await runner.aclose()
        assert launchers.ready == 0
        assert not any(_alive(pid) for pid in pids)
        assert not any(slots.pids_in(s) for s in held)
        assert slots.busy == set()
        assert launchers.take() is None  # closed: cold starts use the plain launcher
    finally:
        shutil.rmtree(jail_dir, ignore_errors=True)


def test_a_slots_cpu_weight_follows_its_quota(runner: JailRunner) -> None:
    """Within the quota's period a jail with CPU left competes by weight: a
    throttled function (100 ms/s) weighs a fifth of a default one (500 ms/s), so
    it yields to the others' calls instead of running its bursts as an equal."""
    slots = runner.config.slots
    for ms, v1, v2 in ((500, 512, 50), (100, 102, 10), (1000, 1024, 100)):
        slot = slots.acquire(SlotLimits(memory_bytes=64 << 20, pids=8, cpu_ms_per_sec=ms))
        try:
            groups = slots.groups
            if groups.version == 2:
                path = groups.root / slot / "cpu.weight"
                assert int(path.read_text()) == v2, (ms, path)
            else:
                path = groups.root / "cpu" / groups.parent / slot / "cpu.shares"
                assert int(path.read_text()) == v1, (ms, path)
        finally:
            slots.release(slot)


def _weight_file(runner: JailRunner, slot: str) -> Path:
    groups = runner.config.slots.groups
    if groups.version == 2:
        return groups.root / slot / "cpu.weight"
    return groups.root / "cpu" / groups.parent / slot / "cpu.shares"


async def test_a_long_call_yields_the_cpu_until_it_ends(jail: Jail) -> None:
    """A call that runs past LONG_CALL_S drops its slot to a small fraction of
    its weight (a CPU loop runs on what the quick calls leave); the weight is
    back when the call ends, and a quick call never changes it."""
    busy = (
        "import time\n"
        "def handler(r, c):\n"
        "    end = time.monotonic() + float(r.body or b'0')\n"
        "    while time.monotonic() < end:\n"
        "        pass\n"
        "    return 'done'\n"
    )
    worker = await jail.worker(busy, limits=Limits(timeout_s=5, cpu_ms_per_sec=500))
    assert worker.slot is not None
    path = _weight_file(jail.runner, worker.slot)
    version = jail.runner.config.slots.groups.version
    normal = cpu_weight(500, version=version)
    assert int(path.read_text()) == normal
    assert long_call_weight(500, version=version) < normal // 16

    quick = await worker.invoke(invocation(b"0"), start="warm")
    assert quick.outcome == "ok", describe(quick)
    assert int(path.read_text()) == normal

    long = asyncio.create_task(worker.invoke(invocation(b"0.6"), start="warm"))
    await asyncio.sleep(LONG_CALL_S + 0.25)
    assert int(path.read_text()) == long_call_weight(500, version=version)
    result = await long
    assert result.outcome == "ok" and result.body == b"done", describe(result)
    assert int(path.read_text()) == normal

    # A CPU loop killed at its timeout gives the weight back too, and the
    # worker's next call runs at the usual weight.
    loop = await worker.invoke(invocation(b"60"), start="warm")
    assert loop.outcome == "timeout", describe(loop)
    assert int(path.read_text()) == normal
    after = await worker.invoke(invocation(b"0"), start="warm")
    assert after.outcome == "ok" and after.body == b"done", describe(after)
