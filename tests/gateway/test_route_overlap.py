"""Declared routes of different tenants never overlap; within a tenant the most
specific route serves."""

from __future__ import annotations

import pytest

from gateway.routes_table import RouteTable
from gateway.store import RouteEntry, paths_overlap

from .conftest import Api

OVERLAP = [
    ("/users/{id}", "/users/{name}"),
    ("/users/{id}", "/users/me"),
    ("/{rest:path}", "/users/{id}"),
    ("/{rest:path}", "/"),
    ("/{rest:path}", "/a/b/c/d"),
    ("/a/{rest:path}", "/a/b/{more:path}"),
    ("/a/{rest:path}", "/a/b"),
    ("/a/{x}/c", "/a/b/{y}"),
    ("/a/{x}", "/a/{p:path}"),
    ("/", "/"),
]
APART = [
    ("/users/{id}", "/todos/{id}"),
    ("/users/{id}", "/users/{id}/posts"),
    ("/a/{rest:path}", "/a"),  # the tail needs "/a/" at least
    ("/a/{rest:path}", "/b/{rest:path}"),
    ("/users/me", "/users/you"),
    ("/", "/a"),
    ("/a/{x}/c", "/a/b/d"),
]


@pytest.mark.parametrize(("a", "b"), OVERLAP)
def test_paths_that_share_a_request(a: str, b: str) -> None:
    assert paths_overlap(a, b) and paths_overlap(b, a)


@pytest.mark.parametrize(("a", "b"), APART)
def test_paths_that_share_none(a: str, b: str) -> None:
    assert not paths_overlap(a, b) and not paths_overlap(b, a)


def test_most_specific_route_serves_whatever_its_parameter_names() -> None:
    entries = [
        RouteEntry("ANY", "/{" + "p" * 60 + ":path}", "t", "catchall"),
        RouteEntry("GET", "/users/{" + "i" * 60 + "}", "t", "user"),
        RouteEntry("GET", "/users/me", "t", "me"),
        RouteEntry("GET", "/a/{x}/c", "t", "second"),
        RouteEntry("GET", "/a/b/{y}", "t", "first"),
    ]
    for order in (entries, entries[::-1]):
        table = RouteTable(order)

        def serves(path: str, table: RouteTable = table) -> str | None:
            m = table.match("GET", path)
            return m.name if m else None

        assert serves("/users/me") == "me"
        assert serves("/users/42") == "user"
        assert serves("/users/42/x") == "catchall"
        assert serves("/a/b/c") == "first"  # the earlier literal wins
        assert serves("/a/z/c") == "second"
        assert serves("/") == "catchall"


SRC = "def handler(request, ctx):\n    return {'who': %r, 'params': request.path_params}\n"


async def test_another_tenant_cannot_take_over_a_route(api: Api) -> None:
    """The audit's hijack: a long-named catch-all used to sort ahead of another
    tenant's routes and receive their requests (cookies included)."""
    alice, eve = await api.tenant("alice"), await api.tenant("eve")
    await api.deploy("users", SRC % "alice", key=alice, public=True, routes=["GET /users/{id}"])
    grabs = [
        "ANY /users/{" + "p" * 40 + ":path}",  # "/{...:path}" is 400 now: no literal first
        "GET /users/{x:path}",
        "HEAD /users/{id}",
        "GET /users/me",
        "ANY /users/{name}",
    ]
    for grab in grabs:
        r = await api.client.put(
            "/api/v1/functions/hijack",
            json={"source": SRC % "eve", "public": True, "routes": [grab]},
            headers=api.auth(eve),
        )
        assert r.status_code == 409, (grab, r.text)
        assert r.json()["error"]["code"] == "route_conflict"
        assert "alice" not in r.text and "users'" not in r.text  # the owner is not named
    r = await api.client.get("/users/42", headers={"Cookie": "session=secret"})
    assert r.status_code == 200 and r.json() == {"who": "alice", "params": {"id": "42"}}
    assert (await api.client.head("/users/42")).status_code == 200
    # Refused puts wrote nothing: the name is free and eve's routes that
    # overlap nobody are accepted.
    r = await api.client.get("/api/v1/functions/hijack", headers=api.auth(eve))
    assert r.status_code == 404
    await api.deploy("eves", SRC % "eve", key=eve, public=True, routes=["GET /eve/{p:path}"])
    assert (await api.client.get("/eve/x/y")).json()["who"] == "eve"
    # The other way round too: alice cannot claim under eve's tail.
    r = await api.client.put(
        "/api/v1/functions/users",
        json={"source": SRC % "alice", "routes": ["GET /users/{id}", "GET /eve/mine"]},
        headers=api.auth(alice),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "route_conflict"
    assert (await api.client.get("/users/7")).json()["who"] == "alice"


async def test_a_tenant_may_overlap_its_own_routes(api: Api) -> None:
    # Under "/app": a route must begin with a literal segment (gateway/store.py parse_route).
    await api.deploy("catchall", SRC % "catchall", public=True, routes=["ANY /app/{rest:path}"])
    await api.deploy("user", SRC % "user", public=True, routes=["GET /app/users/{id}"])
    await api.deploy("me", SRC % "me", public=True, routes=["GET /app/users/me"])
    for path, who in (
        ("/app/users/me", "me"),
        ("/app/users/9", "user"),
        ("/app/users/9/a", "catchall"),
    ):
        r = await api.client.get(path)
        assert r.status_code == 200 and r.json()["who"] == who, (path, r.text)


async def test_a_param_and_a_path_tail_may_be_two_functions_of_one_tenant(api: Api) -> None:
    """`route_pattern` wrote both as `{}`, so the second function got a 409
    although the README lets a tenant's routes overlap (the more specific
    serves). The same route twice still collides."""
    one = "def handler(r, c):\n    return {'fn': 'one', 'p': r.path_params}\n"
    rest = "def handler(r, c):\n    return {'fn': 'rest', 'p': r.path_params}\n"
    await api.deploy("tone", one, routes=["GET /t/{id}"], public=True)
    await api.deploy("trest", rest, routes=["GET /t/{rest:path}"], public=True)
    assert (await api.client.get("/t/42")).json() == {"fn": "one", "p": {"id": "42"}}
    assert (await api.client.get("/t/4/2")).json() == {"fn": "rest", "p": {"rest": "4/2"}}
    r = await api.client.put(
        "/api/v1/functions/tdup", json={"source": one, "routes": ["GET /t/{other}"]},
        headers=api.auth(),
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "route_conflict", r.text
