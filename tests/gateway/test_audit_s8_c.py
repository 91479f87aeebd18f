"""Session 8 audit C: a route change rebuilds only what changed; a queued call
whose caller has gone never runs (scheduler level; the HTTP path is in
tests/e2e/test_audit_s8_c.py)."""

from __future__ import annotations

import asyncio
import random

import pytest

from gateway.routes_table import RouteTable
from gateway.scheduler import ClientGone, Scheduler
from gateway.store import RouteEntry

from .conftest import Api

SRC = "def handler(request, ctx):\n    return {'who': %r, 'params': request.path_params}\n"


def _compiled(table: RouteTable) -> dict[object, object]:
    return dict(table._by_key)


async def test_a_route_change_reuses_every_unchanged_route(api: Api) -> None:
    """Every deploy, rollback and delete rebuilt the whole route table on the
    event loop, parsing and sorting every route of every tenant: with 2,000
    declared routes each PUT of an unrelated function froze the gateway for
    ~250 ms. A change now reuses the compiled routes (and whole buckets of
    them) it did not touch."""
    gw = api.app.state.gateway  # type: ignore[attr-defined]
    many = await api.tenant("many")
    for i in range(4):
        routes = [f"GET /m{i}/{{a}}/x{j}" for j in range(10)]
        await api.deploy(f"many{i}", SRC % i, key=many, public=True, routes=routes)
    before = _compiled(gw.routes)
    buckets = dict(gw.routes._buckets)
    assert len(before) == 40

    # An unrelated function with a route of its own: everything else is reused.
    await api.deploy("other", SRC % "other", public=True, routes=["GET /other/{id}"])
    after = _compiled(gw.routes)
    assert len(after) == 41
    assert all(after[key] is c for key, c in before.items())
    assert all(gw.routes._buckets[first] is b for first, b in buckets.items())

    # A new version of one function: its bucket is rebuilt, the others are not.
    await api.deploy("many1", SRC % "1b", key=many, public=True, routes=["GET /m1/{z}/y"])
    after = _compiled(gw.routes)
    assert len(after) == 32
    kept = {k: c for k, c in before.items() if not k[1].startswith("/m1/")}
    assert all(after[key] is c for key, c in kept.items())
    assert all(gw.routes._buckets[f] is buckets[f] for f in ("m0", "m2", "m3"))

    # A delete: the function's routes go, nothing else is parsed again.
    r = await api.client.delete("/api/v1/functions/many2", headers=api.auth())
    assert r.status_code == 204
    after = _compiled(gw.routes)
    assert "m2" not in gw.routes._buckets and len(after) == 22
    assert all(after[k] is c for k, c in kept.items() if not k[1].startswith("/m2/"))

    # And the table still serves what it should.
    r = await api.client.get("/m3/q/x7")
    assert r.json() == {"who": 3, "params": {"a": "q"}}, r.text
    r = await api.client.get("/m1/q/y")
    assert r.json() == {"who": "1b", "params": {"z": "q"}}, r.text
    assert (await api.client.get("/m1/q/x7")).status_code == 404
    assert (await api.client.get("/m2/q/x7")).status_code == 404
    r = await api.client.get("/other/5")
    assert r.json() == {"who": "other", "params": {"id": "5"}}, r.text


def test_a_table_built_on_the_last_one_serves_as_a_fresh_one() -> None:
    """Incremental builds (routes added, dropped and changed, in any order, a
    catch-all without a literal first segment among them) match exactly what
    a table built from scratch matches."""
    rng = random.Random(8)  # noqa: S311 (a reproducible sequence, not a secret)
    pool = [
        RouteEntry(m, p, t, n)
        for m, p, t, n in [
            ("GET", "/users/me", "t", "me"),
            ("GET", "/users/{id}", "t", "user"),
            ("ANY", "/users/{id}/{rest:path}", "t", "user-rest"),
            ("POST", "/users", "t", "create"),
            ("GET", "/a/{x}/c", "t", "second"),
            ("GET", "/a/b/{y}", "t", "first"),
            ("ANY", "/{p:path}", "t", "catchall"),  # stored before such routes were refused
            ("GET", "/", "u", "root"),
            ("GET", "/files/{p:path}", "u", "files"),
            ("DELETE", "/files/{p:path}", "u", "rm"),
            ("GET", "/shop/{a}/{b}", "v", "shop"),
            ("GET", "/shop/{id}", "w", "item"),
        ]
    ]
    paths = [
        "/", "/users", "/users/me", "/users/42", "/users/42/x/y", "/a/b/c", "/a/z/c",
        "/files/", "/files/a%2Fb", "/shop/1", "/shop/1/2", "/shop/dir%2Fx", "/nothing/here",
    ]  # fmt: skip
    table = RouteTable()
    for _ in range(300):
        entries = rng.sample(pool, rng.randrange(len(pool) + 1))
        rng.shuffle(entries)
        table = RouteTable(entries, previous=table)
        fresh = RouteTable(entries)
        assert len(table) == len(fresh) == len(entries)
        for method in ("GET", "HEAD", "POST", "DELETE"):
            for path in paths:
                assert table.match(method, path) == fresh.match(method, path), (method, path)


async def test_a_waiter_whose_client_went_away_leaves_the_queue() -> None:
    sched = Scheduler(max_concurrency=1, function_concurrency=1, queue_size=8, queue_timeout_s=30)
    gone = asyncio.Event()
    ran: list[str] = []

    async def wait_gone() -> None:
        await gone.wait()

    async def call(name: str, watch: bool) -> None:
        async with sched.slot(f"t/{name}", gone=wait_gone if watch else None):
            ran.append(name)
            await asyncio.sleep(0.2)

    first = asyncio.create_task(call("slow", False))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(call("queued", True)) for _ in range(3)]
    kept = asyncio.create_task(call("kept", False))
    await asyncio.sleep(0.05)
    assert sched.queued == 4
    gone.set()
    for w in waiters:
        with pytest.raises(ClientGone):
            await w
    assert sched.queued == 1  # only the call whose caller is still there
    await first
    await kept
    assert ran == ["slow", "kept"]
    assert sched.running == 0 and sched.queued == 0
