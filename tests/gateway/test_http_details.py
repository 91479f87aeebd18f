"""Small HTTP contracts of the invocation routes and the admin API."""

from __future__ import annotations

from .conftest import Api

ECHO = "def handler(request, ctx):\n    return {'path': request.path, 'method': request.method}\n"


async def test_head_carries_the_length_a_get_would(api: Api) -> None:
    await api.deploy("echo", ECHO, public=True)
    get = await api.client.get("/fn/echo/x")
    head = await api.client.head("/fn/echo/x")
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.content == b""
    assert head.headers["content-length"] == str(len(b'{"path": "/x", "method": "HEAD"}'))


async def test_paths_that_are_not_utf8_are_refused_not_merged(api: Api) -> None:
    """%FF and %ED%A0%80 were both decoded to U+FFFD: two paths, one function path."""
    await api.deploy("echo", ECHO, public=True, routes=["GET /e/{p}"])
    for path in ("/fn/echo/%FF", "/fn/echo/a%ED%A0%80", "/e/%C3"):
        r = await api.client.get(path)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path", (path, r.text)
        assert "x-invocation-id" in r.headers
    r = await api.client.get("/fn/echo/%EF%BF%BD")  # a real U+FFFD is a path like any other
    assert r.status_code == 200 and r.json()["path"] == "/\ufffd"
    r = await api.client.get("/e/caf%C3%A9")
    assert r.status_code == 200 and r.json()["path"] == "/e/caf\u00e9"


async def test_rollback_refuses_two_different_versions(api: Api) -> None:
    await api.deploy("f", ECHO)
    await api.deploy("f", ECHO)
    r = await api.client.post(
        "/api/v1/functions/f/rollback?version=1", json={"version": 2}, headers=api.auth()
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_version", r.text
    r = await api.client.post(
        "/api/v1/functions/f/rollback?version=1", json={"version": 1}, headers=api.auth()
    )
    assert r.status_code == 200 and r.json()["version"] == 1, r.text


async def test_the_app_itself_refuses_a_head_over_the_cap(api: Api) -> None:
    """Under another ASGI server (here httpx's transport) nothing caps heads
    before the app: the invocation route still refuses what no jail would take."""
    await api.deploy("echo", ECHO, public=True)
    big = "a" * api.settings.max_header_bytes
    r = await api.client.get("/fn/echo", headers={"X-Big": big})
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    half = "b" * (api.settings.max_header_bytes // 2)
    r = await api.client.get("/fn/echo", params={"q": half}, headers={"X-Half": half})
    assert r.status_code == 431  # the query string counts too
    listed = await api.client.get("/api/v1/invocations?function=echo", headers=api.auth())
    assert listed.json()["invocations"] == []
    assert (await api.client.get("/fn/echo")).status_code == 200


async def test_follow_refuses_parameters_it_cannot_apply(api: Api) -> None:
    await api.deploy("echo", ECHO)
    for extra in ("since=10m", "limit=5", "cursor=x", "invocation=abc", "until=1"):
        r = await api.client.get(
            f"/api/v1/functions/echo/logs?follow=1&{extra}", headers=api.auth()
        )
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["code"] == "invalid_parameter"
