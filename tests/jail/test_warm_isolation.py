"""What a warm invocation may see of earlier ones on the same worker: nothing
made at invocation time (memory, fds, threads, processes, /tmp); what the
module did at import time is shared by design (docs/jail.md)."""

from __future__ import annotations

import asyncio
import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest

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


STRAGGLER = """
import os, time

def handler(request, ctx):
    if request.text() == "spawn":
        if os.fork() == 0:  # keeps the channels: prints and logs after the answer
            for i in range(400):
                print("straggler line", i, flush=True)
                ctx.log.info("straggler ctx line")
                time.sleep(0.002)
            os._exit(0)
        print("own line of the spawner")
        return "spawned"
    print("own line", request.text())
    return "quiet " + request.text()
"""


async def test_output_after_an_answer_never_reaches_the_next_invocation(jail: Jail) -> None:
    """A child's channels (stdout, stderr, ctx.log, the result) belong to the
    worker: what a straggler writes after its invocation was answered is dropped,
    never taken as the next invocation's logs or answer."""
    worker = await jail.worker(STRAGGLER)
    for round_ in range(5):
        first = await worker.invoke(Invocation("a", "f", 1, "t", body=b"spawn"), start="warm")
        assert first.outcome == "ok" and first.body == b"spawned", describe(first)
        assert "own line of the spawner" in [x.message for x in first.logs]
        second = await worker.invoke(
            Invocation("b", "f", 1, "t", body=str(round_).encode()), start="warm"
        )
        assert second.body == f"quiet {round_}".encode(), describe(second)
        assert [x.message for x in second.logs] == [f"own line {round_}"], describe(second)
    assert worker.alive


@pytest.mark.parametrize("size", [100, 1 << 20])  # within and beyond the socket buffer
async def test_a_child_killed_before_its_request_never_answers_another(
    jail: Jail, size: int
) -> None:
    """The idle, pre-forked child dies (killed from outside) before it reads its
    request: the request is not served by the child forked after it (a child
    runs only the request numbered for it), the call is reported, and the next
    calls get their own answers on a sound worker."""
    echo = "def handler(request, ctx):\n    return {'got': request.text()}\n"
    worker = await jail.worker(echo)
    ok = await worker.invoke(Invocation("a", "f", 1, "t", body=b"first"), start="warm")
    assert body_json(ok) == {"got": "first"}, describe(ok)
    assert worker.jail_pid is not None
    zygote = worker.jail_pid
    await asyncio.sleep(0.3)  # the first child is reaped and the next one forked
    children = Path(f"/proc/{zygote}/task/{zygote}/children")
    idle = [int(p) for p in children.read_text().split()]  # noqa: ASYNC240 (procfs, instant)
    assert len(idle) == 1, idle
    os.kill(idle[0], signal.SIGKILL)
    lost = await worker.invoke(Invocation("b", "f", 1, "t", body=b"x" * size), start="warm")
    assert lost.outcome == "killed", describe(lost)
    assert lost.body == b""
    assert not worker.alive  # its stdin may still hold (part of) the lost request
    worker = await jail.worker(echo)  # as the pool would: a fresh one
    for i in range(3):
        r = await worker.invoke(Invocation("c", "f", 1, "t", body=f"call {i}".encode()), start="warm")
        assert body_json(r) == {"got": f"call {i}"}, describe(r)


async def test_the_zygotes_rehearsal_leaves_no_trace(jail: Jail) -> None:
    """Before its first fork the zygote runs the runtime's side of an invocation
    on dummy data (request, context, ctx.log into /dev/null, responses): none of
    it reaches an invocation, which sees only its own request and its own logs."""
    worker = await jail.worker("""
def handler(request, ctx):
    ctx.log.info("mine", q=request.query_string)
    return {"q": request.query_all, "h": request.headers.items(), "p": request.path_params,
            "body": request.text()}
""")
    for n in range(2):
        r = await worker.invoke(Invocation(f"i{n}", "f", 1, "t", query_string=f"n={n}"),
                                start="warm")
        assert r.outcome == "ok", describe(r)
        assert body_json(r) == {"q": {"n": [str(n)]}, "h": [], "p": {}, "body": ""}
        assert [(e.stream, e.message, e.fields) for e in r.logs] == [
            ("ctx", "mine", {"q": f"n={n}"})
        ], describe(r)


COLLECTOR = """
import os, threading, time

SEEN = []

def collect():
    # Left running by the import: it stays in the zygote, which outlives
    # every invocation, and would copy what each one leaves in /tmp.
    while True:
        for name in os.listdir("/tmp"):
            try:
                with open("/tmp/" + name) as f:
                    SEEN.append(f.read())
            except OSError:
                pass
        time.sleep(0.001)

threading.Thread(target=collect, daemon=True).start()

def handler(request, ctx):
    if request.text() == "write":
        with open("/tmp/secret", "w") as f:
            f.write("from the first invocation")
        time.sleep(0.1)
        return {"seen": SEEN}
    return {"seen": SEEN, "threads": threading.active_count()}
"""


async def test_a_thread_left_by_the_import_never_carries_one_invocation_to_the_next(
    jail: Jail,
) -> None:
    """Such a worker serves one invocation: its zygote's thread would see each
    invocation's /tmp and every later child would inherit what it copied."""
    fn = jail.function(COLLECTOR, "warm")
    first = body_json(await fn("write"))
    assert first == {"seen": []}, first  # a child has no threads, and the copy is the zygote's
    assert not fn.alive, "a worker whose module left a thread running serves one invocation"
    second = body_json(await fn("look"))
    assert second == {"seen": [], "threads": 1}, second
    assert fn.restarts == 1
