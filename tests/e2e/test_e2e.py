"""End to end: real uvicorn, real jails, real HTTP on loopback (see conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import signal
import sqlite3
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from .conftest import (
    GatewayProcess,
    Live,
    ProcessWatch,
    StartLive,
    auth,
    gateway_cgroups,
    jail_cgroups,
    orphaned_jail_processes,
    short_tmp,
    wait_for,
)

pytestmark = pytest.mark.slow

HELLO = "def handler(request, ctx):\n    return {'hello': request.query.get('name', 'world')}\n"
SLEEPY = (
    "import time\n"
    "def handler(request, ctx):\n"
    "    time.sleep(float(request.query.get('s', '1')))\n"
    "    return {'slept': True}\n"
)
REPO = Path(__file__).resolve().parents[2]


# -- 1. the life of a function ------------------------------------------------------------


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
async def test_upload_invoke_version_rollback_delete(start_live: StartLive, warm: bool) -> None:
    async with start_live(warm=warm) as live, live.client() as c:
        r = await live.deploy(c, "life", HELLO, public=True)
        assert r.status_code == 201 and r.json()["version"] == 1

        r = await c.get("/fn/life", params={"name": "ann"})
        assert r.status_code == 200, r.text
        assert r.json() == {"hello": "ann"}
        inv1 = r.headers["x-invocation-id"]

        r = await live.deploy(c, "life", HELLO.replace("'hello'", "'hi'"), public=True)
        assert r.status_code == 200 and r.json()["version"] == 2
        assert (await c.get("/fn/life")).json() == {"hi": "world"}

        r = await c.get("/api/v1/functions/life", headers=live.auth)
        assert r.status_code == 200
        assert (r.json()["version"], r.json()["latest_version"]) == (2, 2)

        r = await c.post("/api/v1/functions/life/rollback", json={"version": 1}, headers=live.auth)
        assert r.status_code == 200 and r.json()["version"] == 1
        r = await c.get("/fn/life")
        assert r.json() == {"hello": "world"}

        r = await c.get("/api/v1/functions/life/versions", headers=live.auth)
        body = r.json()
        assert body["active_version"] == 1
        assert sorted(v["version"] for v in body["versions"]) == [1, 2]

        r = await c.get(f"/api/v1/invocations/{inv1}", headers=live.auth)
        assert r.status_code == 200
        assert r.json()["outcome"] == "ok"
        assert r.json()["start"] == "cold"  # the first call of a version always starts a jail

        r = await c.delete("/api/v1/functions/life", headers=live.auth)
        assert r.status_code == 204
        r = await c.get("/fn/life")
        assert r.status_code == 404 and r.json()["error"]["code"] == "function_not_found"
        r = await c.get("/api/v1/functions/life", headers=live.auth)
        assert r.status_code == 404


# -- 2. many at once, never mixed up -------------------------------------------------------

ECHO_A = (
    "def handler(request, ctx):\n"
    "    return {'fn': 'a', 'rid': request.query['rid'], 'body': request.text(),\n"
    "            'inv': ctx.invocation_id}\n"
)
ECHO_B = (
    "def handler(request, ctx):\n"
    "    rid = request.headers['x-rid']\n"
    "    return ('b:' + rid + ':' + request.text(), 201, {'X-Echo-Rid': rid})\n"
)


async def test_fifty_simultaneous_invocations_of_two_functions(start_live: StartLive) -> None:
    async with (
        start_live(
            max_concurrency=24, function_concurrency=12, queue_size=200, queue_timeout_s=60
        ) as live,
        live.client(limits=httpx.Limits(max_connections=100)) as c,
    ):
        await live.deploy(c, "echo-a", ECHO_A, public=True)
        await live.deploy(c, "echo-b", ECHO_B, public=True)

        async def call(i: int) -> tuple[int, httpx.Response, str, str]:
            rid = f"{i}-{uuid.uuid4().hex}"
            payload = f"payload-{rid}" * (1 + i % 7)
            if i % 2:
                r = await c.post("/fn/echo-a", params={"rid": rid}, content=payload)
            else:
                r = await c.post("/fn/echo-b", headers={"X-Rid": rid}, content=payload)
            return i, r, rid, payload

        results = await asyncio.gather(*(call(i) for i in range(50)))
        ids = set()
        for i, r, rid, payload in results:
            assert r.status_code in (200, 201), (i, r.status_code, r.text)
            inv = r.headers["x-invocation-id"]
            ids.add(inv)
            if i % 2:
                assert r.status_code == 200
                assert r.json() == {"fn": "a", "rid": rid, "body": payload, "inv": inv}
            else:
                assert r.status_code == 201
                assert r.text == f"b:{rid}:{payload}"
                assert r.headers["x-echo-rid"] == rid
        assert len(ids) == 50

        r = await c.get("/api/v1/invocations", params={"limit": 100}, headers=live.auth)
        outcomes = Counter((x["function"], x["outcome"]) for x in r.json()["invocations"])
        assert outcomes == {("echo-a", "ok"): 25, ("echo-b", "ok"): 25}


# -- 3. backpressure ------------------------------------------------------------------------


async def test_backpressure_rejects_with_429_and_recovers(start_live: StartLive) -> None:
    async with (
        start_live(max_concurrency=1, queue_size=1, queue_timeout_s=0.5) as live,
        live.client() as c,
    ):
        await live.deploy(c, "slow", SLEEPY, public=True)
        rs = await asyncio.gather(*(c.get("/fn/slow") for _ in range(5)))
        by_status = Counter(r.status_code for r in rs)
        # One runs; one waits in the queue and gives up after 0.5 s (the call takes 1 s);
        # three find the queue full.
        assert by_status == {200: 1, 429: 4}, [(r.status_code, r.text) for r in rs]
        for r in rs:
            if r.status_code == 429:
                assert r.headers["retry-after"].isdigit()
                err = r.json()["error"]
                assert err["code"] == "rejected"
                assert err["invocation_id"] == r.headers["x-invocation-id"]
            else:
                assert r.json() == {"slept": True}
        r = await c.get("/fn/slow", params={"s": "0"})
        assert r.status_code == 200
        assert (await c.get("/healthz")).status_code == 200
        r = await c.get(
            "/api/v1/invocations",
            params={"function": "slow", "outcome": "rejected"},
            headers=live.auth,
        )
        assert len(r.json()["invocations"]) == 4


# -- 4. SIGKILL in the middle of uploads (issue 3) ------------------------------------------

PAD = "x" * 150_000


def _churn_source(token: str) -> str:
    return (
        f"TOKEN = {token!r}\nPAD = {PAD!r}\n"
        "def handler(request, ctx):\n    return {'token': TOKEN, 'pad': len(PAD)}\n"
    )


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return ", ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _torn_blobs(blob_dir: Path) -> list[str]:
    """Blobs stored under a digest name whose content does not hash to it."""
    bad = []
    for path in blob_dir.glob("*/*"):
        if re.fullmatch(r"[0-9a-f]{64}", path.name):
            if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
                bad.append(path.name)
    return bad


async def test_sigkill_mid_upload_leaves_only_complete_functions(
    gateway_procs: Callable[..., GatewayProcess],
) -> None:
    data_dir = short_tmp()
    gw = gateway_procs(data_dir)
    await gw.start()
    names = ["churn-a", "churn-b", "churn-c"]
    sent: dict[str, str] = {}  # token -> function, every upload sent
    acked: dict[tuple[str, int], str] = {}  # (function, version) -> token, answered 2xx
    enough = asyncio.Event()
    slow_started = asyncio.Event()

    async def churn(c: httpx.AsyncClient, name: str) -> None:
        while True:
            token = uuid.uuid4().hex
            sent[token] = name
            try:
                r = await c.put(
                    f"/api/v1/functions/{name}",
                    json={"source": _churn_source(token), "public": True},
                    headers=auth(),
                )
            except httpx.TransportError:
                return
            if r.status_code == 429:  # more than a tenant's 4 uploads at once: again
                await asyncio.sleep(0.02)
                continue
            assert r.status_code in (200, 201), r.text
            acked[(name, r.json()["version"])] = token
            if len(acked) >= 15:
                enough.set()

    async def slow_body() -> AsyncIterator[bytes]:
        yield b'{"public": true, "source": "X = \'' + b"y" * 65536
        slow_started.set()
        for _ in range(600):
            await asyncio.sleep(0.05)
            yield b"y" * 8192
        yield b"'\\ndef handler(r, c):\\n    return 1\\n\"}"

    async def slow_upload(c: httpx.AsyncClient) -> None:
        try:
            r = await c.put(
                "/api/v1/functions/slow-upload",
                content=slow_body(),
                headers={**auth(), "Content-Type": "application/json"},
            )
        except httpx.TransportError:
            return
        raise AssertionError(f"the slow upload finished before the kill: {r.status_code}")

    async with httpx.AsyncClient(base_url=gw.url, timeout=60) as c:
        tasks = [asyncio.create_task(slow_upload(c))]
        tasks += [asyncio.create_task(churn(c, n)) for n in names for _ in range(2)]
        async with asyncio.timeout(30):
            await enough.wait()
            await slow_started.wait()
        await asyncio.sleep(random.SystemRandom().uniform(0, 0.05))
        gw.signal(signal.SIGKILL)
        code = await gw.wait()
        assert code == -signal.SIGKILL
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(o is None for o in outcomes), outcomes
    # Nothing the killed gateway started outlives it for long (a jail exits on EOF).
    assert await wait_for(lambda: not orphaned_jail_processes(gw.pid), 5.0), (
        orphaned_jail_processes(gw.pid)
    )

    assert _integrity(data_dir / "nsfaas.db") == "ok"
    assert _torn_blobs(data_dir / "blobs") == []

    gw2 = gateway_procs(data_dir)
    await gw2.start()
    # The new gateway swept the cgroups the killed one could not remove.
    assert gateway_cgroups(gw.pid) == set()
    async with httpx.AsyncClient(base_url=gw2.url, headers=auth(), timeout=60) as c:
        r = await c.get("/api/v1/functions")
        assert r.status_code == 200
        listed = {f["name"]: f for f in r.json()["functions"]}
        assert "slow-upload" not in listed  # its body never finished arriving
        assert set(listed) <= set(names)
        assert {name for name, _ in acked} <= set(listed)  # acknowledged means durable
        seen_tokens: set[str] = set()
        for name, info in listed.items():
            r = await c.get(f"/api/v1/functions/{name}")
            assert r.status_code == 200, r.text
            latest = r.json()["latest_version"]
            assert r.json()["version"] == info["version"]
            r = await c.get(f"/api/v1/functions/{name}/versions")
            assert r.status_code == 200, r.text
            versions = [v["version"] for v in r.json()["versions"]]
            assert sorted(versions) == list(range(1, latest + 1))
            assert r.json()["active_version"] == info["version"] == latest
            assert {v for n, v in acked if n == name} <= set(versions)
            # Every stored version is whole: activate it and run it.
            for v in versions:
                r = await c.post(f"/api/v1/functions/{name}/rollback", json={"version": v})
                assert r.status_code == 200, r.text
                r = await c.get(f"/fn/{name}")
                assert r.status_code == 200, (name, v, r.text)
                token = r.json()["token"]
                assert sent.get(token) == name, (name, v, token)
                assert acked.get((name, v), token) == token
                assert token not in seen_tokens
                seen_tokens.add(token)
                assert r.json()["pad"] == len(PAD)
        # The store still takes new versions after the crash.
        r = await c.put("/api/v1/functions/churn-a", json={"source": HELLO, "public": True})
        assert r.status_code in (200, 201), r.text
        assert (await c.get("/fn/churn-a")).json() == {"hello": "world"}
    await gw2.stop()
    assert _integrity(data_dir / "nsfaas.db") == "ok"
    assert _torn_blobs(data_dir / "blobs") == []


# -- 5. graceful shutdown --------------------------------------------------------------------


def _ours(path: Path, gateway_pid: int, seen: dict[int, int | None]) -> bool:
    """A per-jail cgroup of this gateway: one of its slots, or nsjail's own cgroup
    of a jail seen among its descendants. (Other programs on the machine, other
    test sessions included, have theirs: those are not this test's business.)"""
    if path.name.startswith("slot-"):
        return path.name.startswith(f"slot-{gateway_pid}-")
    return int(path.name.removeprefix("NSJAIL.")) in seen


async def test_sigterm_finishes_in_flight_and_leaves_nothing_behind(
    gateway_procs: Callable[..., GatewayProcess], cgroups_before: set[Path]
) -> None:
    gw = gateway_procs(short_tmp())
    await gw.start()
    watch = ProcessWatch(gw.pid)
    watch.start()
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
            await c.put(
                "/api/v1/functions/idle", json={"source": HELLO, "public": True}, headers=auth()
            )
            await c.put(
                "/api/v1/functions/slow", json={"source": SLEEPY, "public": True}, headers=auth()
            )
            assert (await c.get("/fn/idle")).status_code == 200  # leaves an idle warm worker
            in_flight = asyncio.create_task(c.get("/fn/slow"))
            await asyncio.sleep(0.4)
            assert not in_flight.done()
            gw.signal(signal.SIGTERM)

            async def refused() -> bool:
                try:
                    async with httpx.AsyncClient(base_url=gw.url, timeout=1) as fresh:
                        await fresh.get("/healthz")
                except httpx.TransportError:
                    return True
                return False

            # It stops accepting new connections while the old request still runs.
            assert await wait_for(refused, 3.0)
            assert not in_flight.done()
            r = await in_flight
            assert r.status_code == 200, r.text
            assert r.json() == {"slept": True}
        code = await gw.wait(30)
        assert code in (0, -signal.SIGTERM), gw.log_tail()
    finally:
        await watch.stop()
    assert len(watch.seen) >= 4, watch.seen  # nsjail + jail of both functions at least
    assert watch.survivors() == {}
    assert orphaned_jail_processes(gw.pid) == {}

    def leaked() -> set[Path]:
        fresh = jail_cgroups() - cgroups_before
        return {d for d in fresh if _ours(d, gw.pid, watch.seen)}

    assert await wait_for(lambda: not leaked(), 3.0), leaked()


# -- 6. the CLI against a live gateway --------------------------------------------------------


async def _cli(live: Live, *args: str) -> tuple[int, str, str]:
    exe = Path(sys.executable).with_name("nsfaas")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "gateway.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSFAAS_")}
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        "--url",
        live.url,
        "--key",
        live.key,
        *args,
        cwd=str(REPO),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_against_live_server(live: Live) -> None:
    code, out, err = await _cli(live, "deploy", "cli-hello", "functions/hello")
    assert (code, out.strip()) == (0, "deployed cli-hello version 1"), err
    code, out, err = await _cli(live, "deploy", "cli-hello", "functions/hello", "--env", "A=1")
    assert (code, out.strip()) == (0, "deployed cli-hello version 2"), err

    code, out, err = await _cli(live, "invoke", "cli-hello", "-X", "GET", "--path", "?name=cli")
    assert code == 0, err
    assert json.loads(out) == {"hello": "cli"}
    m = re.match(r"200 invocation (\w+)", err)
    assert m, err
    inv_id = m.group(1)

    code, out, err = await _cli(live, "ls")
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("cli-hello ")]
    assert line.split()[1:3] == ["v2", "private"]

    code, out, err = await _cli(live, "versions", "cli-hello")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert [x.split()[1] for x in lines if x.startswith("*")] == ["v2"]

    code, out, err = await _cli(live, "rollback", "cli-hello", "1")
    assert (code, out.strip()) == (0, "cli-hello now at version 1"), err
    code, out, err = await _cli(live, "versions", "cli-hello")
    assert [x.split()[1] for x in out.splitlines() if x.startswith("*")] == ["v1"]

    code, out, err = await _cli(live, "logs", "cli-hello")
    assert code == 0, err
    greeting = [x for x in out.splitlines() if " greeting " in x]
    assert greeting and inv_id[-8:] in greeting[0] and '"name": "cli"' in greeting[0], out

    code, out, err = await _cli(live, "logs", "cli-hello", "--json")
    assert code == 0, err
    lines_json = [json.loads(x) for x in out.splitlines()]
    assert any(x["message"] == "greeting" and x["invocation_id"] == inv_id for x in lines_json)

    code, out, err = await _cli(live, "invocations", "cli-hello")
    assert code == 0, err
    (row,) = out.splitlines()
    assert row.split()[1:4] == [inv_id, "ok", "200"]

    code, out, err = await _cli(live, "rm", "cli-hello")
    assert (code, out.strip()) == (0, "deleted cli-hello"), err
    code, out, err = await _cli(live, "ls")
    assert "cli-hello" not in out
    code, out, err = await _cli(live, "versions", "cli-hello")
    assert code == 1 and "error (404) function_not_found" in err
    code, out, err = await _cli(live, "invoke", "cli-hello")
    assert code == 1 and "404" in err


# -- 7. OpenAPI conformance --------------------------------------------------------------------


class OpenApi:
    """The served document; validates real responses against it."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.problems: list[str] = []
        self.hit: set[tuple[str, str]] = set()  # (path, method) answered 2xx
        Draft202012Validator.check_schema({"components": doc["components"]})

    def _validator(self, schema: dict[str, Any]) -> Draft202012Validator:
        return Draft202012Validator({**schema, "components": self.doc["components"]})

    def check(self, path: str, method: str, r: httpx.Response, what: str = "") -> None:
        """Status must be documented for the operation and the body must match it."""
        label = f"{method.upper()} {path} {what} -> {r.status_code}"
        op = self.doc["paths"][path][method]
        if r.status_code >= 500:
            self.problems.append(f"{label}: server error {r.text[:200]}")
            return
        responses = op["responses"]
        if str(r.status_code) not in responses:
            self.problems.append(f"{label}: status not documented ({sorted(responses)})")
            if r.status_code >= 400:
                self._match(label, r, {"$ref": "#/components/schemas/Error"})
            return
        if 200 <= r.status_code < 300:
            self.hit.add((path, method))
        content = responses[str(r.status_code)].get("content")
        if content is None:
            if r.content:
                self.problems.append(f"{label}: documented without a body, got {r.text[:100]}")
            return
        self._match(label, r, content["application/json"]["schema"])

    def _match(self, label: str, r: httpx.Response, schema: dict[str, Any]) -> None:
        if not r.headers.get("content-type", "").startswith("application/json"):
            self.problems.append(f"{label}: not JSON ({r.headers.get('content-type')})")
            return
        errors = sorted(self._validator(schema).iter_errors(r.json()), key=str)
        for e in errors[:3]:
            self.problems.append(f"{label}: {'/'.join(map(str, e.absolute_path))}: {e.message}")


async def test_openapi_conformance_of_real_responses(live: Live) -> None:
    async with live.client(headers=live.auth) as c:
        r = await c.get("/api/v1/openapi.json")
        assert r.status_code == 200
        api = OpenApi(r.json())
        F, FN = "/api/v1/functions", "/api/v1/functions/{name}"
        T, INV, INV1 = "/api/v1/tenants", "/api/v1/invocations", "/api/v1/invocations/{id}"
        VER, RB, LOGS = FN + "/versions", FN + "/rollback", FN + "/logs"

        api.check(T, "post", await c.post(T, json={"name": "conform"}))
        api.check(T, "post", await c.post(T, json={"name": "conform"}), "duplicate")
        api.check(T, "get", await c.get(T))
        src = "def handler(request, ctx):\n    print('line', request.query.get('n'))\n    return 'ok'\n"
        r = await c.put("/api/v1/functions/conf", json={"source": src, "routes": ["GET /conf"]})
        api.check(FN, "put", r, "new")
        assert r.status_code == 201
        api.check(FN, "put", await c.put("/api/v1/functions/conf", json={"source": src}), "again")
        raw = await c.put(
            "/api/v1/functions/conf?timeout_s=2&memory_mb=64&public=true",
            content=src.encode(),
            headers={"Content-Type": "text/x-python"},
        )
        api.check(FN, "put", raw, "raw")
        for n in range(3):
            assert (await c.get("/fn/conf", params={"n": n})).status_code == 200
        api.check(F, "get", await c.get(F))
        api.check(FN, "get", await c.get("/api/v1/functions/conf"))
        api.check(VER, "get", await c.get("/api/v1/functions/conf/versions"))
        api.check(RB, "post", await c.post("/api/v1/functions/conf/rollback", json={"version": 1}))
        r = await c.get("/api/v1/functions/conf/logs", params={"limit": 1})
        api.check(LOGS, "get", r, "page 1")
        assert r.json()["cursor"]
        r = await c.get("/api/v1/functions/conf/logs", params={"limit": 1, "cursor": r.json()["cursor"]})
        api.check(LOGS, "get", r, "page 2")
        api.check(LOGS, "get", await c.get("/api/v1/functions/conf/logs?level=info&q=line&since=1h"))
        r = await c.get(INV, params={"function": "conf", "limit": 2})
        api.check(INV, "get", r, "page 1")
        inv_id = r.json()["invocations"][0]["id"]
        r = await c.get(INV, params={"function": "conf", "limit": 2, "cursor": r.json()["cursor"]})
        api.check(INV, "get", r, "page 2")
        api.check(INV1, "get", await c.get(f"/api/v1/invocations/{inv_id}"))
        api.check(INV1, "get", await c.get("/api/v1/invocations/nope"), "unknown")
        for path, method, url in [
            (T, "get", T), (F, "get", F), (FN, "get", "/api/v1/functions/conf"),
            (LOGS, "get", "/api/v1/functions/conf/logs"), (INV, "get", INV),
        ]:
            api.check(path, method, await c.request(method, url, headers={"Authorization": ""}),
                      "no key")
        api.check(FN, "delete", await c.delete("/api/v1/functions/conf"))
        api.check(FN, "get", await c.get("/api/v1/functions/conf"), "deleted")
        api.check(FN, "delete", await c.delete("/api/v1/functions/conf"), "deleted")

        documented = {(p, m) for p, ops in api.doc["paths"].items() for m in ops if m != "parameters"}
        assert documented - api.hit == set(), "documented operations never answered 2xx"
        assert api.problems == [], "\n".join(api.problems)


BAD_NAMES = ["UPPER", "1abc", "a" * 200, "bad_name", "%2e%2e", "x%00y", "%C3%A9t%C3%A9", "-x"]
HUGE = 10**30
SUPERSCRIPT_TWO = "%C2%B2"  # "\u00b2": str.isdigit() says yes, int() says no


async def _malformed_inputs(live: Live) -> OpenApi:
    """Send malformed input to every documented operation; return the checker."""
    async with live.client(headers=live.auth) as c:
        api = OpenApi((await c.get("/api/v1/openapi.json")).json())
        F, FN = "/api/v1/functions", "/api/v1/functions/{name}"
        T, INV, INV1 = "/api/v1/tenants", "/api/v1/invocations", "/api/v1/invocations/{id}"
        VER, RB, LOGS = FN + "/versions", FN + "/rollback", FN + "/logs"
        await live.deploy(c, "target", HELLO)
        assert (await c.get("/fn/target")).status_code == 200

        async def send(path: str, method: str, url: str, what: str, **kw: Any) -> None:
            api.check(path, method, await c.request(method.upper(), url, **kw), what)

        for bad in BAD_NAMES:
            await send(FN, "get", f"{F}/{bad}", "bad name")
            await send(FN, "delete", f"{F}/{bad}", "bad name")
            await send(FN, "put", f"{F}/{bad}", "bad name", json={"source": HELLO})
            await send(VER, "get", f"{F}/{bad}/versions", "bad name")
            await send(RB, "post", f"{F}/{bad}/rollback", "bad name", json={"version": 1})
            await send(LOGS, "get", f"{F}/{bad}/logs", "bad name")
            await send(INV1, "get", f"{INV}/{bad}", "bad id")
        await send(INV1, "get", f"{INV}/{'z' * 5000}", "long id")

        json_ct = {"Content-Type": "application/json"}
        for body in [
            b"", b"{", b"null", b"[]", b'"x"', b"5", b'{"name": 5}', b'{"name": null}',
            b'{"name": "' + b"a" * 3000 + b'"}', b'{"name": "ok-name", "x": NaN}', b"\xff\xfe",
            b'{"name": "\\udcff"}',
        ]:
            await send(T, "post", T, f"body {body[:30]!r}", content=body, headers=json_ct)

        put_bodies: list[Any] = [
            None, [], "x", 5, {"source": 5}, {"archive": 5}, {"archive": "@@@"},
            {"source": HELLO, "timeout_s": 1e308}, {"source": HELLO, "timeout_s": HUGE},
            {"source": HELLO, "timeout_s": -1}, {"source": HELLO, "timeout_s": True},
            {"source": HELLO, "memory_mb": HUGE}, {"source": HELLO, "memory_mb": 64.5},
            {"source": HELLO, "memory_mb": "64"}, {"source": HELLO, "routes": [1]},
            {"source": HELLO, "routes": ["GET " + "/x" * 1000]},
            {"source": HELLO, "routes": {"GET /x": 1}}, {"source": HELLO, "env": []},
            {"source": HELLO, "env": {"A": 1}}, {"source": HELLO, "env": {"": "x"}},
            {"source": HELLO, "public": "yes"}, {"source": HELLO, "egress_allow": "x"},
            {"source": HELLO, "egress_allow": [5]}, {"source": HELLO, "entrypoint": 5},
            {"source": HELLO, "entrypoint": "../x:y"},
            {"source": HELLO, "entrypoint": "a" * 5000},
            {"source": "x" * 2_000_000}, {"source": "(" * 100_000},
            {"source": HELLO, "source2": 1},
        ]
        for body in put_bodies:
            await send(FN, "put", f"{F}/target", f"json {str(body)[:40]}", json=body)
        for raw in [
            b"", b"{", b"\xff", b'{"source": "x", "timeout_s": NaN}',
            b'{"source": "x", "timeout_s": Infinity}', b'{"source": "x"' + b" " * 100,
            b'{"source": "\\udcff"}', b'{"source": "def handler(r, c):\\n  return \\"\\ud800\\""}',
        ]:
            await send(FN, "put", f"{F}/target", f"raw {raw[:30]!r}", content=raw, headers=json_ct)
        for query in [
            "timeout_s=abc", "timeout_s=nan", "timeout_s=1e999", f"memory_mb={HUGE}",
            "memory_mb=-5", "public=maybe", "entrypoint=%00", "routes=BAD",
            f"memory_mb={SUPERSCRIPT_TWO}",
        ]:
            await send(FN, "put", f"{F}/target?{query}", f"raw ?{query}", content=b"x = (",
                       headers={"Content-Type": "text/x-python"})
        await send(FN, "put", f"{F}/target", "zip junk", content=b"PK\x03\x04junk",
                   headers={"Content-Type": "application/zip"})
        await send(FN, "put", f"{F}/target", "xml", content=b"<x/>",
                   headers={"Content-Type": "application/xml"})

        rollback_bodies: list[Any] = [
            None, [], {"version": "1"}, {"version": HUGE}, {"version": -HUGE}, {"version": 0},
            {"version": 1.5}, {"version": True}, {"version": None}, {"version": 99}, {"v": 1},
        ]
        for doc in rollback_bodies:
            await send(RB, "post", f"{F}/target/rollback", f"json {doc}", json=doc)
        for raw in [b"", b"{", b"\xff"]:
            await send(RB, "post", f"{F}/target/rollback", f"raw {raw!r}", content=raw,
                       headers=json_ct)
        for query in ["version=abc", "version=-1", "version=", f"version={HUGE}",
                      f"version={SUPERSCRIPT_TWO}"]:
            await send(RB, "post", f"{F}/target/rollback?{query}", f"?{query}")

        bad_queries = [
            "since=garbage", "since=2024-13-45T00:00:00Z", "since=2024-01-01T00:00:00",
            "since=1e400", "since=nan", "since=-inf", f"since={HUGE}", "since=99999999d",
            "until=garbage", "until=1e400", "limit=0", "limit=-1", "limit=abc", "limit=1.5",
            f"limit={HUGE}", f"limit={SUPERSCRIPT_TWO}", "cursor=garbage", "cursor=",
            "cursor=%00%ff", "cursor=eyJ0cyI6IDF9", "cursor=" + "A" * 5000,
        ]
        log_queries = [
            *bad_queries, "level=bogus", "level=", 'q="', "q=NEAR(", "q=*", "q=a%20OR",
            "q=" + "%25" * 2000, "q=%00", "invocation=" + "z" * 3000, 'q=")(', "q=-", "q=^x",
        ]
        for query in log_queries:
            await send(LOGS, "get", f"{F}/target/logs?{query}", f"?{query[:40]}")
        for query in [*bad_queries, "function=BAD", "function=" + "f" * 3000, "outcome=bogus"]:
            await send(INV, "get", f"{INV}?{query}", f"?{query[:40]}")

        # A wrong key, and the wrong scheme, on every operation.
        for path, method, url in [
            (T, "post", T), (T, "get", T), (F, "get", F), (FN, "put", f"{F}/target"),
            (FN, "get", f"{F}/target"), (FN, "delete", f"{F}/target"),
            (VER, "get", f"{F}/target/versions"), (RB, "post", f"{F}/target/rollback"),
            (LOGS, "get", f"{F}/target/logs"), (INV, "get", INV), (INV1, "get", f"{INV}/x"),
        ]:
            await send(path, method, url, "wrong key", headers={"Authorization": "Bearer nope"})
            await send(path, method, url, "basic auth", headers={"Authorization": "Basic eDp5"})

        # After all that, the gateway is fine and the function untouched.
        r = await c.get("/fn/target")
        assert r.status_code == 200 and r.json() == {"hello": "world"}
    return api


async def test_openapi_malformed_inputs_never_5xx(live: Live) -> None:
    """No 5xx, and every error body is the documented Error shape."""
    api = await _malformed_inputs(live)
    problems = [p for p in api.problems if "status not documented" not in p]
    assert problems == [], "\n".join(problems)


async def test_openapi_documents_every_status_answered(live: Live) -> None:
    api = await _malformed_inputs(live)
    assert api.problems == [], "\n".join(api.problems)


@pytest.mark.parametrize(
    ("body", "query"),
    [({"version": HUGE}, ""), (None, f"?version={HUGE}"), (None, f"?version={SUPERSCRIPT_TWO}")],
    ids=["json-huge", "query-huge", "query-superscript"],
)
async def test_rollback_with_unusable_version_is_4xx(
    live: Live, body: Any, query: str
) -> None:
    async with live.client(headers=live.auth) as c:
        await live.deploy(c, "target", HELLO)
        r = await c.post(f"/api/v1/functions/target/rollback{query}", json=body)
        assert 400 <= r.status_code < 500, r.text
        assert r.json()["error"]["code"] in ("invalid_version", "version_not_found")
