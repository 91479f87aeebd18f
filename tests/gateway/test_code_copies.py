"""Unpacked code is per tenant, made at deploy: no tenant can tell from its own
/function whether another deployed the same code, and a call queued when its
function is deleted still runs on its code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from .conftest import Api

STAT = """
import os

API_KEY = "PIN-4711"

def handler(request, ctx):
    st = os.stat("/function")
    f = os.stat("/function/handler.py")
    return {"dir": [st.st_ino, st.st_ctime, st.st_mtime], "file": [f.st_ino, f.st_ctime]}
"""


async def test_same_code_in_two_tenants_is_two_copies(api: Api) -> None:
    """A shared directory per digest told tenant B, through its timestamps,
    whether tenant A had deployed exactly this code (a secret in it included):
    one deploy and one call per guess."""
    a, b = await api.tenant("a"), await api.tenant("b")
    await api.deploy("fa", STAT, key=a)
    first = (await api.client.get("/fn/fa", headers=api.auth(a))).json()
    await asyncio.sleep(1.1)
    await api.deploy("fb", STAT, key=b)
    second = (await api.client.get("/fn/fb", headers=api.auth(b))).json()
    assert second["dir"][0] != first["dir"][0] and second["file"][0] != first["file"][0]
    assert second["dir"][1] >= first["dir"][1] + 1.0, (first, second)  # made for B, later
    # One tenant's two functions with the same code share a copy (nothing to hide).
    await api.deploy("fa2", STAT, key=a)
    again = (await api.client.get("/fn/fa2", headers=api.auth(a))).json()
    assert again["dir"] == first["dir"]


SLOW = "import time\ndef handler(r, c):\n    time.sleep(1.5)\n    return 'slow'\n"
TARGET = "def handler(r, c):\n    return {'ran': 'on its code'}\n"


@pytest.mark.parametrize(
    "api", [{"max_concurrency": 1, "tenant_concurrency": 0}], indirect=True
)
async def test_a_call_queued_across_the_delete_runs_on_its_code(api: Api) -> None:
    """Its code had never been unpacked: the delete took the blob, and the
    queued call ended in a 500 with no invocation id and a record left
    "running" for good. Code is now unpacked at deploy."""
    await api.deploy("slow", SLOW, public=True)
    await api.deploy("target", TARGET, public=True)
    held = asyncio.create_task(api.client.get("/fn/slow"))
    await asyncio.sleep(0.4)  # it holds the only slot
    queued = asyncio.create_task(api.client.get("/fn/target"))
    await asyncio.sleep(0.2)
    r = await api.client.delete("/api/v1/functions/target", headers=api.auth())
    assert r.status_code == 204
    assert (await held).text == "slow"
    r = await queued
    assert (r.status_code, r.json()) == (200, {"ran": "on its code"}), r.text
    rec = await api.client.get(
        f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
    )
    assert rec.json()["outcome"] == "ok", rec.text
    running = await api.client.get("/api/v1/invocations?outcome=running", headers=api.auth())
    assert running.json()["invocations"] == [], running.text


async def test_deleted_code_goes_at_once_when_nothing_runs_it(api: Api) -> None:
    """Deleted code stayed ~5 minutes (the longest queue wait plus timeout)
    even with nothing running: a delete-and-recreate loop kept ~19 GB on disk."""
    from jail import choose_jail_dir

    code = choose_jail_dir(api.settings.data_dir) / "code"
    for round_ in range(3):
        await api.deploy("churn", TARGET + f"# {round_}\n", public=True)
        assert (await api.client.get("/fn/churn")).json() == {"ran": "on its code"}
        r = await api.client.delete("/api/v1/functions/churn", headers=api.auth())
        assert r.status_code == 204
        for _ in range(100):
            if not [p for p in code.iterdir() if "." in p.name]:
                break
            await asyncio.sleep(0.02)
        assert [p.name for p in code.iterdir() if "." in p.name] == [], round_


async def test_proxy_socket_dirs_a_crash_left_are_removed_at_start(tmp_path: Path) -> None:
    """After a SIGKILL with calls running, their socket dirs stayed for good."""
    import httpx

    from gateway.app import create_app
    from jail import choose_jail_dir

    from .conftest import make_settings

    settings = make_settings(tmp_path / "data")
    sock = choose_jail_dir(settings.data_dir) / "sock"
    for start in range(2):
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            if start == 0:
                (sock / "0123456789abcdef").mkdir()  # as a crashed gateway left it
                (sock / "0123456789abcdef" / "proxy.sock").touch()
            else:
                assert list(sock.iterdir()) == []
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                         base_url="http://t") as c:
                assert (await c.get("/healthz")).status_code == 200
