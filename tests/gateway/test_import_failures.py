"""A function whose import ends the runtime before it could report (an exit, its
channels closed, the memory limit) fails like a function, not like the jail:
not a 503 ``jail_failure`` ("retry later"), which says the platform broke."""

from __future__ import annotations

import pytest

from .conftest import Api

CASES = {
    "exit": (
        "import os\nprint('bye', flush=True)\nos._exit(3)\n",
        500,
        "error",
        "LoadFailed",
        "exit code 3",
    ),
    "closed_channels": (
        "import os, sys\nos.closerange(3, 200)\nsys.exit(0)\n",
        500,
        "error",
        None,
        None,
    ),
    "memory": ("x = bytearray(300 << 20)\n", 502, "oom", "oom", "exceeded 64 MB"),
}
HANDLER = "\ndef handler(request, ctx):\n    return 'unreachable'\n"


@pytest.mark.parametrize("api", ["warm", "cold"], indirect=True)
@pytest.mark.parametrize("case", sorted(CASES))
async def test_an_import_that_ends_the_runtime_is_the_functions_failure(
    api: Api, case: str
) -> None:
    src, status, outcome, error_type, message = CASES[case]
    name = "imp" + case.replace("_", "")
    await api.deploy(name, src + HANDLER, public=True, memory_mb=64)
    for _ in range(2):  # a second call fails the same way (no stale worker is used)
        r = await api.client.get(f"/fn/{name}")
        assert r.status_code == status, r.text
        rec = await api.client.get(
            f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
        )
        body = rec.json()
        assert body["outcome"] == outcome, body
        if error_type is not None:
            assert body["error_type"] == error_type, body
        if message is not None:
            assert message in body["error_message"], body
    if case == "exit":
        assert any(line["message"] == "bye" for line in body["logs"]), body["logs"]
    await api.deploy(name, HANDLER.replace("'unreachable'", "'fine'"), public=True)
    r = await api.client.get(f"/fn/{name}")
    assert (r.status_code, r.text) == (200, "fine")


async def test_a_bundle_module_named_like_the_stdlib_cannot_break_the_runtime(
    api: Api,
) -> None:
    """A bundle's json.py used to replace the json the runtime imports itself:
    the runtime failed before it could report (503 jail_failure). Modules the
    runtime imported first stay the stdlib's (the function's `import json` gets
    them too); any other stdlib name the bundle ships is the bundle's."""
    import base64
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("json.py", "X = 1\n")
        z.writestr("calendar.py", "Y = 2\n")
        z.writestr(
            "handler.py",
            "import calendar, json\n"
            "def handler(r, c):\n"
            "    return {'stdlib_json': hasattr(json, 'dumps'), 'y': calendar.Y}\n",
        )
    r = await api.client.put(
        "/api/v1/functions/shadow",
        json={"archive": base64.b64encode(buf.getvalue()).decode(), "public": True},
        headers=api.auth(),
    )
    assert r.status_code == 201, r.text
    r = await api.client.get("/fn/shadow")
    assert (r.status_code, r.json()) == (200, {"stdlib_json": True, "y": 2}), r.text
