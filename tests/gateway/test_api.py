"""The HTTP API over a real app: uploads, invocation, tenants, errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import zipfile
from pathlib import Path

import httpx
import pytest

from .conftest import Api

HELLO = "def handler(request, ctx):\n    return {'hello': request.query.get('name', 'world')}\n"
both = pytest.mark.parametrize("api", ["warm", "cold"], indirect=True)


@both
async def test_upload_invoke_rollback_delete(api: Api) -> None:
    r = await api.deploy("hello", HELLO, public=True)
    assert r.status_code == 201 and r.json()["version"] == 1
    r = await api.client.get("/fn/hello?name=ann")
    assert r.status_code == 200, r.text
    assert r.json() == {"hello": "ann"}
    assert r.headers["x-invocation-id"]
    r = await api.deploy("hello", HELLO.replace("hello", "hi"), public=True)
    assert r.status_code == 200 and r.json()["version"] == 2
    assert (await api.client.get("/fn/hello")).json() == {"hi": "world"}
    r = await api.client.post(
        "/api/v1/functions/hello/rollback", json={"version": 1}, headers=api.auth()
    )
    assert r.status_code == 200 and r.json()["version"] == 1
    assert (await api.client.get("/fn/hello")).json() == {"hello": "world"}
    r = await api.client.get("/api/v1/functions/hello/versions", headers=api.auth())
    assert [v["version"] for v in r.json()["versions"]] == [1, 2] or [
        v["version"] for v in r.json()["versions"]
    ] == [2, 1]
    assert r.json()["active_version"] == 1
    r = await api.client.delete("/api/v1/functions/hello", headers=api.auth())
    assert r.status_code == 204
    r = await api.client.get("/fn/hello")
    assert r.status_code == 404 and r.json()["error"]["code"] == "function_not_found"


async def test_raw_python_and_zip_uploads(api: Api) -> None:
    r = await api.client.put(
        "/api/v1/functions/raw?public=true",
        content=HELLO.encode(),
        headers={**api.auth(), "Content-Type": "text/x-python"},
    )
    assert r.status_code == 201, r.text
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(
            "handler.py", "from helper import greet\ndef handler(r, c):\n    return greet()\n"
        )
        zf.writestr("helper.py", "def greet():\n    return 'from zip'\n")
    r = await api.client.put(
        "/api/v1/functions/zipped?public=true",
        content=buf.getvalue(),
        headers={**api.auth(), "Content-Type": "application/zip"},
    )
    assert r.status_code == 201, r.text
    assert (await api.client.get("/fn/zipped")).text == "from zip"
    r = await api.client.put(
        "/api/v1/functions/zipped2",
        headers=api.auth(),
        json={"archive": base64.b64encode(buf.getvalue()).decode(), "public": True},
    )
    assert r.status_code == 201, r.text
    assert (await api.client.get("/fn/zipped2")).text == "from zip"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"source": "def handler(:\n"}, 400, "syntax_error"),
        ({"source": "def other(r, c):\n    pass\n"}, 400, "missing_handler"),
        ({"source": HELLO, "timeout_s": 0}, 400, "invalid_timeout"),
        ({"source": HELLO, "timeout_s": "x"}, 400, "invalid_timeout"),
        ({"source": HELLO, "memory_mb": 1 << 30}, 400, "invalid_memory"),
        ({"source": HELLO, "routes": ["FETCH /x"]}, 400, "invalid_routes"),
        ({"source": HELLO, "routes": "GET /x"}, 400, "invalid_routes"),
        ({"source": HELLO, "env": {"1BAD": "x"}}, 400, "invalid_env"),
        ({"source": HELLO, "bogus": 1}, 400, "unknown_field"),
        ({}, 400, "missing_code"),
        ({"archive": "not base64!!"}, 400, "bad_zip"),
        ({"archive": base64.b64encode(b"not a zip").decode()}, 400, "bad_zip"),
    ],
)
async def test_upload_validation_errors(
    api: Api, body: dict[str, object], status: int, code: str
) -> None:
    r = await api.client.put("/api/v1/functions/bad", json=body, headers=api.auth())
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert (await api.client.get("/api/v1/functions/bad", headers=api.auth())).status_code == 404


async def test_syntax_error_names_file_line_column(api: Api) -> None:
    r = await api.client.put(
        "/api/v1/functions/bad", json={"source": "x = 1\ny = (\n"}, headers=api.auth()
    )
    err = r.json()["error"]
    assert err["code"] == "syntax_error"
    assert err["detail"]["file"] == "handler.py" and err["detail"]["line"] == 2


async def test_invalid_names_and_media_types(api: Api) -> None:
    for name in ("Upper", "1abc", "a" * 64, "under_score"):
        r = await api.client.put(
            f"/api/v1/functions/{name}", json={"source": HELLO}, headers=api.auth()
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_name", name
    r = await api.client.put(
        "/api/v1/functions/x",
        content=b"<xml/>",
        headers={**api.auth(), "Content-Type": "application/xml"},
    )
    assert r.status_code == 415
    r = await api.client.put(
        "/api/v1/functions/x",
        content=b"{not json",
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


async def test_upload_size_cap_while_streaming(api: Api) -> None:
    cap = api.settings.max_upload_bytes * 4 // 3 + 65536

    async def body():  # no Content-Length: chunked
        for _ in range(cap // 65536 + 2):
            yield b"#" * 65536

    r = await api.client.put(
        "/api/v1/functions/big",
        content=body(),
        headers={**api.auth(), "Content-Type": "text/x-python"},
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


async def test_auth_required_and_tenant_isolation(api: Api) -> None:
    r = await api.client.get("/api/v1/functions")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await api.client.get("/api/v1/functions", headers=api.auth("wrong"))
    assert r.status_code == 401
    a, b = await api.tenant("alice"), await api.tenant("bob")
    await api.deploy("secret", HELLO, key=a)
    for method, path in [
        ("GET", "/api/v1/functions/secret"),
        ("DELETE", "/api/v1/functions/secret"),
        ("GET", "/api/v1/functions/secret/versions"),
        ("GET", "/api/v1/functions/secret/logs"),
        ("GET", "/fn/secret"),
    ]:
        r = await api.client.request(method, path, headers=api.auth(b))
        assert r.status_code == 404, (method, path, r.text)
    r = await api.client.put(
        "/api/v1/functions/secret", json={"source": HELLO}, headers=api.auth(b)
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "name_taken"
    assert [
        f["name"]
        for f in (await api.client.get("/api/v1/functions", headers=api.auth(b))).json()[
            "functions"
        ]
    ] == []
    # private: no key -> 401, owner's key -> 200
    assert (await api.client.get("/fn/secret")).status_code == 401
    assert (await api.client.get("/fn/secret", headers=api.auth(a))).status_code == 200
    r = await api.client.post("/api/v1/tenants", json={"name": "eve"}, headers=api.auth(a))
    assert r.status_code == 403


async def test_declared_routes_and_conflicts(api: Api) -> None:
    src = (
        "def handler(request, ctx):\n"
        "    return {'id': request.path_params.get('id'), 'path': request.path}\n"
    )
    await api.deploy("users", src, public=True, routes=["GET /users/{id}", "POST /users"])
    r = await api.client.get("/users/42")
    assert r.status_code == 200 and r.json() == {"id": "42", "path": "/users/42"}
    assert "x-invocation-id" in r.headers
    assert (await api.client.delete("/users/42")).status_code == 404
    r = await api.client.put(
        "/api/v1/functions/other",
        headers=api.auth(),
        json={"source": src, "routes": ["ANY /users/{name}"]},
    )
    assert r.status_code == 409 and r.json()["error"]["code"] == "route_conflict"
    r = await api.client.put(
        "/api/v1/functions/other",
        headers=api.auth(),
        json={"source": src, "routes": ["GET /api/v1/x"]},
    )
    assert r.status_code == 400
    assert (await api.client.get("/nothing/here")).status_code == 404


@both
@pytest.mark.parametrize(
    ("source", "status", "code"),
    [
        ("def handler(r, c):\n    raise ValueError('boom')\n", 500, "error"),
        ("def handler(r, c):\n    while True: pass\n", 504, "timeout"),
        ("def handler(r, c):\n    return object()\n", 502, "bad_response"),
        ("def handler(r, c):\n    return 'x', 99\n", 502, "bad_response"),
        (
            "def handler(r, c):\n    return 'x', 200, {'X-Bad': 'a\\r\\nSet-Cookie: x=1'}\n",
            502,
            "bad_response",
        ),
        ("def handler(r, c):\n    x = bytearray(400 << 20)\n    return 'no'\n", 502, "oom"),
    ],
)
async def test_outcomes_map_to_http(api: Api, source: str, status: int, code: str) -> None:
    await api.deploy("f", source, public=True, timeout_s=1.0, memory_mb=64)
    r = await api.client.get("/fn/f")
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["invocation_id"] == r.headers["x-invocation-id"]
    assert "Traceback" not in r.text
    await api.deploy("f", HELLO, public=True)
    assert (await api.client.get("/fn/f")).status_code == 200


async def test_function_cannot_break_http(api: Api) -> None:
    src = (
        "def handler(r, c):\n"
        "    return b'\\x00\\xff binary', 201, {'Content-Length': '999', 'Connection': 'close',"
        " 'Transfer-Encoding': 'chunked', 'X-Invocation-Id': 'forged', 'X-Ok': 'yes'}\n"
    )
    await api.deploy("raw", src, public=True)
    r = await api.client.get("/fn/raw")
    assert r.status_code == 201
    assert r.content == b"\x00\xff binary"
    assert r.headers["x-ok"] == "yes"
    assert r.headers["content-length"] == str(len(r.content))
    assert r.headers["x-invocation-id"] != "forged"
    assert "transfer-encoding" not in r.headers


async def test_request_body_cap_is_413(api: Api) -> None:
    await api.deploy("echo", "def handler(r, c):\n    return r.body\n", public=True)
    r = await api.client.post("/fn/echo", content=b"x" * (api.settings.max_request_bytes + 1))
    assert r.status_code == 413
    assert r.headers["x-invocation-id"]
    r = await api.client.post("/fn/echo", content=b"\x00\x01binary")
    assert r.content == b"\x00\x01binary"


async def test_invocation_record_and_logs(api: Api) -> None:
    src = (
        "import sys, logging\n"
        "def handler(r, c):\n"
        "    print('to stdout')\n"
        "    print('to stderr', file=sys.stderr)\n"
        "    logging.getLogger('x').warning('via logging')\n"
        "    c.log.info('structured', user='u1', n=3)\n"
        '    print(\'{"level": "debug", "message": "json line", "k": 1}\')\n'
        "    return 'ok'\n"
    )
    await api.deploy("logger", src, public=True)
    r = await api.client.get("/fn/logger")
    inv = r.headers["x-invocation-id"]
    r = await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())
    assert r.status_code == 200, r.text
    rec = r.json()
    assert rec["outcome"] == "ok" and rec["status"] == 200 and rec["function"] == "logger"
    assert rec["wall_ms"] > 0 and rec["start"] in ("cold", "warm")
    by_msg = {line["message"]: line for line in rec["logs"]}
    assert by_msg["to stdout"]["level"] == "info"
    assert by_msg["to stderr"]["level"] == "error"
    assert by_msg["via logging"]["level"] == "warning"
    assert by_msg["structured"]["fields"] == {"user": "u1", "n": 3}
    assert by_msg["json line"]["level"] == "debug" and by_msg["json line"]["fields"]["k"] == 1
    r = await api.client.get("/api/v1/functions/logger/logs?level=warning", headers=api.auth())
    assert {x["message"] for x in r.json()["logs"]} == {"to stderr", "via logging"}
    r = await api.client.get("/api/v1/functions/logger/logs?q=structured", headers=api.auth())
    assert [x["message"] for x in r.json()["logs"]] == ["structured"]
    r = await api.client.get("/api/v1/invocations?function=logger", headers=api.auth())
    assert [x["id"] for x in r.json()["invocations"]] == [inv]


async def test_running_record_appears_only_for_invocations_that_take_a_while(api: Api) -> None:
    """A record with outcome "running" is written once an invocation has run for
    RUNNING_RECORD_AFTER_S; a quick one gets a single write, when it ends."""
    from gateway.invoke import RUNNING_RECORD_AFTER_S

    await api.deploy("slowish", "import time\ndef handler(r, c):\n    time.sleep(1.5)\n    return 'done'\n",
                     public=True)
    task = asyncio.create_task(api.client.get("/fn/slowish"))
    running: list[dict[str, object]] = []
    for _ in range(100):
        await asyncio.sleep(0.05)
        r = await api.client.get("/api/v1/invocations?function=slowish", headers=api.auth())
        running = r.json()["invocations"]
        if running:
            break
    assert [x["outcome"] for x in running] == ["running"]
    assert running[0]["wall_ms"] is None
    resp = await task
    assert resp.status_code == 200 and resp.text == "done"
    assert resp.headers["x-invocation-id"] == running[0]["id"]
    r = await api.client.get(f"/api/v1/invocations/{running[0]['id']}", headers=api.auth())
    assert r.json()["outcome"] == "ok" and r.json()["wall_ms"] >= 1500
    # A quick invocation is never seen running: its one record is the finished one.
    store = api.app.state.gateway.store  # type: ignore[attr-defined]
    await api.deploy("quick", HELLO, public=True)
    counted = []
    for _ in range(5):  # on a loaded machine a call may outlast the delay: try again
        writes = store.writes
        resp = await api.client.get("/fn/quick")
        counted.append(store.writes - writes)
        assert resp.status_code == 200
        rec = (await api.client.get(f"/api/v1/invocations/{resp.headers['x-invocation-id']}",
                                    headers=api.auth())).json()
        assert rec["outcome"] == "ok"
        if rec["wall_ms"] < RUNNING_RECORD_AFTER_S * 1000 / 2:
            assert counted[-1] == 1
            break
    else:
        raise AssertionError(f"no quick call in 5; store writes per call: {counted}")


@pytest.mark.parametrize("api", [{"function_concurrency": 1}], indirect=True)
async def test_a_queued_call_gets_its_running_record_once_it_runs_not_while_it_waits(
    api: Api,
) -> None:
    """The 0.1 s before a "running" record counts from admission: behind a deep
    queue every call would otherwise cost the store a second write, and the
    gateway would get slower per call the further behind it was."""
    await api.deploy("slowish", "import time\ndef handler(r, c):\n    time.sleep(0.8)\n    return 'done'\n",
                     public=True)
    first = asyncio.create_task(api.client.get("/fn/slowish?n=1"))
    for _ in range(100):  # the first holds the function's only slot
        if api.app.state.gateway.invoker.scheduler.running:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    second = asyncio.create_task(api.client.get("/fn/slowish?n=2"))
    for _ in range(100):
        if api.app.state.gateway.invoker.scheduler.queued:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.4)  # the second has waited well past RUNNING_RECORD_AFTER_S
    r = await api.client.get("/api/v1/invocations?function=slowish", headers=api.auth())
    seen = r.json()["invocations"]
    assert [x["outcome"] for x in seen] == ["running"]  # the first only
    one = await first
    assert one.status_code == 200
    assert seen[0]["id"] == one.headers["x-invocation-id"]
    for _ in range(100):  # now the second runs, and shows as running
        r = await api.client.get("/api/v1/invocations?function=slowish&outcome=running",
                                 headers=api.auth())
        if r.json()["invocations"]:
            break
        await asyncio.sleep(0.05)
    running = r.json()["invocations"]
    assert len(running) == 1 and running[0]["id"] != one.headers["x-invocation-id"]
    two = await second
    assert two.status_code == 200 and two.headers["x-invocation-id"] == running[0]["id"]


async def test_healthz_metrics_openapi(api: Api) -> None:
    r = await api.client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    await api.deploy("hello", HELLO, public=True)
    await api.client.get("/fn/hello")
    text = (await api.client.get("/metrics", headers=api.auth())).text
    assert 'nsfaas_invocations_total{function="hello",outcome="ok"} 1.0' in text
    doc = (await api.client.get("/api/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/functions/{name}" in doc["paths"]


async def test_refuses_invocations_when_jails_cannot_start(tmp_path: Path) -> None:
    from gateway.app import create_app

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data", nsjail="/bin/false")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            health = await client.get("/healthz")
            assert health.status_code == 503
            assert "self-check failed" in health.json()["reason"]
            r = await client.put("/api/v1/functions/f", json={"source": HELLO, "public": True},
                                 headers={"Authorization": f"Bearer {settings.admin_key}"})
            assert r.status_code == 201  # storing code needs no jail
            r = await client.get("/fn/f")
            assert r.status_code == 503 and r.json()["error"]["code"] == "jail_failure"
            assert "self-check failed" in r.json()["error"]["message"]


async def test_buffered_bodies_have_a_global_budget(tmp_path: Path) -> None:
    from gateway.app import create_app

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data", max_buffered_bytes=1000)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            auth = {"Authorization": f"Bearer {settings.admin_key}"}
            src = "def handler(r, c):\n    return str(len(r.body))\n"
            r = await client.put("/api/v1/functions/n", json={"source": src, "public": True}, headers=auth)
            assert r.status_code == 201
            r = await client.post("/fn/n", content=b"x" * 2000)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            gw = app.state.gateway
            assert gw.bodies.used == 0
            r = await client.post("/fn/n", content=b"x" * 500)
            assert r.status_code == 200 and r.text == "500"
            assert gw.bodies.used == 0


async def test_min_warm_workers_are_started_on_deploy(tmp_path: Path) -> None:
    from gateway.app import create_app

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data", warm_min_workers=2)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            auth = {"Authorization": f"Bearer {settings.admin_key}"}
            r = await client.put("/api/v1/functions/w", json={"source": HELLO, "public": True}, headers=auth)
            assert r.status_code == 201
            pool = app.state.gateway.pool
            for _ in range(100):
                if pool.idle_workers == 2:
                    break
                await asyncio.sleep(0.05)
            assert pool.idle_workers == 2
            r = await client.get("/fn/w")
            inv = (await client.get(f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=auth)).json()
            assert inv["start"] == "warm"
            # a prewarmed worker that dies is replaced by the reaper
            victim = next(iter(next(iter(pool._keys.values())).idle))
            victim.proc.kill()
            await victim.proc.wait()
            pool.reap()
            for _ in range(100):
                if pool.idle_workers == 2 and all(w.alive for e in pool._keys.values() for w in e.idle):
                    break
                await asyncio.sleep(0.05)
            assert pool.idle_workers == 2 and pool.stats.replaced >= 1


async def test_cancelled_invocation_kills_its_jail(api: Api) -> None:
    """A client that goes away (or a shutdown) must not leave a jail running."""
    await api.deploy("sleepy", "import time\ndef handler(r, c):\n    time.sleep(30)\n", public=True,
                     timeout_s=60)
    gw = api.app.state.gateway  # type: ignore[attr-defined]
    task = asyncio.create_task(api.client.get("/fn/sleepy"))
    for _ in range(200):
        if gw.scheduler.running:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)
    slots = gw.runner.config.slots
    idle_launchers = gw.runner.config.launchers.held
    busy = [s for s in slots.busy if slots.pids_in(s) and s not in idle_launchers]
    assert busy, "the invocation should be running in a jail"
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(100):
        if not any(slots.pids_in(s) for s in busy):
            break
        await asyncio.sleep(0.05)
    assert not any(slots.pids_in(s) for s in busy)


async def test_function_and_version_counts_are_capped(tmp_path: Path) -> None:
    from gateway.app import create_app

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data", max_functions_per_tenant=2, max_versions_per_function=2)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            auth = {"Authorization": f"Bearer {settings.admin_key}"}
            for name in ("a", "b"):
                r = await client.put(f"/api/v1/functions/{name}", json={"source": HELLO}, headers=auth)
                assert r.status_code == 201
            r = await client.put("/api/v1/functions/c", json={"source": HELLO}, headers=auth)
            assert r.status_code == 409 and r.json()["error"]["code"] == "function_limit"
            r = await client.put("/api/v1/functions/a", json={"source": HELLO + "\n"}, headers=auth)
            assert r.status_code == 200
            r = await client.put("/api/v1/functions/a", json={"source": HELLO + "\n\n"}, headers=auth)
            assert r.status_code == 409 and r.json()["error"]["code"] == "version_limit"


async def test_deeply_nested_json_is_a_400_not_a_500(api: Api) -> None:
    """JSON nested deeper than Python's recursion limit (a few KB of brackets) is
    bad input like any other: a 400 with a stable code, never a RecursionError."""
    deep = b"[" * 100_000 + b"]" * 100_000
    obj = b'{"a":' * 50_000 + b"1" + b"}" * 50_000
    for body in (deep, obj):
        r = await api.client.put(
            "/api/v1/functions/x", content=body,
            headers={**api.auth(), "Content-Type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    small = b"[" * 2_000 + b"]" * 2_000  # under the 4 KiB cap of these bodies
    for path in ("/api/v1/tenants", "/api/v1/functions/x/rollback"):
        r = await api.client.post(
            path, content=small, headers={**api.auth(), "Content-Type": "application/json"}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
    r = await api.client.put(
        "/api/v1/kv/k", content=b"[" * 30_000 + b"]" * 30_000,
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
    cursor = base64.urlsafe_b64encode(b"[" * 2_000 + b"]" * 2_000).decode()
    for path in ("/api/v1/invocations", "/api/v1/functions/x/logs"):
        r = await api.client.get(path, params={"cursor": cursor}, headers=api.auth())
        assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
        assert r.json()["error"]["code"], r.text
    r = await api.client.get("/healthz")
    assert r.status_code == 200


async def test_delete_and_recreate_does_not_grow_the_disk(tmp_path: Path) -> None:
    """The audit's loop: upload, delete, re-create. Each round used to leave its
    blobs and unpacked code behind for good. Blobs go at once; unpacked code
    once no invocation that started before the delete can still be running
    (queue wait + the longest timeout), and an invocation in flight during the
    delete finishes on its own code."""
    from gateway.app import create_app
    from jail import choose_jail_dir

    from .conftest import make_settings

    settings = make_settings(
        tmp_path / "data", queue_timeout_s=0.5, max_timeout_s=2.0, default_timeout_s=2.0
    )
    app = create_app(settings)
    data = settings.data_dir
    code = choose_jail_dir(data) / "code"

    def blob_bytes() -> int:
        return sum(f.stat().st_size for f in (data / "blobs").rglob("*") if f.is_file())

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            api = Api(c, settings, app)
            sizes = []
            for round_ in range(3):
                for v in range(2):
                    src = (
                        f"import time\nPAD = {'x' * 50_000!r}\n"
                        f"def handler(r, c):\n    time.sleep(float(r.query.get('s', 0)))\n"
                        f"    import os\n    return '{round_}.{v}' + str(len(os.listdir('/function')))\n"
                    )
                    await api.deploy("churn", src, public=True)
                slow = asyncio.create_task(c.get("/fn/churn", params={"s": "1"}))
                await asyncio.sleep(0.4)  # it runs: now delete under it
                r = await c.delete("/api/v1/functions/churn", headers=api.auth())
                assert r.status_code == 204
                r = await slow
                assert (r.status_code, r.text[:3]) == (200, f"{round_}.1"), r.text
                assert r.text[3:] != "0", "its code was removed under it"
                sizes.append(blob_bytes())
            assert sizes[-1] <= sizes[0], sizes
            await asyncio.sleep(0.5)  # the delete's removal, once the call has ended
            assert [p.name for p in code.iterdir() if "." in p.name] == []  # tenants' copies


async def test_archive_base64_as_tools_write_it(api: Api) -> None:
    """Wrapped at 76 columns (the base64 tool's default), without padding, or
    URL-safe: all the same archive."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("handler.py", "def handler(r, c):\n    return 'zipped'\n" + "#" * 300)
    raw = base64.b64encode(buf.getvalue()).decode()
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76)) + "\n"
    for i, text in enumerate(
        (wrapped, raw.rstrip("="), base64.urlsafe_b64encode(buf.getvalue()).decode())
    ):
        r = await api.client.put(
            f"/api/v1/functions/b64-{i}", json={"archive": text, "public": True},
            headers=api.auth(),
        )
        assert r.status_code == 201, (i, r.text)
        assert (await api.client.get(f"/fn/b64-{i}")).text == "zipped"


async def test_code_no_version_uses_is_swept_at_start(tmp_path: Path) -> None:
    """Removals a stop (or a crash) cut short are done by the next start."""
    from gateway.app import create_app
    from jail import choose_jail_dir

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data")
    code = choose_jail_dir(settings.data_dir) / "code"
    stray = code / ("f" * 64)
    for run in range(2):
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                api = Api(c, settings, app)
                if run == 0:
                    await api.deploy("kept", "def handler(r, c):\n    return 'kept'\n")
                    assert (await c.get("/fn/kept", headers=api.auth())).text == "kept"
                    live = [p.name for p in code.iterdir() if "." in p.name]
                    assert len(live) == 1, live  # the tenant's copy, made at deploy
                    stray.mkdir()  # as if a removal had been cut short
    assert not stray.exists()  # swept by the second start
    assert [p.name for p in code.iterdir() if "." in p.name] == live  # in use: kept
