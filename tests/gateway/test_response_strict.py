"""What a function answers must be what the README promises: header values
free of control characters (C1 included), JSON bodies strict JSON."""

from __future__ import annotations

import pytest

from .conftest import Api

SRC = """
from nsfaas import Response

def handler(request, ctx):
    kind = request.query["kind"]
    if kind == "c1":
        return Response("x", headers={"X-A": "\\x85\\x9b"})
    if kind == "lone":
        return {"s": "\\udfff"}
    if kind == "pair":
        return {"s": "\\U0001F600", "t": "caf\\u00e9 \\u00a0"}
    if kind == "two-types":
        return Response('"\\ud800"', headers=[("Content-Type", "text/plain"),
                                             ("Content-Type", "application/json")])
    if kind == "deep":
        return Response("[" * 3000 + '"\\ud800"' + "]" * 3000,
                        headers={"Content-Type": "text/json"})
    if kind == "nan":
        return Response('{"a": NaN}', headers={"Content-Type": "application/x-json"})
    if kind == "nan-text":
        return Response('{"a": "NaN and Infinity"}', headers={"Content-Type": "application/json"})
    if kind == "text":
        return Response('{"s": "\\\\udfff"}', headers={"Content-Type": "text/plain"})
    return Response("x", headers={"X-A": "caf\\u00e9"})
"""


@pytest.mark.parametrize(
    ("kind", "outcome"),
    [("c1", "bad_response"), ("lone", "bad_response"), ("pair", "ok"), ("text", "ok"),
     ("latin1", "ok"), ("two-types", "bad_response"), ("deep", "bad_response"),
     ("nan", "bad_response"), ("nan-text", "ok")],
)
async def test_responses_are_checked(api: Api, kind: str, outcome: str) -> None:
    await api.deploy("answers", SRC, public=True)
    r = await api.client.get("/fn/answers", params={"kind": kind})
    rec = (await api.client.get(
        f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
    )).json()
    assert rec["outcome"] == outcome, (r.status_code, r.text, rec)
    if outcome == "bad_response":
        assert r.status_code == 502
    else:
        assert r.status_code == 200
