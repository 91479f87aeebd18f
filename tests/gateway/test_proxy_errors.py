"""Malformed proxy calls and KV input, through real jails and the real API: each
gets a stable error code, and the connection (or the next call) still works."""

from __future__ import annotations

import json
import math

import pytest

from .conftest import Api

# Runs each call on the function's one proxy connection and records its error
# code (or "ok"), then whether a plain call still works on that same socket.
PROBE = """\
import json
from nsfaas import ProxyError

def handler(request, ctx):
    proxy = ctx.kv._proxy
    ctx.kv.put('probe', 0)
    sock = proxy._sock
    out = {}
    for name, (op, params) in json.loads(request.body).items():
        try:
            proxy.call(op, **params)
            out[name] = 'ok'
        except ProxyError as exc:
            out[name] = exc.code
        out[name + ' then'] = ctx.kv.incr('probe')
    out['same connection'] = proxy._sock is sock
    return out
"""


async def probe(
    api: Api, calls: dict[str, object], *, egress_allow: list[str] | None = None
) -> dict[str, object]:
    await api.deploy("probe", PROBE, public=True, egress_allow=egress_allow or [])
    r = await api.client.post("/fn/probe", content=json.dumps(calls))
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    return out


async def test_malformed_log_and_kv_calls_are_bad_request_on_the_same_connection(
    api: Api,
) -> None:
    # json.dumps writes "\ud800" as the escape \ud800: valid JSON, not valid text.
    out = await probe(
        api,
        {
            "level list": ("log", {"level": [], "message": "m", "fields": {}}),
            "level dict": ("log", {"level": {}, "message": "m", "fields": {}}),
            "message": ("log", {"level": "info", "message": "a\ud800b", "fields": {}}),
            "field": ("log", {"level": "info", "message": "m", "fields": {"f": "\udfff"}}),
            "nan field": ("log", {"level": "info", "message": "m", "fields": {"f": math.nan}}),
            "prefix": ("kv.list", {"prefix": "\ud800"}),
            "key": ("kv.put", {"key": "k\ud800", "json": True}),
            "fine": ("log", {"level": "info", "message": "héllo \U0001d11e", "fields": {}}),
        },
    )
    assert out == {
        "level list": "bad_request",
        "level list then": 1,
        "level dict": "bad_request",
        "level dict then": 2,
        "message": "bad_request",
        "message then": 3,
        "field": "bad_request",
        "field then": 4,
        "nan field": "bad_request",
        "nan field then": 5,
        "prefix": "bad_request",
        "prefix then": 6,
        "key": "bad_request",
        "key then": 7,
        "fine": "ok",
        "fine then": 8,
        "same connection": True,
    }
    r = await api.client.post("/fn/probe", json={})
    assert r.json() == {"same connection": True}


async def test_unparseable_urls_are_egress_denied_on_the_same_connection(
    api: Api, upstream: int
) -> None:
    base = f"http://127.0.0.1:{upstream}"
    out = await probe(
        api,
        {
            "crlf": ("http.fetch", {"url": f"{base}/h\r\nX: 1"}),
            "brackets": ("http.fetch", {"url": "http://[good.com]/"}),
            "bad port": ("http.fetch", {"url": "http://127.0.0.1:notaport/"}),
            "bad redirect": ("http.fetch", {"url": f"{base}/bad-redirect"}),
            "nan timeout": ("http.fetch", {"url": f"{base}/", "timeout": float("nan")}),
            "huge timeout": ("http.fetch", {"url": f"{base}/", "timeout": 10**400}),
            "fine": ("http.fetch", {"url": f"{base}/"}),
        },
        egress_allow=[f"127.0.0.1:{upstream}", "good.com"],
    )
    assert out == {
        "crlf": "egress_denied",
        "crlf then": 1,
        "brackets": "egress_denied",
        "brackets then": 2,
        "bad port": "egress_denied",
        "bad port then": 3,
        "bad redirect": "egress_failed",  # the upstream's fault, not the function's
        "bad redirect then": 4,
        "nan timeout": "bad_request",
        "nan timeout then": 5,
        "huge timeout": "ok",
        "huge timeout then": 6,
        "fine": "ok",
        "fine then": 7,
        "same connection": True,
    }


async def test_an_oversized_call_fails_alone_and_the_connection_survives(api: Api) -> None:
    src = (
        "import json, struct\n"
        "from nsfaas import ProxyError\n"
        "def handler(request, ctx):\n"
        "    proxy, out = ctx.kv._proxy, {}\n"
        "    ctx.kv.put('x', 1)\n"
        "    sock = proxy._sock\n"
        "    try:\n"
        "        ctx.http.fetch('GET', 'http://example.com/' + 'a' * 70000)\n"
        "    except ProxyError as exc:\n"
        "        out['fetch'] = exc.code\n"
        "    try:\n"
        "        ctx.kv.put('big', b'x' * (2 * 1024 * 1024 + 1))\n"
        "    except ProxyError as exc:\n"
        "        out['put'] = exc.code\n"
        "    out['get'] = ctx.kv.get('x')\n"
        "    out['same connection'] = proxy._sock is sock\n"
        # A raw over-cap frame: the proxy answers and closes this connection;
        # the client must notice on its next call and open a new one.
        "    sock.sendall(struct.pack('>II', 1 << 20, 0))\n"
        "    data = b''\n"
        "    while chunk := sock.recv(65536):\n"
        "        data += chunk\n"
        "    out['raw'] = json.loads(data[8:])['code']\n"
        "    out['get after close'] = ctx.kv.get('x')\n"
        "    out['new connection'] = proxy._sock is not sock\n"
        "    return out\n"
    )
    await api.deploy("big", src, public=True, egress_allow=["example.com"])
    for _ in range(2):  # and the next invocation, on the same warm worker
        r = await api.client.get("/fn/big")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "fetch": "frame_too_large",
            "put": "frame_too_large",
            "get": 1,
            "same connection": True,
            "raw": "frame_too_large",
            "get after close": 1,
            "new connection": True,
        }


async def test_nan_and_infinity_are_not_json_values(api: Api) -> None:
    a = await api.tenant("alice")
    json_type = {**api.auth(a), "Content-Type": "application/json"}
    for body in (b"NaN", b"Infinity", b"-Infinity", b'{"a": [1, NaN]}', b"[Infinity]"):
        r = await api.client.put("/api/v1/kv/k", content=body, headers=json_type)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["code"] == "invalid_value"
        assert (await api.client.get("/api/v1/kv/k", headers=api.auth(a))).status_code == 404
    r = await api.client.put("/api/v1/kv/k", content=b'{"a": 1e308}', headers=json_type)
    assert r.status_code == 204
    src = (
        "from nsfaas import ProxyError\n"
        "def handler(request, ctx):\n"
        "    out = {}\n"
        "    for v in (float('nan'), float('inf'), [float('-inf')]):\n"
        "        try:\n"
        "            ctx.kv.put('v', v); out[repr(v)] = 'stored'\n"
        "        except ProxyError as exc:\n"
        "            out[repr(v)] = exc.code\n"
        "    out['get'] = ctx.kv.get('v', 'absent')\n"
        "    ctx.kv.put('v', 1.5)\n"
        "    out['then'] = ctx.kv.get('v')\n"
        "    return out\n"
    )
    await api.deploy("nan", src, key=a)
    r = await api.client.get("/fn/nan", headers=api.auth(a))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "nan": "invalid_value",
        "inf": "invalid_value",
        "[-inf]": "invalid_value",
        "get": "absent",
        "then": 1.5,
    }


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_kv_keys_that_are_not_utf8_are_invalid_key(api: Api, method: str) -> None:
    """%FF and %ED%A0%80 (a surrogate) would both decode to U+FFFD and share a key."""
    a = await api.tenant("alice")
    for raw in ("%FF", "%ED%A0%80", "ok%FF", "%C3"):
        r = await api.client.request(method, f"/api/v1/kv/{raw}", content=b"1", headers=api.auth(a))
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["code"] == "invalid_key"
    # A real U+FFFD, sent as UTF-8, is a key like any other.
    r = await api.client.put("/api/v1/kv/%EF%BF%BD", content=b"1", headers=api.auth(a))
    assert r.status_code == 204, r.text
    r = await api.client.get("/api/v1/kv", headers=api.auth(a))
    assert r.json()["keys"] == ["\ufffd"]


async def test_kv_listing_checks_its_query(api: Api) -> None:
    a = await api.tenant("alice")
    await api.client.put("/api/v1/kv/%EF%BF%BDx", content=b"1", headers=api.auth(a))
    for query, code in (
        ("limit=%C2%B2", "invalid_limit"),  # a superscript two: isdigit() but not int()
        ("limit=%D9%A8", "invalid_limit"),  # an Arabic eight: int() reads 8
        ("limit=0", "invalid_limit"),
        ("prefix=%FF", "invalid_key"),
        ("after=%ED%A0%80", "invalid_key"),
    ):
        r = await api.client.get(f"/api/v1/kv?{query}", headers=api.auth(a))
        assert r.status_code == 400 and r.json()["error"]["code"] == code, (query, r.text)
    r = await api.client.get("/api/v1/kv?prefix=%EF%BF%BD&limit=5", headers=api.auth(a))
    assert r.status_code == 200 and r.json()["keys"] == ["\ufffdx"], r.text


async def test_a_json_number_that_overflows_is_not_a_kv_value(api: Api) -> None:
    a = await api.tenant("alice")
    for body in (b'{"a": 1e999}', b"-1e400", b"[1.5, 2e308]"):
        r = await api.client.put(
            "/api/v1/kv/x",
            content=body,
            headers={**api.auth(a), "Content-Type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", body
    r = await api.client.put(
        "/api/v1/kv/x",
        content=b'{"a": 1e300}',
        headers={**api.auth(a), "Content-Type": "application/json"},
    )
    assert r.status_code == 204
