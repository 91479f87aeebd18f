"""Audit round 9, host proxy: what ctx.invoke does with a body labelled JSON,
parameter types the proxy used to coerce, and a partial frame prefix's timeout."""

from __future__ import annotations

import json

from .conftest import Api

# Answers the body it is given under the content type it is given.
CALLEE = """\
def handler(request, ctx):
    ctype, body = request.json()
    return body, 200, {"Content-Type": ctype}
"""

# What ctx.invoke gave back for each case: decoded JSON, bytes, or an exception.
CALLER = """\
import json

def handler(request, ctx):
    out = {}
    for name, (ctype, body) in json.loads(request.body).items():
        try:
            got = ctx.invoke("callee", [ctype, body])
        except Exception as exc:
            out[name] = ["raised", type(exc).__name__]
            continue
        if isinstance(got, bytes):
            out[name] = ["bytes", got[:20].decode()]
        else:
            out[name] = ["json", got]
    return out
"""


async def test_invoke_decodes_json_by_media_type_and_never_raises_on_a_bad_body(
    api: Api,
) -> None:
    await api.deploy("callee", CALLEE)
    await api.deploy("caller", CALLER, public=True, timeout_s=20)
    deep = "[" * 100_000 + "]" * 100_000
    cases = {
        "plain": ("application/json", '{"a": 1}'),
        "params": ("application/json; charset=utf-8", "[1]"),
        "case": ("Application/JSON", "[1]"),
        "suffix": ("application/problem+json", '{"a": 1}'),
        "suffix case": ("Application/Merge-Patch+JSON ; q=1", "[2]"),
        "jsonp": ("application/jsonp", "[1]"),
        "json-seq": ("application/json-seq", "[1]"),
        "bare suffix": ("application/+json", "[1]"),
        "text": ("text/plain", "[1]"),
        "not json": ("application/json", "not json"),
        "jsonp call": ("application/jsonp", "cb(1)"),
        "deep": ("application/json", deep),
        "digits": ("application/json", "7" * 5000),
    }
    r = await api.client.post("/fn/caller", content=json.dumps(cases))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "plain": ["json", {"a": 1}],
        "params": ["json", [1]],
        "case": ["json", [1]],
        "suffix": ["json", {"a": 1}],
        "suffix case": ["json", [2]],
        "jsonp": ["bytes", "[1]"],
        "json-seq": ["bytes", "[1]"],
        "bare suffix": ["bytes", "[1]"],
        "text": ["bytes", "[1]"],
        "not json": ["bytes", "not json"],
        "jsonp call": ["bytes", "cb(1)"],
        "deep": ["bytes", "[" * 20],
        "digits": ["bytes", "7" * 20],
    }


# One raw frame per case on its own connection; the reply's code, or "ok".
RAW = """\
import json, socket, struct

def call(method, params, body=b""):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect("/run/nsfaas/proxy.sock")
    head = json.dumps({"v": 1, "id": 1, "method": method, "params": params}).encode()
    s.sendall(struct.pack(">II", len(head), len(body)) + head + body)
    data = b""
    while len(data) < 8:
        data += s.recv(8 - len(data))
    hlen, blen = struct.unpack(">II", data[:8])
    raw = b""
    while len(raw) < hlen:
        raw += s.recv(hlen - len(raw))
    s.close()
    reply = json.loads(raw)
    return "ok" if reply["ok"] else [reply["code"], reply["message"]]

def handler(request, ctx):
    out = {}
    for name, (method, params, body) in json.loads(request.body).items():
        out[name] = call(method, params, body.encode())
    # The SDK's own calls, which send proper types, still work.
    ctx.kv.put("sdk", {"on": True})
    ctx.kv.put("sdk-bytes", b"raw")
    fetched = ctx.http.fetch("GET", request.query["url"], headers={"X-A": "b"}, timeout=5)
    out["sdk"] = [ctx.kv.get("sdk"), ctx.kv.get("sdk-bytes").decode(), fetched.status]
    out["false then"] = ctx.kv.get("p-false").decode()
    return out
"""


async def test_proxy_parameters_of_the_wrong_type_are_bad_request(api: Api, upstream: int) -> None:
    url = f"http://127.0.0.1:{upstream}/"
    await api.deploy("raw", RAW, public=True, egress_allow=[f"127.0.0.1:{upstream}"])

    def fetch(headers: object) -> tuple[str, dict[str, object], str]:
        return ("http.fetch", {"url": url, "headers": headers, "timeout": 5}, "")

    cases = {
        "json string": ("kv.put", {"key": "p", "json": "false"}, "1"),
        "json int": ("kv.put", {"key": "p", "json": 1}, "1"),
        "json null": ("kv.put", {"key": "p", "json": None}, "1"),
        "json false": ("kv.put", {"key": "p-false", "json": False}, "1"),
        "json true": ("kv.put", {"key": "p-true", "json": True}, "1"),
        "json absent": ("kv.put", {"key": "p-absent"}, "1"),
        "header null": fetch({"X-A": None}),
        "header list": fetch({"X-A": ["a", "b"]}),
        "header number": fetch({"X-A": 3}),
        "header non-ascii": fetch({"X-A": "\u00e9"}),
        "header non-latin-1": fetch({"X-A": "\u20ac"}),
        "header crlf": fetch({"X-A": "a\r\nX-B: b"}),
        "header nul": fetch({"X-A": "a\x00b"}),
        "header name space": fetch({"X A": "a"}),
        "header name empty": fetch({"": "a"}),
        "header fine": fetch({"X-A": "b\tc", "Authorization": "Bearer x"}),
        # h11 refuses outer whitespace (it was egress_failed); HTTP ignores it.
        "header outer space": fetch({"X-A": " b "}),
    }
    r = await api.client.post("/fn/raw", params={"url": url}, content=json.dumps(cases))
    assert r.status_code == 200, r.text
    out = r.json()
    fine = {"json false", "json true", "json absent", "header fine", "header outer space",
            "header number"}  # an integer is sent as its digits, as it always was
    codes = {name: out[name] if out[name] == "ok" else out[name][0] for name in cases}
    assert codes == {name: "ok" if name in fine else "bad_request" for name in cases}
    assert "true or false" in out["json string"][1]
    assert "NoneType" in out["header null"][1]
    assert "ASCII" in out["header non-ascii"][1]
    assert out["sdk"] == [{"on": True}, "raw", 200]
    assert out["false then"] == "1"  # stored as bytes, as json: false says


# Three bytes of an eight-byte prefix, then silence: how long until the gateway
# closes the connection, and whether the function's next call still works.
PARTIAL = """\
import socket, time

def handler(request, ctx):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(25)
    s.connect("/run/nsfaas/proxy.sock")
    s.sendall(b"\\x00\\x00\\x00")
    start = time.monotonic()
    try:
        closed = s.recv(1) == b""
    except socket.timeout:
        closed = False
    waited = time.monotonic() - start
    s.close()
    return {"closed": closed, "waited": waited, "next": ctx.kv.incr("n")}
"""


async def test_a_partial_frame_prefix_gets_the_frame_timeout(api: Api) -> None:
    await api.deploy("partial", PARTIAL, public=True, timeout_s=30)
    r = await api.client.get("/fn/partial", timeout=40)
    assert r.status_code == 200, r.text
    out = r.json()
    # FRAME_TIMEOUT_S is 5; the idle timeout (60 s) would outlast the client's 25 s.
    assert out["closed"] is True, out
    assert 4 <= out["waited"] < 20, out
    assert out["next"] == 1
