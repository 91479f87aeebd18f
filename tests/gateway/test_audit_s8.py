"""Session 8 audit: declared routes split the raw path, HEAD of a 205, the KV
API's query parameters and media type, and who may read /metrics."""

from __future__ import annotations

import pytest

from gateway.routes_table import RouteTable
from gateway.store import RouteEntry

from .conftest import Api

WHO = (
    "def handler(request, ctx):\n"
    "    return {'who': %r, 'params': request.path_params, 'path': request.path,\n"
    "            'cookie': request.headers.get('cookie'), 'body': request.text()}\n"
)


async def test_an_encoded_slash_does_not_take_a_request_to_another_tenant(api: Api) -> None:
    """B's "/store/{a}/{b}" overlaps nothing of A's "/store/{id}" (a request has
    one segment there or two), yet "/store/dir%2Fitem", with A's cookie and
    body, went to B: routes were matched on the decoded path, split at the
    slash the client had encoded."""
    alice, bob = await api.tenant("alice"), await api.tenant("bob")
    await api.deploy("store-a", WHO % "alice", key=alice, public=True, routes=["ANY /store/{id}"])
    await api.deploy("store-b", WHO % "bob", key=bob, public=True, routes=["ANY /store/{a}/{b}"])
    r = await api.client.post(
        "/store/dir%2Fitem", headers={"Cookie": "session=A"}, content=b"card=4111"
    )
    assert r.status_code == 200, r.text
    assert r.json() == {
        "who": "alice",
        "params": {"id": "dir/item"},
        "path": "/store/dir/item",
        "cookie": "session=A",
        "body": "card=4111",
    }
    r = await api.client.post("/store/dir/item")
    assert r.json()["who"] == "bob" and r.json()["params"] == {"a": "dir", "b": "item"}
    # Segments are still decoded for the comparison and the parameters.
    r = await api.client.get("/st%6Fre/a%20b%2F%3F")
    assert r.json()["who"] == "alice" and r.json()["params"] == {"id": "a b/?"}, r.text


def test_route_table_splits_the_raw_path_then_decodes() -> None:
    table = RouteTable(
        [
            RouteEntry("ANY", "/store/{id}", "a", "one"),
            RouteEntry("ANY", "/store/{a}/{b}", "b", "two"),
            RouteEntry("GET", "/files/{p:path}", "a", "tail"),
            RouteEntry("GET", "/", "a", "root"),
        ]
    )

    def serves(path: str) -> tuple[str, dict[str, str]] | None:
        m = table.match("GET", path)
        return (m.name, m.path_params) if m else None

    assert serves("/store/dir%2Fitem") == ("one", {"id": "dir/item"})
    assert serves("/store/dir%2fitem") == ("one", {"id": "dir/item"})
    assert serves("/store/dir/item") == ("two", {"a": "dir", "b": "item"})
    assert serves("/store/a%2Fb/c%2Fd") == ("two", {"a": "a/b", "b": "c/d"})
    assert serves("/store/%2F") == ("one", {"id": "/"})
    assert serves("/store/") is None
    assert serves("/files/x%2Fy/z%20") == ("tail", {"p": "x/y/z "})
    assert serves("/files/") == ("tail", {"p": ""})
    assert serves("/files") is None
    assert serves("/") == ("root", {})
    assert serves("/%2F") is None
    # A server that gives no raw path: the decoded path, not decoded again.
    m = table.match("GET", "/store/100%41", encoded=False)
    assert m is not None and m.path_params == {"id": "100%41"}


async def test_head_of_a_205_carries_the_headers_of_its_get(api: Api) -> None:
    await api.deploy("reset", "def handler(r, c):\n    return ('abc', 205)\n", public=True)
    get, head = await api.client.get("/fn/reset"), await api.client.head("/fn/reset")
    assert get.status_code == head.status_code == 205
    assert get.content == head.content == b""
    assert get.headers.get("content-length") == head.headers.get("content-length") == "0"
    # And a 200 still says the length of the body its GET sends.
    await api.deploy("plain", "def handler(r, c):\n    return 'abcd'\n", public=True)
    get, head = await api.client.get("/fn/plain"), await api.client.head("/fn/plain")
    assert head.content == b"" and head.headers["content-length"] == "4"
    assert get.headers["content-type"] == head.headers["content-type"]


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("prefix=a&prefix=b", "invalid_key"),
        ("after=x&after=y", "invalid_key"),
        ("tenant=T&tenant=T", "invalid_parameter"),
        ("limit=1&limit=2", "invalid_limit"),
    ],
)
async def test_kv_list_takes_each_parameter_once(api: Api, query: str, code: str) -> None:
    tenant = (await api.client.get("/api/v1/kv", headers=api.auth())).status_code
    assert tenant == 200
    default = api.app.state.gateway.default_tenant.id  # type: ignore[attr-defined]
    r = await api.client.get(f"/api/v1/kv?{query.replace('T', default)}", headers=api.auth())
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == code and "give it once" in error["message"], error


async def test_kv_key_routes_take_tenant_once(api: Api) -> None:
    default = api.app.state.gateway.default_tenant.id  # type: ignore[attr-defined]
    q = f"?tenant={default}&tenant={default}"
    for method in ("GET", "PUT", "DELETE"):
        r = await api.client.request(method, f"/api/v1/kv/k{q}", headers=api.auth(), content=b"v")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_parameter", r.text


@pytest.mark.parametrize(
    ("content_type", "stored_as"),
    [
        ("application/json", "application/json"),
        ("Application/JSON", "application/json"),
        ("APPLICATION/json; charset=utf-8", "application/json"),
        ("application/json ;charset=UTF-8", "application/json"),
        ("application/jsonp", "application/octet-stream"),
        ("application/json-seq", "application/octet-stream"),
        ("text/plain", "application/octet-stream"),
    ],
)
async def test_kv_put_reads_the_media_type_properly(
    api: Api, content_type: str, stored_as: str
) -> None:
    r = await api.client.put(
        "/api/v1/kv/ct", content=b'{"a": 1}', headers={**api.auth(), "content-type": content_type}
    )
    assert r.status_code == 204, r.text
    r = await api.client.get("/api/v1/kv/ct", headers=api.auth())
    assert r.headers["content-type"] == stored_as
    # JSON is validated as JSON, whatever the case of its media type.
    r = await api.client.put(
        "/api/v1/kv/ct", content=b"not json", headers={**api.auth(), "content-type": content_type}
    )
    assert r.status_code == (400 if stored_as == "application/json" else 204), r.text


async def test_metrics_need_the_admin_key(api: Api) -> None:
    """They listed every tenant's private function names, with outcome counts,
    to anyone."""
    acme = await api.tenant("acme")
    await api.deploy("acme-secret-thing", "def handler(r, c):\n    return 'x'\n", key=acme)
    r = await api.client.get("/fn/acme-secret-thing", headers=api.auth(acme))
    assert r.status_code == 200, r.text
    r = await api.client.get("/metrics")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    assert "acme-secret-thing" not in r.text
    r = await api.client.get("/metrics", headers=api.auth("wrong"))
    assert r.status_code == 401, r.text
    r = await api.client.get("/metrics", headers=api.auth(acme))
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
    assert "acme-secret-thing" not in r.text
    r = await api.client.get("/metrics", headers=api.auth())
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'nsfaas_invocations_total{function="acme-secret-thing",outcome="ok"} 1.0' in r.text
