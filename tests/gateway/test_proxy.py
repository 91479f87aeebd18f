"""The host proxy through real jails: KV, egress, nested invoke, hostile clients."""

from __future__ import annotations

import asyncio
import json
import socket

from .conftest import Api

COUNTER = "def handler(request, ctx):\n    return {'n': ctx.kv.incr('hits')}\n"


async def test_counter_survives_100_concurrent_increments(api: Api) -> None:
    await api.deploy("counter", COUNTER, public=True)
    results = await asyncio.gather(*(api.client.post("/fn/counter") for _ in range(100)))
    assert all(r.status_code == 200 for r in results), [
        r.text for r in results if r.status_code != 200
    ][:3]
    counts = sorted(r.json()["n"] for r in results)
    assert counts == list(range(1, 101))


async def test_kv_types_and_listing(api: Api) -> None:
    src = (
        "def handler(request, ctx):\n"
        "    ctx.kv.put('j', {'a': [1, 2]})\n"
        "    ctx.kv.put('b', b'\\x00raw')\n"
        "    ctx.kv.put('p/1', 1); ctx.kv.put('p/2', 2); ctx.kv.put('p%', 3)\n"
        "    out = {'j': ctx.kv.get('j'), 'b': ctx.kv.get('b').hex(), 'missing': ctx.kv.get('nope', 'dflt'),\n"
        "           'list': ctx.kv.list('p/'), 'pct': ctx.kv.list('p%')}\n"
        "    out['deleted'] = ctx.kv.delete('j'); out['after'] = ctx.kv.get('j')\n"
        "    return out\n"
    )
    await api.deploy("kvtypes", src, public=True)
    r = await api.client.get("/fn/kvtypes")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "j": {"a": [1, 2]},
        "b": b"\x00raw".hex(),
        "missing": "dflt",
        "list": ["p/1", "p/2"],
        "pct": ["p%"],
        "deleted": True,
        "after": None,
    }


HOSTILE_KEYS = ["..", "../x", "/", "a/../../b", "\x00", "k\x00ey", "％", "ｋ", "x" * 512, "%", "_"]


async def test_tenant_kv_isolation_with_hostile_keys(api: Api) -> None:
    a, b = await api.tenant("alice"), await api.tenant("bob")
    writer = (
        "import json\n"
        "def handler(request, ctx):\n"
        "    for k in json.loads(request.body):\n"
        "        ctx.kv.put(k, 'secret-of-a')\n"
        "    return 'ok'\n"
    )
    reader = (
        "import json\n"
        "def handler(request, ctx):\n"
        "    seen = [ctx.kv.get(k) for k in json.loads(request.body)]\n"
        "    return {'seen': seen, 'list': ctx.kv.list(''), 'listdots': ctx.kv.list('..')}\n"
    )
    await api.deploy("writer", writer, key=a)
    await api.deploy("reader", reader, key=b)
    body = json.dumps(HOSTILE_KEYS)
    r = await api.client.post("/fn/writer", content=body, headers=api.auth(a))
    assert r.status_code == 200, r.text
    r = await api.client.post("/fn/reader", content=body, headers=api.auth(b))
    assert r.status_code == 200, r.text
    assert r.json() == {"seen": [None] * len(HOSTILE_KEYS), "list": [], "listdots": []}


async def test_kv_limits_give_clear_errors(api: Api) -> None:
    src = (
        "from nsfaas import ProxyError\n"
        "def handler(request, ctx):\n"
        "    out = {}\n"
        "    for name, fn in [('long', lambda: ctx.kv.put('k' * 513, 1)),\n"
        "                     ('big', lambda: ctx.kv.put('v', b'x' * (1024 * 1024 + 1))),\n"
        "                     ('notint', lambda: (ctx.kv.put('s', 'text'), ctx.kv.incr('s')))]:\n"
        "        try:\n"
        "            fn(); out[name] = 'no error'\n"
        "        except ProxyError as exc:\n"
        "            out[name] = exc.code\n"
        "    return out\n"
    )
    await api.deploy("kvlimits", src, public=True)
    r = await api.client.get("/fn/kvlimits")
    assert r.json() == {
        "long": "invalid_key",
        "big": "kv_value_too_large",
        "notint": "not_an_integer",
    }


async def test_deeply_nested_json_through_the_proxy_is_invalid(api: Api) -> None:
    """A few KB of brackets as a JSON value: json.loads raises RecursionError for
    it; the proxy answers invalid_value like for any other bad JSON."""
    src = (
        "from nsfaas import ProxyError\n"
        "def handler(request, ctx):\n"
        "    try:\n"
        "        ctx.kv._proxy.call('kv.put', b'[' * 5000 + b']' * 5000, key='k', json=True)\n"
        "        return {'kv': 'stored'}\n"
        "    except ProxyError as exc:\n"
        "        return {'kv': exc.code, 'get': ctx.kv.get('k', 'absent')}\n"
    )
    await api.deploy("deepkv", src, public=True)
    r = await api.client.get("/fn/deepkv")
    assert r.status_code == 200 and r.json() == {"kv": "invalid_value", "get": "absent"}, r.text


async def test_egress_allow_list_and_redirects(api: Api, upstream: int) -> None:
    src = (
        "from nsfaas import EgressDenied, ProxyError\n"
        "def handler(request, ctx):\n"
        "    url = request.query['url']\n"
        "    try:\n"
        "        r = ctx.http.fetch('GET', url, timeout=5)\n"
        "        return {'status': r.status, 'body': r.body.decode()}\n"
        "    except EgressDenied as exc:\n"
        "        return {'denied': exc.code}\n"
    )
    await api.deploy("fetch", src, public=True, egress_allow=[f"127.0.0.1:{upstream}"])
    ok = await api.client.get("/fn/fetch", params={"url": f"http://127.0.0.1:{upstream}/"})
    assert ok.json() == {"status": 200, "body": "hello from upstream"}
    for url in (
        f"http://127.0.0.1:{upstream + 1}/",
        f"http://localhost:{upstream}/",
        "http://example.com/",
        "file:///etc/passwd",
        f"http://127.0.0.1:{upstream}/redirect",
    ):
        r = await api.client.get("/fn/fetch", params={"url": url})
        assert r.json() == {"denied": "egress_denied"}, (url, r.text)


async def test_nested_invoke_and_depth_limit(api: Api) -> None:
    await api.deploy("leaf", "def handler(r, c):\n    return {'got': r.json()}\n")
    await api.deploy(
        "caller", "def handler(r, c):\n    return c.invoke('leaf', {'x': 1})\n", public=True
    )
    r = await api.client.get("/fn/caller")
    assert r.status_code == 200 and r.json() == {"got": {"x": 1}}
    loop = (
        "from nsfaas import ProxyError\n"
        "def handler(r, c):\n"
        "    try:\n"
        "        return c.invoke('loop', None)\n"
        "    except ProxyError as exc:\n"
        "        return {'code': exc.code}\n"
    )
    await api.deploy("loop", loop, public=True, timeout_s=20)
    r = await api.client.get("/fn/loop")
    assert r.status_code == 200
    assert "invoke_depth" in r.text


async def test_hostile_raw_socket_clients(api: Api) -> None:
    src = (
        "import socket, struct, json\n"
        "def conn():\n"
        "    s = socket.socket(socket.AF_UNIX); s.connect('/run/nsfaas/proxy.sock'); s.settimeout(10)\n"
        "    return s\n"
        "def reply(s):\n"
        "    data = b''\n"
        "    while len(data) < 8:\n"
        "        chunk = s.recv(8 - len(data))\n"
        "        if not chunk: return 'closed'\n"
        "        data += chunk\n"
        "    h, b = struct.unpack('>II', data)\n"
        "    return json.loads(s.recv(h)).get('code')\n"
        "def handler(request, ctx):\n"
        "    out = {}\n"
        "    s = conn(); s.sendall(struct.pack('>II', 5, 0) + b'garba'); out['garbage'] = reply(s)\n"
        "    s = conn(); s.sendall(struct.pack('>II', 1 << 30, 0)); out['huge'] = reply(s)\n"
        "    s = conn(); h = json.dumps({'v': 1, 'id': 1, 'method': 'nope', 'params': {}}).encode()\n"
        "    s.sendall(struct.pack('>II', len(h), 0) + h); out['unknown'] = reply(s)\n"
        "    many = []\n"
        "    for _ in range(40):\n"
        "        try: many.append(conn())\n"
        "        except OSError: break\n"
        "    out['extra'] = reply(many[-1])\n"
        "    for m in many: m.close()\n"
        "    s = conn(); h = json.dumps({'v': 1, 'id': 2, 'method': 'kv.get', 'params': {'key': 'k'}}).encode()\n"
        "    codes = set()\n"
        "    for _ in range(600):\n"
        "        s.sendall(struct.pack('>II', len(h), 0) + h)\n"
        "        codes.add(reply(s))\n"
        "    out['flood'] = sorted(str(c) for c in codes)\n"
        "    return out\n"
    )
    await api.deploy("hostile", src, public=True, timeout_s=10)
    r = await api.client.get("/fn/hostile")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["garbage"] == "bad_frame"
    assert out["huge"] == "frame_too_large"
    assert out["unknown"] == "unknown_method"
    assert out["extra"] == "too_many_connections"
    assert "rate_limited" in out["flood"]
    assert (await api.client.get("/healthz")).status_code == 200
    await api.deploy("counter", COUNTER, public=True)
    assert (await api.client.get("/fn/counter")).json() == {"n": 1}


async def test_socket_and_dir_removed_after_invocation(api: Api) -> None:
    await api.deploy("counter", COUNTER, public=True)
    assert (await api.client.get("/fn/counter")).status_code == 200
    gw = api.app.state.gateway  # type: ignore[attr-defined]
    sock_root = gw.runner.jail_dir / "sock"
    await gw.pool.aclose() if gw.pool else None
    assert list(sock_root.iterdir()) == []


def test_socket_module_is_real() -> None:
    assert socket.AF_UNIX == 1


async def test_kv_admin_api(api: Api) -> None:
    a = await api.tenant("alice")
    await api.deploy(
        "w", "def handler(r, c):\n    c.kv.put('cfg', {'on': True})\n    return 'ok'\n", key=a
    )
    assert (await api.client.get("/fn/w", headers=api.auth(a))).status_code == 200
    r = await api.client.get("/api/v1/kv/cfg", headers=api.auth(a))
    assert r.status_code == 200 and r.json() == {"on": True}
    r = await api.client.get("/api/v1/kv", headers=api.auth(a))
    assert r.json()["keys"] == ["cfg"]
    # the admin reads another tenant's keys only by naming it
    assert (await api.client.get("/api/v1/kv/cfg", headers=api.auth())).status_code == 404
    tenants = (await api.client.get("/api/v1/tenants", headers=api.auth())).json()["tenants"]
    alice = next(t["id"] for t in tenants if t["name"] == "alice")
    r = await api.client.get(f"/api/v1/kv/cfg?tenant={alice}", headers=api.auth())
    assert r.json() == {"on": True}
    r = await api.client.get(f"/api/v1/kv/cfg?tenant={alice}", headers=api.auth(a))
    assert r.status_code == 200
    b = await api.tenant("bob")
    assert (
        await api.client.get(f"/api/v1/kv/cfg?tenant={alice}", headers=api.auth(b))
    ).status_code == 403
    r = await api.client.put("/api/v1/kv/raw%2Fkey", content=b"\x00\x01", headers=api.auth(a))
    assert r.status_code == 204
    r = await api.client.get("/api/v1/kv/raw%2Fkey", headers=api.auth(a))
    assert r.content == b"\x00\x01"
    assert (await api.client.delete("/api/v1/kv/cfg", headers=api.auth(a))).status_code == 204
    assert (await api.client.delete("/api/v1/kv/cfg", headers=api.auth(a))).status_code == 404
    r = await api.client.put(
        "/api/v1/kv/bad",
        content=b"{not json",
        headers={**api.auth(a), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"


async def test_silent_proxy_connections_end_with_the_invocation(api: Api) -> None:
    src = (
        "import socket\n"
        "KEEP = []\n"
        "def handler(request, ctx):\n"
        "    for _ in range(5):\n"
        "        s = socket.socket(socket.AF_UNIX); s.connect('/run/nsfaas/proxy.sock'); KEEP.append(s)\n"
        "    return 'connected and said nothing'\n"
    )
    await api.deploy("silent", src, public=True)
    r = await api.client.get("/fn/silent")
    assert r.status_code == 200, r.text
    gw = api.app.state.gateway  # type: ignore[attr-defined]
    proxies = [w.proxy for e in gw.pool._keys.values() for w in e.idle if w.proxy is not None]
    assert proxies
    for _ in range(100):
        if all(not p._conns for p in proxies):
            break
        await asyncio.sleep(0.02)
    assert all(not p._conns for p in proxies)
    assert (await api.client.get("/healthz")).status_code == 200
