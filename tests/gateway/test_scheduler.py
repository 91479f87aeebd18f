"""Admission control, on the real Scheduler and through the app."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.app import create_app
from gateway.scheduler import Rejected, Scheduler

from .conftest import ADMIN, make_settings


def scheduler(**kw: int | float) -> Scheduler:
    base: dict[str, int | float] = {
        "max_concurrency": 4,
        "function_concurrency": 1,
        "queue_size": 8,
        "queue_timeout_s": 5.0,
    }
    base.update(kw)
    return Scheduler(**base)  # type: ignore[arg-type]


async def hold(s: Scheduler, key: str, until: asyncio.Event, **kw: bool) -> None:
    async with s.slot(key, **kw):
        await until.wait()


async def test_a_function_at_its_cap_does_not_hold_back_others() -> None:
    """The audit's finding: one function at its own cap with a call queued made
    every other function's calls queue too (and time out as 429)."""
    s = scheduler()
    done = asyncio.Event()
    a1 = asyncio.create_task(hold(s, "a", done))
    await asyncio.sleep(0)
    a2 = asyncio.create_task(hold(s, "a", done))  # waits: "a" is at its cap
    await asyncio.sleep(0)
    assert s.queued == 1
    t0 = time.monotonic()
    async with s.slot("b"):
        assert time.monotonic() - t0 < 0.1 and s.running == 2
    done.set()
    await asyncio.gather(a1, a2)
    assert s.running == 0 and s.queued == 0


async def test_one_tenant_cannot_take_every_slot_or_the_whole_queue() -> None:
    """The audit's finding: two slow functions of one tenant held all 16
    slots, and another tenant's call waited 5 s for a 429."""
    s = scheduler(max_concurrency=4, function_concurrency=4, tenant_concurrency=3, queue_size=4)
    done = asyncio.Event()
    mine = [asyncio.create_task(hold(s, f"a/f{i % 2}", done)) for i in range(6)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert s.running == 3 and s.queued == 3  # the tenant's cap, then its 3/4 of the queue
    with pytest.raises(Rejected, match="share of the invocation queue"):
        async with s.slot("a/f0"):
            pass
    t0 = time.monotonic()
    async with s.slot("b/g"):  # another tenant: the slot the cap left free
        assert time.monotonic() - t0 < 0.1 and s.running == 4
        other = asyncio.create_task(hold(s, "b/g", done))  # may still queue
        await asyncio.sleep(0)
        assert s.queued == 4
    # b/g's slot came free: its queued call took it, not tenant a's (at its cap).
    await asyncio.sleep(0)
    assert s.per_tenant["b"] == 1 and s.per_tenant["a"] == 3 and s.queued == 3
    done.set()
    await asyncio.gather(*mine, other)
    assert s.running == 0 and s.queued == 0 and not s.per_tenant


async def test_at_the_global_cap_callers_are_served_in_order() -> None:
    s = scheduler(max_concurrency=1, function_concurrency=4)
    order: list[str] = []
    gate = asyncio.Event()

    async def call(key: str) -> None:
        async with s.slot(key):
            order.append(key)
            await gate.wait()

    first = asyncio.create_task(call("a"))
    await asyncio.sleep(0)
    rest = [asyncio.create_task(call(k)) for k in ("b", "c", "a")]
    await asyncio.sleep(0)
    assert s.queued == 3
    gate.set()
    await asyncio.gather(first, *rest)
    assert order == ["a", "b", "c", "a"]


async def test_a_freed_slot_goes_to_the_earliest_waiter_its_caps_allow() -> None:
    """Waiters are kept per function; a grant still follows arrival order
    across functions, skipping the ones at their own cap."""
    s = scheduler(max_concurrency=2, function_concurrency=1)
    order: list[str] = []
    gates = {name: asyncio.Event() for name in ("a1", "b1", "a2", "a3", "b2", "c1")}

    async def call(name: str) -> None:
        async with s.slot(name[0]):
            order.append(name)
            await gates[name].wait()

    tasks = {}
    for name in gates:  # a1 and b1 run; the rest wait, in this order
        tasks[name] = asyncio.create_task(call(name))
        await asyncio.sleep(0)
    assert order == ["a1", "b1"] and s.queued == 4
    for ends, starts in (("a1", "a2"), ("b1", "b2"), ("a2", "a3"), ("b2", "c1")):
        # b1's end: a3 came first but "a" is at its cap (a2), so b2 goes.
        gates[ends].set()
        await tasks[ends]
        for _ in range(5):  # the granted waiter's task resumes
            await asyncio.sleep(0)
        assert order[-1] == starts, order
    for name in ("a3", "c1"):
        gates[name].set()
    await asyncio.gather(*tasks.values())
    assert s.running == 0 and s.queued == 0 and not s.per_function


async def test_a_nested_call_never_waits() -> None:
    s = scheduler(max_concurrency=2, function_concurrency=1)
    done = asyncio.Event()
    parent = asyncio.create_task(hold(s, "f", done))
    await asyncio.sleep(0)
    t0 = time.monotonic()
    with pytest.raises(Rejected):  # "f" calls itself at its cap: would wait for itself
        async with s.slot("f", nested=True):
            pass
    assert time.monotonic() - t0 < 0.1 and s.queued == 0
    async with s.slot("g", nested=True):  # another function, below both caps
        assert s.running == 2
    with pytest.raises(Rejected):
        async with s.slot("g", nested=True), s.slot("h", nested=True):
            pass  # the second one is over the global cap
    done.set()
    await parent
    assert s.running == 0


@pytest.fixture
async def client(tmp_path: object) -> AsyncIterator[httpx.AsyncClient]:
    settings = make_settings(
        tmp_path / "data",  # type: ignore[operator]
        function_concurrency=2,
        max_concurrency=8,
        queue_timeout_s=5.0,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://t",
            timeout=30,
            headers={"Authorization": f"Bearer {ADMIN}"},
        ) as c:
            yield c


async def test_slow_calls_of_one_function_leave_others_alone(client: httpx.AsyncClient) -> None:
    slow = "import time\ndef handler(r, c):\n    time.sleep(2)\n    return 'slow'\n"
    fast = "def handler(r, c):\n    return 'fast'\n"
    for name, src in (("slow", slow), ("fast", fast)):
        r = await client.put(f"/api/v1/functions/{name}", json={"source": src, "public": True})
        assert r.status_code == 201, r.text
    slows = [asyncio.create_task(client.get("/fn/slow")) for _ in range(3)]  # 2 run, 1 waits
    await asyncio.sleep(0.5)
    t0 = time.monotonic()
    r = await client.get("/fn/fast")
    assert (r.status_code, r.text) == (200, "fast")
    assert time.monotonic() - t0 < 1.5, "it queued behind the other function's cap"
    assert [x.status_code for x in await asyncio.gather(*slows)] == [200, 200, 200]


async def test_a_function_calling_itself_at_its_cap_fails_fast(
    client: httpx.AsyncClient,
) -> None:
    """Each parent holds one of the function's two slots and calls itself: the
    nested calls used to queue behind their own parents until the timeout."""
    src = (
        "import time\n"
        "def barrier(ctx, name):\n"
        "    ctx.kv.incr(name)\n"
        "    while ctx.kv.get(name) % 2:  # until both parents are here\n"
        "        time.sleep(0.02)\n"
        "def handler(request, ctx):\n"
        "    if request.text() == '\"child\"':  # ctx.invoke sends JSON\n"
        "        return 'child'\n"
        "    barrier(ctx, 'before')  # both parents hold their slots\n"
        "    try:\n"
        "        answer = ctx.invoke('rec', 'child')\n"
        "    except Exception as exc:\n"
        "        answer = {'failed': str(exc)}\n"
        "    barrier(ctx, 'after')  # and still do\n"
        "    return answer\n"
    )
    r = await client.put("/api/v1/functions/rec", json={"source": src, "public": True})
    assert r.status_code == 201, r.text
    t0 = time.monotonic()
    answers = await asyncio.gather(*(client.post("/fn/rec") for _ in range(2)))
    assert time.monotonic() - t0 < 4.0
    for a in answers:
        assert a.status_code == 200, a.text
        assert "rejected" in a.text, a.text
    for name in ("before", "after"):  # odd: a lone parent passes both barriers
        r = await client.put(
            f"/api/v1/kv/{name}", content=b"1", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 204, r.text
    r = await client.post("/fn/rec")  # alone, the nested call has a slot
    assert (r.status_code, r.text) == (200, "child")
