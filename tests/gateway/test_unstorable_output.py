"""What a function sends out that UTF-8 text or JSON cannot carry: lone
surrogates (valid in a Python str, and in JSON as "\\ud800") and NaN/Infinity
(or numbers too large for a float). Each used to fail the record's write (a
500 with no record) or every later read of it (a 500 on the listing, for the
tenant and the admin). Now the invocation is recorded like any other, its
record and logs read back, and the next call works."""

from __future__ import annotations

import json

import pytest

from .conftest import Api

FORGED_FRAME = """
import os, struct

def handler(request, ctx):
    head = (b'{"kind":"ok","status":200,"headers":[],'
            b'"usage":{"cpu_ms":%s,"maxrss_kb":%s}}')
    os.write(3, struct.pack(">II", len(head), 0) + head)
    return "never read"
"""

CASES = {
    "exception": (
        "def handler(request, ctx):\n    raise ValueError('bad \\ud800 text')\n",
        "error",
    ),
    "ctx_log": (
        "def handler(request, ctx):\n"
        "    ctx.log.info('a \\ud800', k='\\ud800', n=float('nan'), **{'\\udfff': 1})\n"
        "    return 'ok'\n",
        "ok",
    ),
    "stdout_json": (
        "import json\n"
        "def handler(request, ctx):\n"
        "    print(json.dumps({'message': '\\ud800', 'x': float('inf')}))\n"
        "    return 'ok'\n",
        "ok",
    ),
    "logging": (
        "import logging\n"
        "def handler(request, ctx):\n"
        "    logging.warning('%s', '\\ud800')\n"
        "    return 'ok'\n",
        "ok",
    ),
    "raw_log_line": (
        "import os\n"
        "def handler(request, ctx):\n"
        "    for ts in ('NaN', '1e999', '-1', '1e300', '123456789012345678901234567890'):\n"
        '        os.write(4, (\'{"ts": %s, "message": "m", "level": "info"}\\n\' % ts).encode())\n'
        "    return 'ok'\n",
        "ok",
    ),
    "import_time": (
        "raise ValueError('at import \\ud800')\ndef handler(r, c):\n    pass\n",
        "error",
    ),
    "forged_nan": (FORGED_FRAME % ("NaN", "Infinity"), "ok"),
    "forged_huge": (FORGED_FRAME % ("1" + "0" * 400, "-5"), "ok"),
}


def _not_json(token: str) -> None:
    raise AssertionError(f"{token} in a JSON response")


@pytest.mark.parametrize("api", ["warm", "cold"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
async def test_unstorable_output_is_recorded_and_readable(api: Api, case: str) -> None:
    src, outcome = CASES[case]
    name = "u" + case.replace("_", "")
    await api.deploy(name, src, public=True)
    r = await api.client.get(f"/fn/{name}")
    assert r.status_code != 500 or r.json()["error"]["code"] == "error", r.text
    inv = r.headers["x-invocation-id"]
    rec = await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())
    assert rec.status_code == 200, rec.text
    assert rec.json()["outcome"] == outcome, rec.text
    json.loads(rec.text, parse_constant=_not_json)  # strict JSON: no NaN/Infinity
    if case in ("exception", "import_time"):
        assert "\ufffd" in rec.json()["error_message"]
    if case.startswith("forged"):
        assert rec.json()["cpu_ms"] is None and rec.json()["peak_memory_mb"] is None
    for path in (
        f"/api/v1/invocations?function={name}",
        "/api/v1/invocations?limit=1000",
        f"/api/v1/functions/{name}/logs",
    ):
        listed = await api.client.get(path, headers=api.auth())
        assert listed.status_code == 200, (path, listed.text)
        json.loads(listed.text, parse_constant=_not_json)
    if case == "raw_log_line":
        lines = rec.json()["logs"]
        assert len(lines) == 5 and all(abs(e["ts"] - lines[0]["ts"]) < 60 for e in lines)
    # The function (and the gateway) carry on.
    await api.deploy(name, "def handler(request, ctx):\n    return 'fine'\n", public=True)
    r = await api.client.get(f"/fn/{name}")
    assert (r.status_code, r.text) == (200, "fine")
