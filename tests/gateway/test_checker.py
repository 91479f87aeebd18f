"""Uploads are checked in a process of their own (gateway.checker): the
gateway's interpreter is not held by a parse, a check is bounded in time and
memory, and a checker that dies or overruns is replaced."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import signal
import zipfile
from pathlib import Path

import pytest

from gateway.app import create_app
from tests.gateway.conftest import Api, make_settings

HELLO = "def handler(r, c):\n    return {'ok': %d}\n"


def heavy(lines: int) -> str:
    """~50 bytes a line; 12,000 lines take the check about a second."""
    body = "".join(f"a{j} = [{j}, {j * 7}, {j * 13}, {j + 5}, {j * 3}, 6, 7, 8]\n"
                   for j in range(lines))
    return body + "def handler(r, c):\n    return {'ok': 'heavy'}\n"


def proc_file(pid: int, name: str) -> str:
    return Path(f"/proc/{pid}/{name}").read_text()


def proc_field(pid: int, name: str) -> str:
    for line in proc_file(pid, "status").splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(name)


async def put(api: Api, name: str, source: str) -> tuple[int, dict[str, object]]:
    r = await api.client.put(f"/api/v1/functions/{name}", json={"source": source},
                             headers=api.auth())
    return r.status_code, r.json()


async def works(api: Api, name: str, n: int) -> None:
    """An upload after a refused one is checked and runs."""
    status, body = await put(api, name, HELLO % n)
    assert status in (200, 201), body
    r = await api.client.post(f"/fn/{name}", headers=api.auth())
    assert r.status_code == 200 and r.json() == {"ok": n}, r.text


async def test_uploads_are_checked_in_a_niced_process_with_a_memory_limit(api: Api) -> None:
    await works(api, "first", 1)
    checker = api.app.state.gateway.checker.checkers[0]  # type: ignore[attr-defined]
    pid = checker.pid
    assert pid is not None and pid != os.getpid()
    assert proc_field(pid, "PPid") == str(os.getpid())
    nice = int(proc_file(pid, "stat").rsplit(")", 1)[1].split()[16])
    assert nice == 10
    limits = proc_file(pid, "limits")
    line = next(x for x in limits.splitlines() if x.startswith("Max address space"))
    assert line.split()[3] == str(api.settings.upload_check_memory_mb * 1024 * 1024), line
    await works(api, "second", 2)
    # One process for every check, not one per upload: under light load the
    # most recently used checker takes the next, and the other never starts.
    assert api.app.state.gateway.checker.pids == {pid}  # type: ignore[attr-defined]


@pytest.mark.parametrize("api", [{"upload_check_timeout_s": 0.3}], indirect=True)
async def test_a_check_over_its_time_is_refused_and_the_next_upload_is_checked(
    api: Api,
) -> None:
    await works(api, "warmup", 1)  # the checker's start-up is not the check's time
    checker = api.app.state.gateway.checker.checkers[0]  # type: ignore[attr-defined]
    before = checker.pid
    status, body = await put(api, "slow", heavy(12_000))
    assert status == 413, body
    assert body["error"]["code"] == "too_complex"  # type: ignore[index]
    assert body["error"]["detail"] == {"limit_s": 0.3}  # type: ignore[index]
    r = await api.client.get("/api/v1/functions/slow", headers=api.auth())
    assert r.status_code == 404  # nothing stored
    with pytest.raises(ProcessLookupError):
        for _ in range(100):  # killed, and reaped in the background
            os.kill(before, 0)
            await asyncio.sleep(0.05)
    await works(api, "after", 3)
    assert checker.pid not in (None, before)


async def test_a_checker_killed_mid_check_refuses_that_upload_only(api: Api) -> None:
    await works(api, "warmup", 1)
    checker = api.app.state.gateway.checker.checkers[0]  # type: ignore[attr-defined]
    pid = checker.pid
    upload = asyncio.create_task(put(api, "victim", heavy(12_000)))
    await asyncio.sleep(0.3)  # parsing (about a second)
    os.kill(pid, signal.SIGKILL)
    status, body = await upload
    assert status == 413, body
    assert body["error"]["code"] == "too_complex"  # type: ignore[index]
    assert "ended" in body["error"]["message"]  # type: ignore[index]
    await works(api, "after", 2)
    assert checker.pid != pid


@pytest.mark.parametrize("api", [{"upload_check_memory_mb": 80}], indirect=True)
async def test_a_check_over_its_memory_is_refused_and_the_gateway_keeps_serving(
    api: Api,
) -> None:
    """Checking an archive holds its files in the checker's memory: 7 files of
    6 MB (56:1, under the zip bomb ratio and the 50 MB unpacked cap) need more
    than the 80 MiB this checker may map, its interpreter included."""
    await works(api, "warmup", 1)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("handler.py", HELLO % 9)
        for i in range(7):
            zf.writestr(f"data{i}.txt",
                        b"".join(os.urandom(1000) + bytes(63 * 1024) for _ in range(96)))
    archive = base64.b64encode(buffer.getvalue()).decode()
    r = await api.client.put("/api/v1/functions/big", json={"archive": archive},
                             headers=api.auth())
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_complex", r.text
    assert "MiB" in r.json()["error"]["message"]
    await works(api, "after", 2)


async def test_the_checker_ends_with_the_gateway(tmp_path: Path) -> None:
    import httpx

    app = create_app(make_settings(tmp_path / "data"))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://nsfaas.test", timeout=30) as client:
            api = Api(client, app.state.gateway.settings, app)
            await works(api, "one", 1)
            pid = app.state.gateway.checker.checkers[0].pid
            assert pid is not None
            os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            os.kill(pid, 0)
            await asyncio.sleep(0.05)
