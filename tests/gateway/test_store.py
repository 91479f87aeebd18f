"""The embedded store against real SQLite files in tmp_path."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gateway._sqlite import SqliteStore
from gateway.store import (
    Conflict,
    FunctionConfig,
    InvocationRecord,
    LogLine,
    NewLogLine,
    NotFound,
    QuotaExceeded,
    StoreError,
    open_store,
    parse_route,
)

ROOT = Path(__file__).resolve().parents[2]
BIG = 10**9  # a quota that never binds


def config(*routes: str, timeout_s: float = 5.0) -> FunctionConfig:
    return FunctionConfig(
        routes=routes,
        timeout_s=timeout_s,
        memory_mb=128,
        env=(("GREETING", "hi"),),
        public=False,
        egress_allow=("api.example.com",),
        entrypoint="handler:handler",
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "data") as s:
        yield s


@pytest.fixture(params=[True, False], ids=["fts", "substring"])
async def log_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore(tmp_path / "data", fts=request.param) as s:
        assert s.fts is request.param
        yield s


async def deploy(
    store: SqliteStore, tenant: str, name: str, *routes: str, code: bytes = b"x"
) -> int:
    digest = await store.put_blob(code)
    fv, _ = await store.put_function(tenant, name, digest, len(code), config(*routes))
    return fv.version


async def route_set(store: SqliteStore) -> set[tuple[str, str, str]]:
    return {(r.method, r.path, r.name) for r in await store.all_routes()}


# -- lifecycle ----------------------------------------------------------------------------


async def test_reopen_keeps_data_and_records_schema_version(tmp_path: Path) -> None:
    async with open_store(tmp_path) as s:
        tenant, key = await s.create_tenant("acme")
    async with open_store(tmp_path) as s:
        assert await s.tenant_for_key(key) == tenant
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        assert db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] >= 1


async def test_the_database_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """They hold every tenant's KV values, env secrets and logs: with a data dir
    others may traverse (a jail dir inside it), 0644 let any local uid, the
    jails' outside uids included, read them."""
    os.chmod(tmp_path, 0o755)  # noqa: S103 (the layout under test)
    os.close(os.open(tmp_path / "nsfaas.db-wal", os.O_CREAT | os.O_WRONLY, 0o644))  # older run
    old = os.umask(0o022)
    try:
        async with open_store(tmp_path) as s:
            await s.create_tenant("acme")
            files = sorted(n for n in os.listdir(tmp_path) if n.startswith("nsfaas.db"))
            assert files == ["nsfaas.db", "nsfaas.db-shm", "nsfaas.db-wal"]
            for name in files:
                assert os.stat(tmp_path / name).st_mode & 0o777 == 0o600, name
    finally:
        os.umask(old)


async def test_closed_store_refuses_work(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path)
    await s.open()
    with pytest.raises(StoreError) as exc:
        await s.open()
    assert exc.value.code == "store_open"
    await s.aclose()
    await s.aclose()  # idempotent
    with pytest.raises(StoreError) as exc:
        await s.list_tenants()
    assert exc.value.code == "store_closed"


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path):
        pass
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        db.execute("INSERT INTO schema_migrations VALUES (999, 0)")
    with pytest.raises(StoreError) as exc:
        await open_store(tmp_path).open()
    assert exc.value.code == "schema_too_new"


async def test_search_index_is_rebuilt_when_it_was_missing(tmp_path: Path) -> None:
    async with open_store(tmp_path) as s:
        await s.append_logs([line(1.0, "indexed needle")])
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:  # as left by a SQLite without FTS5
        db.execute("INSERT INTO logs_fts (logs_fts) VALUES ('delete-all')")
    async with SqliteStore(tmp_path, fts=False) as s:  # drops the trigger: the index is stale
        await s.append_logs([line(2.0, "unindexed needle")])
    async with SqliteStore(tmp_path) as s:
        assert s.fts
        found, _ = await s.query_logs(q="needle")
        assert [x.message for x in found] == ["unindexed needle", "indexed needle"]


async def test_a_store_with_the_old_per_row_index_trigger_indexes_each_line_once(
    tmp_path: Path,
) -> None:
    """Lines are indexed by one INSERT ... SELECT per batch (a per-row trigger cost twice
    as much); a database from before has that trigger, which is dropped at open, or every
    line would be indexed twice."""
    async with open_store(tmp_path) as s:
        await s.append_logs([line(1.0, "first needle")])
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        db.execute(
            """CREATE TRIGGER logs_fts_insert AFTER INSERT ON logs BEGIN
                INSERT INTO logs_fts (rowid, message, scope)
                VALUES (new.id, new.message, 's' || new.scope_id);
            END"""
        )
    async with open_store(tmp_path) as s:
        await s.append_logs([line(2.0, "second needle"), line(3.0, "third needle")])
        found, _ = await s.query_logs(q="needle")
        assert [x.message for x in found] == ["third needle", "second needle", "first needle"]
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        triggers = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
        assert "logs_fts_insert" not in triggers and "logs_fts_delete" in triggers
        # one index entry per line: the index's row count of the word is the line count
        (hits,) = db.execute(
            "SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'needle'"
        ).fetchone()
        assert hits == 3


async def test_limits_must_be_positive(store: SqliteStore) -> None:
    with pytest.raises(ValueError, match="limit"):
        await store.query_logs(limit=0)
    with pytest.raises(ValueError, match="limit"):
        await store.list_invocations(limit=-1)
    with pytest.raises(ValueError, match="limit"):
        await store.kv_list("t", "", limit=-1)


# -- blobs --------------------------------------------------------------------------------


async def test_blob_round_trip_is_content_addressed_and_idempotent(store: SqliteStore) -> None:
    data = os.urandom(100_000)
    digest = await store.put_blob(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = store.blob_path(digest)
    assert path.parent.name == digest[:2] and path.name == digest
    assert await store.put_blob(data) == digest
    assert await store.read_blob(digest) == data
    assert [p.name for p in path.parent.iterdir()] == [digest]  # no temp files left
    assert path.stat().st_mode & 0o777 == 0o444


async def test_blob_errors(store: SqliteStore) -> None:
    with pytest.raises(NotFound):
        await store.read_blob("0" * 64)
    with pytest.raises(ValueError, match="digest"):
        store.blob_path("../../etc/passwd")
    digest = await store.put_blob(b"original")
    path = store.blob_path(digest)
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    with pytest.raises(StoreError) as exc:
        await store.read_blob(digest)
    assert exc.value.code == "blob_corrupt"


# -- tenants ------------------------------------------------------------------------------


def database_bytes(data_dir: Path) -> bytes:
    """The database file and its WAL, raw."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("nsfaas.db*")))


async def test_tenant_key_is_stored_only_as_its_hash(tmp_path: Path) -> None:
    async with open_store(tmp_path) as s:
        tenant, key = await s.create_tenant("acme")
        assert key.startswith("nsf_") and len(key) > 40
        assert await s.tenant_for_key(key) == tenant
        assert await s.tenant_for_key(key + "x") is None
        assert await s.tenant_for_key("") is None
        assert await s.get_tenant(tenant.id) == tenant
        assert await s.list_tenants() == [tenant]
        with pytest.raises(Conflict) as exc:
            await s.create_tenant("acme")
        assert exc.value.code == "tenant_exists"
        with pytest.raises(NotFound):
            await s.get_tenant("t_nope")
        on_disk = database_bytes(tmp_path)
        assert key.encode() not in on_disk
        assert key.encode()[4:] not in on_disk
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        rows = db.execute("SELECT * FROM tenants").fetchall()
    assert not any(key in str(v) or key[4:] in str(v) for v in rows[0])
    assert hashlib.sha256(key.encode()).hexdigest() in rows[0]


# -- functions, versions, routes ----------------------------------------------------------


async def test_versions_increment_and_are_never_reused(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    digest = await store.put_blob(b"v1")
    fv, created = await store.put_function(t.id, "f", digest, 2, config())
    assert (fv.version, created) == (1, True)
    assert [await deploy(store, t.id, "f") for _ in range(2)] == [2, 3]
    await store.rollback(t.id, "f", 1)
    assert await deploy(store, t.id, "f") == 4
    info = await store.get_function(t.id, "f")
    assert (info.active_version, info.latest_version) == (4, 4)
    assert [v.version for v in await store.list_versions(t.id, "f")] == [1, 2, 3, 4]
    assert digest in await store.delete_function(t.id, "f")  # its blob went with it
    digest = await store.put_blob(b"v1")
    fv, created = await store.put_function(t.id, "f", digest, 2, config())
    assert (fv.version, created) == (5, True)  # even a deleted function's numbers stay used


async def test_version_keeps_digest_size_and_config(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    digest = await store.put_blob(b"code")
    cfg = config("GET /a/{x}", timeout_s=2.5)
    await store.put_function(t.id, "f", digest, 4, cfg)
    fv = await store.get_version(t.id, "f")
    assert (fv.digest, fv.size, fv.config, fv.version) == (digest, 4, cfg, 1)
    assert FunctionConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="memory_mb"):
        FunctionConfig.from_json({**cfg.to_json(), "memory_mb": "big"})
    with pytest.raises(NotFound) as exc:
        await store.get_version(t.id, "f", 9)
    assert exc.value.code == "version_not_found"


async def test_rollback_changes_active_version_and_routes(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    await deploy(store, t.id, "f", "GET /a")
    await deploy(store, t.id, "f", "GET /b", "POST /b")
    assert await route_set(store) == {("GET", "/b", "f"), ("POST", "/b", "f")}
    fv = await store.rollback(t.id, "f", 1)
    assert fv.version == 1
    assert (await store.get_function(t.id, "f")).active_version == 1
    assert (await store.get_version(t.id, "f", None)).version == 1
    assert await route_set(store) == {("GET", "/a", "f")}
    with pytest.raises(NotFound):
        await store.rollback(t.id, "f", 7)


@pytest.mark.parametrize(
    ("taken", "wanted"),
    [
        ("GET /users/{id}", "GET /users/{name}"),
        ("ANY /hook", "POST /hook"),
        ("GET /hook", "ANY /hook"),
        ("GET /files/{p:path}", "GET /files/{rest:path}"),
        ("get /same", "GET /same"),
    ],
)
async def test_route_conflict_writes_nothing(store: SqliteStore, taken: str, wanted: str) -> None:
    a, _ = await store.create_tenant("a")
    b, _ = await store.create_tenant("b")
    await deploy(store, a.id, "owner", taken)
    await deploy(store, b.id, "other", "GET /free")
    before = await route_set(store)
    for tenant, name in ((b.id, "other"), (b.id, "newfn"), (a.id, "sibling")):
        with pytest.raises(Conflict) as exc:
            await deploy(store, tenant, name, "GET /fine", wanted)
        assert exc.value.code == "route_conflict"
        assert "taken" in exc.value.message
        assert ("'owner'" in exc.value.message) is (tenant == a.id)  # named to its tenant only
    assert await route_set(store) == before
    info = await store.get_function(b.id, "other")
    assert (info.active_version, info.latest_version) == (1, 1)
    with pytest.raises(NotFound):
        await store.get_function(b.id, "newfn")
    assert await deploy(store, b.id, "other") == 2  # the refused put used no number


@pytest.mark.parametrize(
    ("taken", "wanted"),
    [("GET /x", "POST /x"), ("GET /users/{id}", "GET /users/me"), ("GET /a/{x}", "GET /a/{x}/b")],
)
async def test_routes_that_do_not_collide(store: SqliteStore, taken: str, wanted: str) -> None:
    t, _ = await store.create_tenant("acme")
    await deploy(store, t.id, "f", taken)
    await deploy(store, t.id, "g", wanted)
    assert len(await store.all_routes()) == 2


async def test_function_may_redeclare_its_own_routes(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    await deploy(store, t.id, "f", "GET /a/{x}", "ANY /hook")
    await deploy(store, t.id, "f", "GET /a/{y}", "POST /hook", "GET /a/{z}")
    assert await route_set(store) == {
        ("GET", "/a/{y}", "f"),
        ("GET", "/a/{z}", "f"),
        ("POST", "/hook", "f"),
    }


async def test_rollback_refuses_routes_taken_since(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    await deploy(store, t.id, "f", "GET /a")
    await deploy(store, t.id, "f", "GET /b")
    await deploy(store, t.id, "g", "ANY /a")
    with pytest.raises(Conflict):
        await store.rollback(t.id, "f", 1)
    assert (await store.get_function(t.id, "f")).active_version == 2
    assert ("GET", "/b", "f") in await route_set(store)


async def test_delete_removes_function_versions_and_routes_but_not_kv(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    await deploy(store, t.id, "f", "GET /a")
    await deploy(store, t.id, "keep", "GET /k")
    await store.kv_put(t.id, "k", b"v", max_bytes=BIG, max_keys=BIG)
    await store.delete_function(t.id, "f")
    with pytest.raises(NotFound):
        await store.get_function(t.id, "f")
    with pytest.raises(NotFound):
        await store.list_versions(t.id, "f")
    with pytest.raises(NotFound):
        await store.delete_function(t.id, "f")
    assert await route_set(store) == {("GET", "/k", "keep")}
    assert [f.name for f in await store.list_functions(t.id)] == ["keep"]
    assert await store.kv_get(t.id, "k") == b"v"
    await deploy(store, t.id, "g", "GET /a")  # the route is free again


async def test_put_function_needs_tenant_blob_and_valid_routes(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("acme")
    digest = await store.put_blob(b"x")
    with pytest.raises(NotFound):
        await store.put_function("t_missing", "f", digest, 1, config())
    with pytest.raises(NotFound):
        await store.put_function(t.id, "f", "a" * 64, 1, config())
    with pytest.raises(ValueError, match="reserved"):
        await store.put_function(t.id, "f", digest, 1, config("GET /api/v1/x"))
    assert await store.list_functions(None) == []


async def test_list_functions_per_tenant_and_all(store: SqliteStore) -> None:
    a, _ = await store.create_tenant("a")
    b, _ = await store.create_tenant("b")
    await deploy(store, a.id, "f")
    await deploy(store, b.id, "g")
    await deploy(store, b.id, "e")
    assert [(f.tenant_id, f.name) for f in await store.list_functions(b.id)] == [
        (b.id, "e"),
        (b.id, "g"),
    ]
    assert len(await store.list_functions()) == 3
    assert await store.find_function("f") == await store.get_function(a.id, "f")
    assert await store.find_function("nope") is None


async def test_function_names_are_global(store: SqliteStore) -> None:
    a, _ = await store.create_tenant("a")
    b, _ = await store.create_tenant("b")
    await deploy(store, a.id, "hello")
    with pytest.raises(Conflict) as exc:
        await deploy(store, b.id, "hello")
    assert exc.value.code == "name_taken"
    assert [f.tenant_id for f in await store.list_functions()] == [a.id]


@pytest.mark.parametrize(
    ("route", "parsed"),
    [
        ("GET /users/{id}", ("GET", "/users/{id}")),
        ("any /hook", ("ANY", "/hook")),
        ("  POST   /a/b-c_d.e~f  ", ("POST", "/a/b-c_d.e~f")),
        ("GET /files/{rest:path}", ("GET", "/files/{rest:path}")),
        ("GET /", ("GET", "/")),
        ("GET /apis", ("GET", "/apis")),
        ("OPTIONS /fnord", ("OPTIONS", "/fnord")),
    ],
)
def test_parse_route_accepts(route: str, parsed: tuple[str, str]) -> None:
    assert parse_route(route) == parsed


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        ("/users", "METHOD /path"),
        ("GET /a extra", "METHOD /path"),
        ("FETCH /a", "method"),
        ("GET users", "start with '/'"),
        ("GET /api/v1/functions", "reserved"),
        ("GET /api", "reserved"),
        ("GET /fn/hello", "reserved"),
        ("GET /healthz", "reserved"),
        ("GET /metrics/x", "reserved"),
        ("GET /a//b", "empty"),
        ("GET /a/", "empty"),
        ("GET /a/../b", "invalid"),
        ("GET /a/{x", "invalid"),
        ("GET /a{x}", "invalid"),
        ("GET /a/{x}/{x}", "twice"),
        ("GET /a/{p:path}/b", "last"),
        ("GET /a?b=1", "invalid"),
        ("GET /p/a%20b", "invalid"),  # routes match decoded paths: it could never match
        ("GET /%75sers/me", "invalid"),
        ("GET /" + "a" * 600, "longer"),
    ],
)
def test_parse_route_rejects(route: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_route(route)


# -- KV -----------------------------------------------------------------------------------

HOSTILE_KEYS = [
    "..",
    "../x",
    "/",
    "a/../../b",
    "\x00",
    "a\x00b",
    "a\x00c",
    "%",
    "_",
    "\\",
    "ü",
    "😀",
    "",
    "k" * 10_240,
]


async def test_kv_hostile_keys_stay_inside_their_tenant(store: SqliteStore) -> None:
    a, _ = await store.create_tenant("a")
    b, _ = await store.create_tenant("b")
    for i, key in enumerate(HOSTILE_KEYS):
        await store.kv_put(a.id, key, f"a{i}".encode(), max_bytes=BIG, max_keys=BIG)
    for key in HOSTILE_KEYS:
        assert await store.kv_get(b.id, key) is None
    assert await store.kv_list(b.id, "", limit=1000) == []
    assert await store.kv_usage(b.id) == (0, 0)
    for i, key in enumerate(HOSTILE_KEYS):
        await store.kv_put(b.id, key, f"b{i}".encode(), max_bytes=BIG, max_keys=BIG)
    for i, key in enumerate(HOSTILE_KEYS):
        assert await store.kv_get(a.id, key) == f"a{i}".encode()
        assert await store.kv_get(b.id, key) == f"b{i}".encode()
    assert await store.kv_list(a.id, "", limit=1000) == sorted(HOSTILE_KEYS)
    assert await store.kv_delete(b.id, "a\x00b")
    assert await store.kv_get(a.id, "a\x00b") == b"a5"
    expected_bytes = sum(len(k.encode()) + len(f"a{i}") for i, k in enumerate(HOSTILE_KEYS))
    assert await store.kv_usage(a.id) == (expected_bytes, len(HOSTILE_KEYS))


async def test_kv_list_is_an_exact_prefix_match(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("t")
    keys = ["a%b", "a_b", "aXb", "a\\b", "ab", "a%", "b", "a", "\U0010ffff", "\U0010ffffz"]
    for key in keys:
        await store.kv_put(t.id, key, b"", max_bytes=BIG, max_keys=BIG)
    assert await store.kv_list(t.id, "a%") == ["a%", "a%b"]
    assert await store.kv_list(t.id, "a_") == ["a_b"]
    assert await store.kv_list(t.id, "a\\") == ["a\\b"]
    assert await store.kv_list(t.id, "%") == []
    assert await store.kv_list(t.id, "\U0010ffff") == ["\U0010ffff", "\U0010ffffz"]
    assert await store.kv_list(t.id, "") == sorted(keys)
    assert await store.kv_list(t.id, "a", limit=2) == ["a", "a%"]
    assert await store.kv_list(t.id, "a", limit=2, after="a%") == ["a%b", "aXb"]
    assert await store.kv_get(t.id, "ab") == b""


async def test_kv_quota_exceeded_writes_nothing(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("t")
    await store.kv_put(t.id, "k", b"12345", max_bytes=10, max_keys=2)
    assert await store.kv_usage(t.id) == (6, 1)
    with pytest.raises(QuotaExceeded) as exc:
        await store.kv_put(t.id, "k", b"1234567890", max_bytes=10, max_keys=2)
    assert exc.value.code == "kv_quota_exceeded"
    with pytest.raises(QuotaExceeded):
        await store.kv_put(t.id, "other", b"1234", max_bytes=10, max_keys=2)
    with pytest.raises(QuotaExceeded):
        await store.kv_incr(t.id, "n", 1, max_bytes=BIG, max_keys=1)
    assert await store.kv_get(t.id, "k") == b"12345"
    assert await store.kv_get(t.id, "other") is None
    assert await store.kv_usage(t.id) == (6, 1)
    # A write that does not grow usage passes even over a lowered quota.
    await store.kv_put(t.id, "k", b"1", max_bytes=1, max_keys=1)
    assert await store.kv_usage(t.id) == (2, 1)
    assert await store.kv_delete(t.id, "k")
    assert not await store.kv_delete(t.id, "k")
    assert await store.kv_usage(t.id) == (0, 0)


async def test_100_concurrent_incr_give_an_exact_count(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("t")
    results = await asyncio.gather(
        *(store.kv_incr(t.id, "hits", 1, max_bytes=BIG, max_keys=BIG) for _ in range(100))
    )
    assert sorted(results) == list(range(1, 101))
    assert await store.kv_get(t.id, "hits") == b"100"
    assert await store.kv_incr(t.id, "hits", -150, max_bytes=BIG, max_keys=BIG) == -50


@pytest.mark.parametrize("value", [b"abc", b" 1", b"1_000", b"+1", b"1.5", b"", b"9" * 30])
async def test_incr_of_a_non_integer_conflicts(store: SqliteStore, value: bytes) -> None:
    t, _ = await store.create_tenant("t")
    await store.kv_put(t.id, "k", value, max_bytes=BIG, max_keys=BIG)
    with pytest.raises(Conflict) as exc:
        await store.kv_incr(t.id, "k", 1, max_bytes=BIG, max_keys=BIG)
    assert exc.value.code == "not_an_integer"
    assert await store.kv_get(t.id, "k") == value


async def test_incr_stays_in_64_bits(store: SqliteStore) -> None:
    t, _ = await store.create_tenant("t")
    await store.kv_put(t.id, "k", str(2**63 - 1).encode(), max_bytes=BIG, max_keys=BIG)
    with pytest.raises(Conflict) as exc:
        await store.kv_incr(t.id, "k", 1, max_bytes=BIG, max_keys=BIG)
    assert exc.value.code == "integer_overflow"


# -- invocation records -------------------------------------------------------------------


def invocation(ident: str, started_at: float, **kw: object) -> InvocationRecord:
    base = InvocationRecord(
        id=ident,
        tenant_id="t1",
        function="f",
        version=1,
        trigger="http",
        method="GET",
        path="/",
        started_at=started_at,
        timeout_s=5.0,
        memory_mb=128,
        request_bytes=10,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


async def test_records_written_alone_are_durable_and_the_wal_stays_bounded(
    tmp_path: Path,
) -> None:
    """A finish written inline (nothing else running) is as durable as a batched
    one, and the WAL is checkpointed by the store (SQLite's automatic checkpoint
    is off) so it does not grow with the number of writes."""
    from gateway._sqlite import CHECKPOINT_EVERY

    data = tmp_path / "data"
    wal = data / "nsfaas.db-wal"
    sizes = []
    async with SqliteStore(data) as s:
        for i in range(CHECKPOINT_EVERY * 10):
            rec = replace(invocation(f"inv{i}", 1000.0 + i), outcome="ok", status=200)
            line = NewLogLine(
                ts=1000.0 + i,
                invocation_id=rec.id,
                tenant_id="t1",
                function="f",
                level="info",
                message=f"line {i}",
            )
            writes = s.writes
            await s.finish_invocation(rec, [line], alone=True)
            assert s.writes == writes + 1
            if i in (CHECKPOINT_EVERY * 2, CHECKPOINT_EVERY * 10 - 1):
                await asyncio.sleep(0.05)  # the checkpoint runs in the writer thread
                sizes.append(wal.stat().st_size)
        assert (await s.get_invocation("inv7")).outcome == "ok"
    assert sizes[1] < 2 * sizes[0], sizes  # reused from the start after each checkpoint
    async with SqliteStore(data) as s:  # reopened: everything is there
        last = CHECKPOINT_EVERY * 10 - 1
        assert (await s.get_invocation(f"inv{last}")).status == 200
        lines, _ = await s.query_logs(invocation_id=f"inv{last}")
        assert [x.message for x in lines] == [f"line {last}"]


async def test_concurrent_finishes_commit_together_on_the_loop(tmp_path: Path) -> None:
    """Finishes that arrive in one turn of the event loop, while the writer thread
    is idle, are written in one transaction on the loop's thread (no thread
    hand-off); one that arrives while the writer thread is busy goes with its
    next batch. Every record and line is there after a reopen."""
    data = tmp_path / "data"
    loop_thread = threading.get_ident()
    threads: set[int] = set()
    async with SqliteStore(data) as s:
        import gateway._sqlite_records as records_mod

        real = records_mod.finish_invocation

        def spy(c: Any, rec: InvocationRecord) -> None:
            threads.add(threading.get_ident())
            real(c, rec)

        records_mod.finish_invocation = spy  # type: ignore[assignment]
        try:
            recs = [
                replace(invocation(f"inv{i}", 1000.0 + i), outcome="ok", status=200)
                for i in range(8)
            ]
            lines = [
                NewLogLine(
                    ts=1000.0 + i,
                    invocation_id=r.id,
                    tenant_id="t1",
                    function="f",
                    level="info",
                    message=f"line {i}",
                )
                for i, r in enumerate(recs)
            ]
            commits = s._commits
            await asyncio.gather(
                *(s.finish_invocation(r, [x]) for r, x in zip(recs, lines, strict=True))
            )
            assert threads == {loop_thread}
            assert s._commits == commits + 1  # one transaction for all eight
            # The writer thread busy with a bulk write: a finish meanwhile waits for it.
            threads.clear()
            bulk = [
                replace(lines[0], invocation_id="bulk", message=f"bulk {i}") for i in range(500)
            ]
            busy = asyncio.create_task(s.append_logs(bulk))
            await asyncio.sleep(0)
            late = replace(invocation("late", 2000.0), outcome="error", status=500)
            await s.finish_invocation(late)
            await busy
            assert threads and loop_thread not in threads
        finally:
            records_mod.finish_invocation = real
    async with SqliteStore(data) as s:
        for i in range(8):
            assert (await s.get_invocation(f"inv{i}")).status == 200
            got, _ = await s.query_logs(invocation_id=f"inv{i}")
            assert [x.message for x in got] == [f"line {i}"]
        assert (await s.get_invocation("late")).outcome == "error"


async def test_invocation_insert_finish_get(store: SqliteStore) -> None:
    rec = invocation("inv1", 1000.0)
    await store.insert_invocation(rec)
    assert await store.get_invocation("inv1") == rec
    done = replace(
        rec,
        status=200,
        outcome="ok",
        wall_ms=12.5,
        cpu_ms=3.25,
        peak_memory_mb=20.0,
        start="warm",
        response_bytes=42,
        log_lines=3,
        logs_truncated=True,
        error_type="E",
        error_message="m",
        limit_name="memory",
        limit_value=128.0,
    )
    await store.finish_invocation(done)
    assert await store.get_invocation("inv1") == done
    await store.insert_invocation(rec)  # a late start never overwrites the finish
    assert await store.get_invocation("inv1") == done
    with pytest.raises(NotFound):
        await store.get_invocation("nope")


async def test_finish_replaces_a_queued_start_and_writes_its_logs(store: SqliteStore) -> None:
    """Under load the start and the finish of a short invocation meet in the
    writer's queue: the finish (record and log lines in one write) replaces it."""
    rec = invocation("inv-q", 1000.0)
    done = replace(rec, status=200, outcome="ok", wall_ms=1.0, log_lines=1)
    line = NewLogLine(
        ts=1000.5,
        invocation_id="inv-q",
        tenant_id=rec.tenant_id,
        function=rec.function,
        level="info",
        message="hello from the queue",
        fields={},
    )
    started = asyncio.ensure_future(store.insert_invocation(rec))
    await asyncio.sleep(0)  # the start is queued, not yet written
    await store.finish_invocation(done, [line])
    await started
    assert await store.get_invocation("inv-q") == done
    got, _ = await store.query_logs(invocation_id="inv-q")
    assert [g.message for g in got] == ["hello from the queue"]


async def test_list_invocations_pages_newest_first_with_filters(store: SqliteStore) -> None:
    recs = []
    for i in range(40):
        rec = invocation(
            f"inv{i:02d}",
            1000.0 + i // 3,  # ties in started_at are ordered by id
            tenant_id=f"t{i % 2}",
            function=f"f{i % 4}",
            outcome="ok" if i % 5 else "error",
        )
        recs.append(rec)
        await store.insert_invocation(rec)
    newest_first = sorted(recs, key=lambda r: (r.started_at, r.id), reverse=True)

    async def all_pages(**filters: object) -> list[InvocationRecord]:
        got: list[InvocationRecord] = []
        cursor = None
        while True:
            page, cursor = await store.list_invocations(limit=7, cursor=cursor, **filters)  # type: ignore[arg-type]
            got += page
            if cursor is None:
                return got

    assert await all_pages() == newest_first
    assert await all_pages(tenant_id="t1") == [r for r in newest_first if r.tenant_id == "t1"]
    assert await all_pages(tenant_id="t0", function="f2") == [
        r for r in newest_first if (r.tenant_id, r.function) == ("t0", "f2")
    ]
    assert await all_pages(tenant_id="t0", function="f0", outcome="error") == [
        r for r in newest_first if (r.tenant_id, r.function, r.outcome) == ("t0", "f0", "error")
    ]
    assert await all_pages(function="f1") == [r for r in newest_first if r.function == "f1"]
    assert await all_pages(since=1003.0, until=1005.0) == [
        r for r in newest_first if 1003.0 <= r.started_at < 1005.0
    ]
    page, cursor = await store.list_invocations(limit=40)
    assert len(page) == 40 and cursor is None
    with pytest.raises(ValueError, match="cursor"):
        await store.list_invocations(cursor="garbage")


# -- log lines ----------------------------------------------------------------------------


def line(
    ts: float,
    message: str,
    *,
    tenant: str = "t1",
    function: str = "f",
    level: str = "info",
    inv: str | None = "inv1",
) -> NewLogLine:
    return NewLogLine(ts, inv, tenant, function, level, message, {"n": ts})


async def all_log_pages(store: SqliteStore, limit: int, **filters: object) -> list[LogLine]:
    got: list[LogLine] = []
    cursor = None
    while True:
        page, cursor = await store.query_logs(limit=limit, cursor=cursor, **filters)  # type: ignore[arg-type]
        assert len(page) <= limit
        got += page
        if cursor is None:
            return got


async def test_logs_append_and_query_with_filters(log_store: SqliteStore) -> None:
    s = log_store
    await s.append_logs(
        [
            line(100.0, "Cache miss for user 7", level="debug"),
            line(101.0, "payment ACCEPTED order=12", inv="inv2"),
            line(102.0, "payment declined: card_expired", level="warning", inv="inv2"),
            line(103.0, "upstream timeout after 30s", level="error"),
            line(104.0, "shutdown", level="critical"),
            line(105.0, "payment accepted", function="g"),
            line(106.0, "payment accepted", tenant="t2"),
        ]
    )
    page, cursor = await s.query_logs(tenant_id="t1", function="f")
    assert [x.ts for x in page] == [104.0, 103.0, 102.0, 101.0, 100.0] and cursor is None
    assert page[0].fields == {"n": 104.0} and page[0].level == "critical"
    assert (page[0].tenant_id, page[0].function) == ("t1", "f")

    async def messages(**filters: object) -> list[str]:
        return [x.message for x in (await s.query_logs(**filters))[0]]  # type: ignore[arg-type]

    assert await messages(tenant_id="t1", function="f", level_min="warning") == [
        "shutdown",
        "upstream timeout after 30s",
        "payment declined: card_expired",
    ]
    assert await messages(tenant_id="t1", function="f", since=101.0, until=103.0) == [
        "payment declined: card_expired",
        "payment ACCEPTED order=12",
    ]
    assert await messages(tenant_id="t1", function="f", q="accepted payment") == [
        "payment ACCEPTED order=12"
    ]
    assert await messages(tenant_id="t1", function="f", q="timeout") == [
        "upstream timeout after 30s"
    ]
    assert await messages(tenant_id="t1", function="f", q="order=12") == [
        "payment ACCEPTED order=12"
    ]
    assert await messages(tenant_id="t1", q="accepted") == [
        "payment accepted",
        "payment ACCEPTED order=12",
    ]
    assert len(await messages(q="accepted")) == 3
    assert await messages(tenant_id="t2", function="f") == ["payment accepted"]
    assert await messages(invocation_id="inv2") == [
        "payment declined: card_expired",
        "payment ACCEPTED order=12",
    ]
    assert await messages(invocation_id="inv2", q="declined", tenant_id="t1") == [
        "payment declined: card_expired"
    ]
    assert await messages(invocation_id="inv2", tenant_id="t2") == []
    assert await messages(tenant_id="t1", function="nope") == []
    assert await messages(tenant_id="t1", q='" OR NEAR( AND * :') == []
    with pytest.raises(ValueError, match="level"):
        await s.query_logs(level_min="loud")


async def test_log_pages_match_a_brute_force_sort(log_store: SqliteStore) -> None:
    """Lines stored out of time order, several batches: every filter, every page exact."""
    rng = random.Random(7)  # noqa: S311 - test data, not secrets
    words = ["alpha", "beta", "gamma", "delta"]
    lines = []
    for i in range(3000):
        lines.append(
            line(
                1000.0 + i - rng.uniform(0, 400),  # stored up to 400 s late
                f"{rng.choice(words)} {rng.choice(words)} #{i}",
                tenant=f"t{i % 2}",
                function=f"f{i % 3}",
                level=rng.choice(["debug", "info", "warning", "error"]),
                inv=f"inv{i // 10}",
            )
        )
    start = 0
    while start < len(lines):  # batches of 1 to 600 lines, as invocations end
        size = rng.choice([1, 1, 3, 40, 255, 256, 257, 600])
        await log_store.append_logs(lines[start : start + size])
        start += size
    stored = {x.message: x for x in await all_log_pages(log_store, 500)}
    assert len(stored) == 3000
    ids = [stored[x.message].id for x in lines]
    assert ids == sorted(ids)  # ids follow arrival, not ts
    # Queries whose word and substring readings agree, so both search modes must match.
    cases: list[dict[str, object]] = [
        {"tenant_id": "t1", "function": "f2"},
        {"tenant_id": "t0", "q": "gamma"},
        {"tenant_id": "t0", "function": "f1", "q": "beta alpha", "level_min": "warning"},
        {"q": "DELTA", "since": 1500.0, "until": 2500.0},
        {"function": "f0", "q": "gamma #1234"},
        {"q": "#1234"},
    ]
    for filters in cases:

        def wanted(x: LogLine, f: dict[str, object] = filters) -> bool:
            words = str(f.get("q", "")).lower().split()
            return (
                f.get("tenant_id", x.tenant_id) == x.tenant_id
                and f.get("function", x.function) == x.function
                and all(w in x.message.lower().split() for w in words)
                and ("level_min" not in f or x.level in ("warning", "error"))
                and f.get("since", 0.0) <= x.ts < f.get("until", 1e9)  # type: ignore[operator]
            )

        want = sorted(filter(wanted, stored.values()), key=lambda x: (x.ts, x.id), reverse=True)
        assert want or filters.get("q") == "gamma #1234"
        for limit in (7, 100):
            assert await all_log_pages(log_store, limit, **filters) == want, filters


async def test_logs_after_is_ascending_for_live_tail(log_store: SqliteStore) -> None:
    s = log_store
    await s.append_logs([line(float(i), f"line {i}", level="info") for i in range(5)])
    await s.append_logs([line(9.0, "other fn", function="g")])
    first = await s.logs_after(tenant_id="t1", function="f", after_id=0)
    assert [x.message for x in first] == [f"line {i}" for i in range(5)]
    await s.append_logs([line(3.0, "late but new", level="error"), line(7.0, "newer")])
    tail = await s.logs_after(tenant_id="t1", function="f", after_id=first[-1].id)
    assert [x.message for x in tail] == ["late but new", "newer"]
    assert [
        x.message
        for x in await s.logs_after(
            tenant_id="t1", function="f", after_id=first[-1].id, level_min="error"
        )
    ] == ["late but new"]
    assert [
        x.message
        for x in await s.logs_after(tenant_id=None, function="f", after_id=0, q="newer", limit=5)
    ] == ["newer"]
    assert await s.logs_after(tenant_id="t1", function="f", after_id=0, limit=2) == first[:2]
    assert await s.logs_after(tenant_id="t9", function="f", after_id=0) == []


async def test_retention_by_count_and_age(log_store: SqliteStore) -> None:
    s = log_store
    now = time.time()
    for fn in ("a", "b", "c"):
        await s.append_logs(
            [line(now - 50 + i, f"{fn} keepme {i}", function=fn) for i in range(50)]
        )
    await s.append_logs([line(now - 10_000, "ancient keepme", function="d")])
    await s.insert_invocation(invocation("old", now - 10_000))
    await s.insert_invocation(invocation("new", now))
    deleted = await s.enforce_retention(max_lines_per_function=20, max_age_s=3600)
    assert deleted == 3 * 30 + 1 + 1
    assert await s.enforce_retention(max_lines_per_function=20, max_age_s=3600) == 0
    for fn in ("a", "b", "c"):
        kept = await all_log_pages(s, 100, tenant_id="t1", function=fn)
        assert [x.message for x in kept] == [f"{fn} keepme {i}" for i in range(49, 29, -1)]
    assert await all_log_pages(s, 100, function="d") == []
    assert len(await all_log_pages(s, 100, q="keepme")) == 60  # the search index forgot them too
    with pytest.raises(NotFound):
        await s.get_invocation("old")
    await s.get_invocation("new")
    # Deleting the newest line never lets its id come back.
    before = (await s.query_logs(function="a", limit=1))[0][0].id
    assert await s.enforce_retention(max_lines_per_function=0, max_age_s=3600, batch=25) == 25
    assert await s.enforce_retention(max_lines_per_function=0, max_age_s=3600) == 35
    await s.append_logs([line(now, "fresh", function="a")])
    assert (await s.query_logs(function="a"))[0][0].id > before


async def test_records_past_the_cap_go_oldest_first(log_store: SqliteStore) -> None:
    """An anonymous caller of a public function can make records as fast as the
    gateway answers: past max_records the oldest go, whatever their age."""
    s = log_store
    now = time.time()
    for i in range(30):
        await s.insert_invocation(invocation(f"r{i:02d}", now - 100 + i))
    assert await s.enforce_retention(max_lines_per_function=10, max_age_s=3600, max_records=0) == 0
    assert (
        await s.enforce_retention(
            max_lines_per_function=10, max_age_s=3600, max_records=20, batch=4
        )
        == 4
    )
    assert await s.enforce_retention(max_lines_per_function=10, max_age_s=3600, max_records=20) == 6
    assert await s.enforce_retention(max_lines_per_function=10, max_age_s=3600, max_records=20) == 0
    for i in range(10):
        with pytest.raises(NotFound):
            await s.get_invocation(f"r{i:02d}")
    for i in range(10, 30):
        await s.get_invocation(f"r{i:02d}")


# -- crash safety -------------------------------------------------------------------------

CRASH_SCRIPT = """
import asyncio, os, sys
from pathlib import Path
from typing import Any
from gateway.store import FunctionConfig, open_store

async def main():
    cfg = FunctionConfig((), 5.0, 64, (), False, (), "handler:handler")
    async with open_store(Path(sys.argv[1])) as store:
        tenants = await store.list_tenants()
        tenant = tenants[0] if tenants else (await store.create_tenant("crash"))[0]
        i = 0
        while True:
            data = os.urandom(64 * 1024 + i)
            digest = await store.put_blob(data)
            await store.put_function(tenant.id, f"f{i % 3}", digest, len(data), cfg)
            print(i, flush=True)
            i += 1

asyncio.run(main())
"""


async def test_sigkill_during_deploys_leaves_only_complete_versions(tmp_path: Path) -> None:
    rng = random.Random(1)  # noqa: S311 - test timing, not secrets
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rounds, acknowledged = 6, 0
    for _ in range(rounds):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CRASH_SCRIPT,
            str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        await asyncio.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        rest = await asyncio.wait_for(proc.stdout.read(), timeout=30)
        await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        acknowledged += 1 + len(rest.splitlines())
    async with open_store(tmp_path) as store:
        total = 0
        for info in await store.list_functions():
            versions = await store.list_versions(info.tenant_id, info.name)
            assert [v.version for v in versions] == list(range(1, len(versions) + 1))
            assert info.active_version == info.latest_version == len(versions)
            for v in versions:
                assert len(await store.read_blob(v.digest)) == v.size  # digest checked too
            total += len(versions)
    # Every acknowledged deploy survived; at most one per kill committed unacknowledged.
    assert acknowledged <= total <= acknowledged + rounds
    with sqlite3.connect(tmp_path / "nsfaas.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


async def test_deleting_a_function_frees_blobs_no_other_version_uses(store: SqliteStore) -> None:
    """Blobs were never collected: deleting and re-creating a function reset its
    version count but not its disk, so a tenant's disk use had no bound."""
    a, _ = await store.create_tenant("a")
    b, _ = await store.create_tenant("b")
    await deploy(store, a.id, "f", code=b"one")
    await deploy(store, a.id, "f", code=b"two")
    await deploy(store, b.id, "g", code=b"two")  # the same code, another tenant's
    one = hashlib.sha256(b"one").hexdigest()
    two = hashlib.sha256(b"two").hexdigest()
    assert await store.delete_function(a.id, "f") == [one]
    assert not store.blob_path(one).exists()
    assert store.blob_path(two).exists() and await store.read_blob(two) == b"two"
    assert await store.delete_function(b.id, "g") == [two]
    assert not store.blob_path(two).exists()
    # A version whose blob was collected after it was written is refused, not stored.
    digest = await store.put_blob(b"three")
    store.blob_path(digest).unlink()
    with pytest.raises(NotFound) as exc:
        await store.put_function(a.id, "f", digest, 5, config())
    assert exc.value.code == "blob_not_found"


async def test_records_a_crash_left_running_are_closed_at_the_next_open(tmp_path: Path) -> None:
    """A gateway killed mid-invocation left its "running" records so for good."""
    async with SqliteStore(tmp_path / "data") as s:
        await s.insert_invocation(invocation("crashed", time.time()))
        done = replace(invocation("done", time.time()), outcome="ok", status=200)
        await s.finish_invocation(done)
        assert (await s.get_invocation("crashed")).outcome == "running"
    async with SqliteStore(tmp_path / "data") as s:
        rec = await s.get_invocation("crashed")
        assert (rec.outcome, rec.status, rec.error_type) == ("killed", 502, "GatewayStopped")
        assert (await s.get_invocation("done")).outcome == "ok"
