"""Noisy neighbours: a function that keeps hitting limits gets a smaller CPU quota."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from jail import choose_jail_dir

from .conftest import Api, make_settings

SPIN = """
def handler(request, ctx):
    if request.text() == "spin":
        while True:
            pass
    return "calm"
"""


async def _call(api: Api, body: str) -> tuple[int, dict[str, Any]]:
    r = await api.client.post("/fn/spinner", content=body)
    inv = r.headers["x-invocation-id"]
    rec = (await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())).json()
    return r.status_code, rec


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
async def test_repeated_limits_throttle_the_function_until_it_behaves(
    tmp_path: Path, warm: bool
) -> None:
    settings = make_settings(
        tmp_path / "data",
        warm=warm,
        cpu_ms_per_sec=500,
        penalty_strikes=2,
        # 100, not less: the penalised function's next call starts a new jail under
        # this quota (~40 ms of CPU), and must still answer within its 1 s timeout.
        penalty_cpu_ms_per_sec=100,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as c:
            api = Api(c, settings, app)
            await api.deploy("spinner", SPIN, public=True, timeout_s=1)
            free = []
            for _ in range(2):  # two timeouts in a row: the second puts it in the box
                status, rec = await _call(api, "spin")
                assert (status, rec["outcome"]) == (504, "timeout"), rec
                assert not any(line["fields"].get("throttled") for line in rec["logs"])
                free.append(rec["cpu_ms"])
            # Half a core for a second: about 500 ms of CPU each time (quota-bound).
            assert min(free) > 250, free

            status, rec = await _call(api, "spin")
            assert (status, rec["outcome"]) == (504, "timeout"), rec
            # 100 ms per second now; the same second of spinning gets a fifth as much
            # (less: starting the throttled jail takes part of that second).
            assert rec["cpu_ms"] < min(free) / 3, (rec["cpu_ms"], free)
            first = rec["logs"][0]
            assert first["level"] == "warning" and first["fields"]["throttled"] is True
            assert first["message"].startswith("[nsfaas] throttled to 100 ms of CPU per second")

            # It still answers (slowly is fine) and an invocation within the limits
            # lifts the penalty: the next spin gets the full quota back.
            status, rec = await _call(api, "calm")
            assert (status, rec["outcome"]) == (200, "ok"), rec
            status, rec = await _call(api, "spin")
            assert (status, rec["outcome"]) == (504, "timeout"), rec
            assert rec["cpu_ms"] > 250, rec["cpu_ms"]
            assert not any(line["fields"].get("throttled") for line in rec["logs"])
            assert (await c.get("/healthz")).status_code == 200
    shutil.rmtree(choose_jail_dir(settings.data_dir), ignore_errors=True)


CRASH = """
import os, signal

def handler(request, ctx):
    if request.text() == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)  # its own bug: no limit was hit
    return "calm"
"""


async def test_a_function_that_kills_itself_is_not_throttled(api: Api) -> None:
    """Only limits count as strikes: a crash (or a caller that went away) used
    nothing up, and anyone who can call a public function could otherwise put it
    in the box."""
    await api.deploy("crasher", CRASH, public=True)
    for _ in range(api.settings.penalty_strikes + 1):
        r = await api.client.post("/fn/crasher", content="crash")
        rec = await api.client.get(
            f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
        )
        assert (r.status_code, rec.json()["outcome"]) == (502, "killed"), rec.text
        assert "SIGSEGV" in rec.json()["error_message"]
    r = await api.client.post("/fn/crasher", content="calm")
    rec = (
        await api.client.get(
            f"/api/v1/invocations/{r.headers['x-invocation-id']}", headers=api.auth()
        )
    ).json()
    assert (r.status_code, r.text) == (200, "calm")
    assert not any(line["fields"].get("throttled") for line in rec["logs"]), rec["logs"]


def _throttled(rec: dict[str, Any]) -> bool:
    return any(line["fields"].get("throttled") for line in rec["logs"])


@pytest.mark.parametrize(
    "api", [{"penalty_strikes": 2, "penalty_s": 2.0, "penalty_cpu_ms_per_sec": 100}],
    indirect=True,
)
async def test_the_box_ends_on_time_and_a_new_version_starts_clean(api: Api) -> None:
    """Calls in the box that time out (a healthy but CPU-hungry call can, on a
    tenth of the CPU) counted as strikes and restarted the box's clock: under
    steady traffic it never opened again, and a fixed version, keyed by the
    function's name, inherited it. Now the box lasts penalty_s from its start,
    and strikes are per version."""
    import asyncio
    import time

    await api.deploy("spinner", SPIN, public=True, timeout_s=0.5)
    for _ in range(2):
        status, rec = await _call(api, "spin")
        assert (status, rec["outcome"], _throttled(rec)) == (504, "timeout", False), rec
    boxed = time.monotonic()
    status, rec = await _call(api, "spin")  # in the box: a timeout that does not count
    assert (status, rec["outcome"], _throttled(rec)) == (504, "timeout", True), rec
    while time.monotonic() - boxed < 2.3:  # calls keep coming while the box lasts
        status, rec = await _call(api, "spin")
        assert status == 504
        await asyncio.sleep(0.1)
    status, rec = await _call(api, "spin")  # 2 s after it began: out of the box
    assert (status, _throttled(rec)) == (504, False), rec
    # Out by time, not by a good call: on probation, one limit puts it back.
    status, rec = await _call(api, "spin")
    assert _throttled(rec), rec
    await api.deploy("spinner", SPIN + "# fixed\n", public=True, timeout_s=0.5)
    status, rec = await _call(api, "calm")
    assert (status, rec["version"], _throttled(rec)) == (200, 2, False), rec


BURN = """
def handler(request, ctx):
    if request.text() == "boom":
        hog = []
        while True:
            hog.append(bytearray(1 << 20))
    while True:
        pass
"""


@pytest.mark.parametrize(
    "api",
    [{"penalty_strikes": 2, "penalty_cpu_ms_per_sec": 100, "penalty_box_cpu_ms_per_sec": 100,
      "cpu_ms_per_sec": 500}],
    indirect=True,
)
async def test_throttled_functions_share_one_box_quota(api: Api) -> None:
    """Each throttled function had 100 ms of CPU a second of its own: three
    hostile functions of one tenant took 15 % of a 2-core machine, and a tenant
    can deploy dozens. Now they share the box's quota: two spinning together
    for 3 s get about 300 ms between them, not 300 ms each."""
    import asyncio

    names = ("burner-a", "burner-b", "burner-c")
    for name in names:
        await api.deploy(name, BURN, public=True, timeout_s=3, memory_mb=64)

    async def call(name: str, body: str) -> dict[str, Any]:
        r = await api.client.post(f"/fn/{name}", content=body)
        inv = r.headers["x-invocation-id"]
        rec = await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())
        return dict(rec.json())

    for _ in range(2):  # two memory limits in a row (quick ones) box each function
        for rec in await asyncio.gather(*(call(n, "boom") for n in names)):
            assert (rec["outcome"], rec["limit_name"]) == ("oom", "memory"), rec
    recs = await asyncio.gather(*(call(n, "spin") for n in names))
    for rec in recs:
        assert (rec["outcome"], _throttled(rec)) == ("timeout", True), rec
    used = [rec["cpu_ms"] for rec in recs]
    # One box of 100 ms/s for 3 s, the three jails' starts included: ~300 ms in
    # all. On quotas of their own it would be ~300 ms each.
    assert sum(used) < 450, used
    assert min(used) > 10, used  # each got its turn
    # The box holds back only the boxed: an unboxed function spins at its quota.
    await api.deploy("free", BURN, public=True, timeout_s=1)
    rec = await call("free", "spin")
    assert rec["outcome"] == "timeout" and rec["cpu_ms"] > 250, rec
    assert (await api.client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    "api", [{"penalty_strikes": 2, "penalty_s": 2.0, "penalty_cpu_ms_per_sec": 100}],
    indirect=True,
)
async def test_each_box_on_probation_lasts_twice_the_one_before(api: Api) -> None:
    """A function that keeps hitting limits left the box every penalty_s for a
    call at the full quota (a CPU loop: half a core for its whole timeout, once
    a minute, and the calls next to it had three times their p99). Each box it
    goes back into on probation now lasts twice as long."""
    import asyncio
    import time

    await api.deploy("bomber", BURN, public=True, timeout_s=3, memory_mb=64)

    async def boom() -> bool:
        r = await api.client.post("/fn/bomber", content="boom")
        inv = r.headers["x-invocation-id"]
        rec = (await api.client.get(f"/api/v1/invocations/{inv}", headers=api.auth())).json()
        assert (rec["outcome"], rec["limit_name"]) == ("oom", "memory"), rec
        return _throttled(rec)

    assert [await boom(), await boom()] == [False, False]  # boxed for 2 s from now
    boxed = time.monotonic()
    assert await boom()
    await asyncio.sleep(max(0.0, boxed + 2.2 - time.monotonic()))
    assert not await boom()  # out by time; on probation this limit re-boxes it, for 4 s
    reboxed = time.monotonic()
    await asyncio.sleep(max(0.0, reboxed + 2.6 - time.monotonic()))
    assert await boom()  # a 2 s box would be over by now
    await asyncio.sleep(max(0.0, reboxed + 4.4 - time.monotonic()))
    assert not await boom()  # the 4 s box is over
