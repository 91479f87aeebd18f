"""Audit C: JSON bodies are UTF-8 without a BOM. ``json.loads`` on bytes
guesses UTF-16/32 and skips a UTF-8 BOM, so such bodies were taken: a KV value
stored and served back as application/json in UTF-16, functions and tenants
created from them. Over the real app (httpx against ASGI, real jails)."""

from __future__ import annotations

import pytest

from .conftest import Api

DOC = '{"a": "\u00e9t\u00e9", "n": 1}'

ENCODED = [
    pytest.param(DOC.encode("utf-16"), id="utf-16-bom"),
    pytest.param(DOC.encode("utf-16-le"), id="utf-16-le"),
    pytest.param(DOC.encode("utf-16-be"), id="utf-16-be"),
    pytest.param(DOC.encode("utf-32"), id="utf-32-bom"),
    pytest.param(DOC.encode("utf-32-le"), id="utf-32-le"),
    pytest.param(DOC.encode("utf-8-sig"), id="utf-8-bom"),
]
JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize("body", ENCODED)
async def test_kv_put_refuses_json_not_in_plain_utf8(api: Api, body: bytes) -> None:
    r = await api.client.put("/api/v1/kv/enc", content=body, headers={**api.auth(), **JSON})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_value", error
    r = await api.client.get("/api/v1/kv/enc", headers=api.auth())
    assert r.status_code == 404, r.content  # nothing was stored


async def test_kv_put_takes_utf8_json_and_utf16_as_bytes(api: Api) -> None:
    body = DOC.encode()
    r = await api.client.put("/api/v1/kv/ok", content=body, headers={**api.auth(), **JSON})
    assert r.status_code == 204, r.text
    r = await api.client.get("/api/v1/kv/ok", headers=api.auth())
    assert r.headers["content-type"] == "application/json" and r.content == body
    # Not labelled JSON, any bytes are a value: served back as bytes.
    raw = DOC.encode("utf-16")
    r = await api.client.put(
        "/api/v1/kv/raw",
        content=raw,
        headers={**api.auth(), "Content-Type": "application/octet-stream"},
    )
    assert r.status_code == 204, r.text
    r = await api.client.get("/api/v1/kv/raw", headers=api.auth())
    assert r.headers["content-type"] == "application/octet-stream" and r.content == raw


@pytest.mark.parametrize(
    "encoding", ["utf-16", "utf-16-le", "utf-32", "utf-8-sig"], ids=lambda e: str(e)
)
async def test_function_upload_refuses_json_not_in_plain_utf8(api: Api, encoding: str) -> None:
    doc = '{"source": "def handler(r, c):\\n    return \'ok\'\\n", "public": true}'
    r = await api.client.put(
        "/api/v1/functions/enc", content=doc.encode(encoding), headers={**api.auth(), **JSON}
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json", error
    if encoding != "utf-16-le":  # decodes as UTF-8 with NULs: then a syntax error
        assert "UTF-8" in error["message"], error
    assert (await api.client.get("/fn/enc")).status_code == 404
    r = await api.client.put(
        "/api/v1/functions/enc", content=doc.encode(), headers={**api.auth(), **JSON}
    )
    assert r.status_code == 201, r.text


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
async def test_tenant_creation_refuses_json_not_in_plain_utf8(api: Api, encoding: str) -> None:
    body = '{"name": "bom"}'.encode(encoding)
    r = await api.client.post("/api/v1/tenants", content=body, headers={**api.auth(), **JSON})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_json" and "byte order mark" in error["message"], error
    r = await api.client.get("/api/v1/tenants", headers=api.auth())
    assert "bom" not in [t["name"] for t in r.json()["tenants"]], r.text


async def test_ctx_kv_json_value_not_in_plain_utf8_is_invalid(api: Api) -> None:
    """The proxy's kv.put with json=true goes through the same check."""
    src = (
        "from nsfaas import ProxyError\n"
        "DOC = " + repr(DOC) + "\n"
        "def handler(request, ctx):\n"
        "    out = {}\n"
        "    for enc in ('utf-16', 'utf-16-le', 'utf-32-le', 'utf-8-sig'):\n"
        "        try:\n"
        "            ctx.kv._proxy.call('kv.put', DOC.encode(enc), key=enc, json=True)\n"
        "            out[enc] = 'stored'\n"
        "        except ProxyError as exc:\n"
        "            out[enc] = [exc.code, ctx.kv.get(enc, 'absent')]\n"
        "    ctx.kv._proxy.call('kv.put', DOC.encode(), key='plain', json=True)\n"
        "    out['plain'] = ctx.kv.get('plain')\n"
        "    return out\n"
    )
    await api.deploy("kvenc", src, public=True)
    r = await api.client.get("/fn/kvenc")
    assert r.status_code == 200, r.text
    bad = ["invalid_value", "absent"]
    assert r.json() == {
        "utf-16": bad,
        "utf-16-le": bad,
        "utf-32-le": bad,
        "utf-8-sig": bad,
        "plain": {"a": "\u00e9t\u00e9", "n": 1},
    }, r.text


@pytest.mark.parametrize("value", [b'"\\ud800"', b'{"\\udfff": 1}', b'["ok", {"a": "\\udc00"}]'])
async def test_a_kv_value_with_a_lone_surrogate_is_refused(api: Api, value: bytes) -> None:
    """Stored with 204 and served back as application/json, which no strict
    JSON parser reads; a function returning it got a 502."""
    r = await api.client.put(
        "/api/v1/kv/k", content=value,
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
    src = "def handler(r, c):\n    c.kv.put('k', '\\ud800')\n    return {}\n"
    await api.deploy("kvsur", src, public=True)
    r = await api.client.get("/fn/kvsur")
    assert r.status_code == 500, r.text  # the function's put raised invalid_value
    r = await api.client.put(
        "/api/v1/kv/k", content=b'"\\ud83d\\ude00 fine"',
        headers={**api.auth(), "Content-Type": "application/json"},
    )
    assert r.status_code == 204, r.text
