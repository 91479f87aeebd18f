"""What uploads may keep on disk: the per-tenant code quota, the function and
version caps under concurrent uploads, and no blob left behind by a refused upload."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from .conftest import Api


def blobs(api: Api) -> set[str]:
    return {f.name for f in (api.settings.data_dir / "blobs").rglob("*") if f.is_file()}


def padded(n: int, tag: str) -> str:
    """A function whose source is about `n` bytes of incompressible text."""
    return f"PAD = {os.urandom(n // 2).hex()!r}\ndef handler(r, c):\n    return {tag!r}\n"


@pytest.mark.parametrize("api", [{"tenant_code_bytes": 400_000}], indirect=True)
async def test_code_quota_counts_every_version_and_frees_on_delete(api: Api) -> None:
    key = await api.tenant("acme")
    r = await api.client.get("/api/v1/functions", headers=api.auth(key))
    assert r.json()["usage"] == {"code_bytes": 0, "code_bytes_limit": 400_000}
    # A version counts its archive (20 KB of hex digits deflate to ~11 KB), its
    # files (20 KB) and room for their bytecode (2 x 20 KB + 64 KiB): ~136 KB
    await api.deploy("q1", padded(20_000, "v1"), key=key)
    await api.deploy("q1", padded(20_000, "v2"), key=key)
    used = (await api.client.get("/api/v1/functions", headers=api.auth(key))).json()["usage"]
    assert 260_000 <= used["code_bytes"] <= 285_000, used
    one = used["code_bytes"] / 2
    before = blobs(api)
    for name in ("q1", "q2"):  # a new version or a new function: both count
        r = await api.client.put(
            f"/api/v1/functions/{name}", json={"source": padded(20_000, "v3")}, headers=api.auth(key)
        )
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "code_quota" and "400000" in err["message"], err
    assert blobs(api) == before, "a refused upload left its blob on disk"
    # Another tenant's quota is its own.
    other = await api.tenant("other")
    await api.deploy("o1", padded(20_000, "o"), key=other)
    # Deleting frees the quota (and the blobs).
    assert (await api.client.delete("/api/v1/functions/q1", headers=api.auth(key))).status_code == 204
    await api.deploy("q2", padded(20_000, "v4"), key=key, public=True)
    r = await api.client.get("/fn/q2")
    assert (r.status_code, r.text) == (200, "v4")
    used = (await api.client.get("/api/v1/functions", headers=api.auth(key))).json()["usage"]
    assert abs(used["code_bytes"] - one) < 1_000, (used, one)


async def test_a_refused_upload_leaves_no_blob(api: Api) -> None:
    """A route taken by another tenant is refused after the blob is written: the
    blob used to stay with nothing pointing at it, so repeating the refused
    upload with new bytes filled the disk, quota or not."""
    await api.deploy("owner", "def handler(r, c):\n    return {\"n\": 1}\n", routes=["GET /taken/{x}"])
    key = await api.tenant("squatter")
    before = blobs(api)
    for i in range(3):
        r = await api.client.put(
            "/api/v1/functions/squat",
            json={"source": padded(50_000, str(i)), "routes": ["GET /taken/{y}"]},
            headers=api.auth(key),
        )
        assert r.status_code == 409 and r.json()["error"]["code"] == "route_conflict", r.text
    assert blobs(api) == before
    # The same code as a stored version is refused too, and that blob stays.
    src = "def handler(r, c):\n    return {\"n\": 1}\n"
    r = await api.client.put(
        "/api/v1/functions/squat", json={"source": src, "routes": ["GET /taken/{y}"]},
        headers=api.auth(key),
    )
    assert r.status_code == 409
    assert blobs(api) == before
    r = await api.client.get("/taken/1", headers=api.auth())
    assert (r.status_code, r.json()) == (200, {"n": 1})


@pytest.mark.parametrize(
    "api", [{"max_functions_per_tenant": 3, "max_versions_per_function": 3}], indirect=True
)
async def test_concurrent_uploads_do_not_overshoot_the_caps(api: Api) -> None:
    key = await api.tenant("burst")

    async def put(name: str, tag: str) -> int:
        r = await api.client.put(
            f"/api/v1/functions/{name}", json={"source": padded(2_000, tag)}, headers=api.auth(key)
        )
        assert r.status_code in (200, 201, 409, 429), r.text
        if r.status_code == 409:
            assert r.json()["error"]["code"] in ("function_limit", "version_limit"), r.text
        return r.status_code

    # Four at a time (one checked, three waiting; the rest 429): over the caps.
    codes = await asyncio.gather(*(put(f"f{i}", str(i)) for i in range(12)))
    assert codes.count(201) == 3 and codes.count(409) >= 1, codes
    assert codes.count(201) + codes.count(409) + codes.count(429) == 12, codes
    r = await api.client.get("/api/v1/functions", headers=api.auth(key))
    names = [f["name"] for f in r.json()["functions"]]
    assert len(names) == 3
    codes = await asyncio.gather(*(put(names[0], f"v{i}") for i in range(12)))
    assert codes.count(200) == 2 and codes.count(409) >= 1, codes
    assert codes.count(200) + codes.count(409) + codes.count(429) == 12, codes
    assert len(blobs(api)) == 3 + 2  # one per stored version, none for the refused


def heavy(tag: str, lines: int = 4000) -> str:
    """A source that takes the upload check a good fraction of a second."""
    body = "".join(f"a{j} = [{j}, {j * 7}, {j * 13}, {j + 5}, {j * 3}, 6, 7, 8]\n"
                   for j in range(lines))
    return body + f"def handler(r, c):\n    return {tag!r}\n"


async def test_uploads_are_checked_a_tenant_at_a_time_and_tenants_in_turn(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checking parses the code (16 MB of source took 10 s of CPU); three at
    once slowed every call 20x. Now a tenant's uploads are checked one at a
    time, in one of two checker processes: its burst queues behind itself, and
    another tenant's upload does not wait for it."""
    checker = api.app.state.gateway.checker  # type: ignore[attr-defined]
    checking = {"burst": 0, "other": 0}
    most = {"burst": 0, "other": 0}
    real = checker.check

    async def counted(source: bytes, *args: Any, **kw: Any) -> Any:  # the real check, counted
        who = "burst" if source.startswith(b"a0 =") else "other"
        checking[who] += 1
        most[who] = max(most[who], checking[who])
        try:
            return await real(source, *args, **kw)
        finally:
            checking[who] -= 1

    monkeypatch.setattr(checker, "check", counted)
    a, b = await api.tenant("burst"), await api.tenant("other")
    done: list[str] = []

    async def put(key: str, name: str, src: str) -> None:
        r = await api.client.put(f"/api/v1/functions/{name}", json={"source": src},
                                 headers=api.auth(key))
        assert r.status_code in (200, 201), r.text
        done.append(name)

    burst = [asyncio.create_task(put(a, "heavy", heavy(str(i)))) for i in range(4)]
    await asyncio.sleep(0.05)  # the first check is running, three wait behind it
    await put(b, "light", "def handler(r, c):\n    return 1 and {}\n")
    await asyncio.gather(*burst)
    assert most == {"burst": 1, "other": 1}, most
    assert done.index("light") <= 1, done  # not behind the burst
    assert api.app.state.gateway.tenant_uploads == {}  # type: ignore[attr-defined]
