"""A module that starts a thread at import which writes to stdout without end.

Threads do not survive the zygote's fork, but a lock one of them held does:
children used to inherit sys.stdout's lock held and hang on their first flush
(every other warm call a 504 after the full timeout). And the runtime's own
output, read by the gateway, must not go on without bound: past its cap the
worker retires and the next call gets a fresh one."""

from __future__ import annotations

from .conftest import Api

SRC = """
import sys, threading

def spew():
    while True:
        sys.stdout.write("z" * 65536)
        sys.stdout.flush()

threading.Thread(target=spew, daemon=True).start()

def handler(request, ctx):
    print("in the handler")
    return "hi"
"""


async def test_an_import_time_thread_never_hangs_a_call(api: Api) -> None:
    await api.deploy("noisy", SRC, public=True, timeout_s=5)
    starts = []
    for _ in range(8):
        r = await api.client.get("/fn/noisy")
        assert (r.status_code, r.text) == (200, "hi"), r.text
        rec = await api.client.get(
            f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
        )
        body = rec.json()
        assert body["outcome"] == "ok" and body["wall_ms"] < 4000, body
        assert any(e["message"] == "in the handler" for e in body["logs"]), body["logs"]
        starts.append(body["start"])
    assert "cold" in starts[1:], starts  # workers over the output cap were replaced
    r = await api.client.get("/healthz")
    assert r.status_code == 200
