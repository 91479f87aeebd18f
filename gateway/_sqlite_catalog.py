"""Tenants, functions, versions and routes of the SQLite store.

Every function here runs on a store thread inside a transaction opened by the caller.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3

from gateway.store import (
    Conflict,
    FunctionConfig,
    FunctionInfo,
    FunctionVersion,
    NotFound,
    RouteEntry,
    Tenant,
    UploadQuota,
    methods_overlap,
    parse_route,
    paths_overlap,
    route_pattern,
    route_shape,
)

KEY_PREFIX = "nsf_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_tenant(conn: sqlite3.Connection, name: str, now: float) -> tuple[Tenant, str]:
    if conn.execute("SELECT 1 FROM tenants WHERE name = ?", (name,)).fetchone():
        raise Conflict("tenant_exists", f"a tenant named {name!r} already exists")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    tenant = Tenant(id="t_" + secrets.token_hex(8), name=name, created_at=now)
    conn.execute(
        "INSERT INTO tenants (id, name, key_hash, created_at) VALUES (?, ?, ?, ?)",
        (tenant.id, tenant.name, hash_key(key), tenant.created_at),
    )
    return tenant, key


def tenant_for_key(conn: sqlite3.Connection, key: str) -> Tenant | None:
    # The lookup is by the key's hash, so its timing tells nothing about stored keys.
    if not key.startswith(KEY_PREFIX) or not key.isascii() or len(key) > 256:
        return None
    row = conn.execute(
        "SELECT id, name, created_at FROM tenants WHERE key_hash = ?", (hash_key(key),)
    ).fetchone()
    return Tenant(*row) if row else None


def list_tenants(conn: sqlite3.Connection) -> list[Tenant]:
    rows = conn.execute("SELECT id, name, created_at FROM tenants ORDER BY name")
    return [Tenant(*row) for row in rows]


def get_tenant(conn: sqlite3.Connection, tenant_id: str) -> Tenant:
    row = conn.execute(
        "SELECT id, name, created_at FROM tenants WHERE id = ?", (tenant_id,)
    ).fetchone()
    if row is None:
        raise NotFound("tenant_not_found", f"tenant {tenant_id!r} not found")
    return Tenant(*row)


def put_function(
    conn: sqlite3.Connection,
    tenant_id: str,
    name: str,
    digest: str,
    size: int,
    config: FunctionConfig,
    now: float,
    unpacked: int = 0,
    quota: UploadQuota | None = None,
) -> tuple[FunctionVersion, bool]:
    get_tenant(conn, tenant_id)
    owner = find_function(conn, name)
    if owner is not None and owner.tenant_id != tenant_id:
        raise Conflict("name_taken", f"the function name {name!r} is taken")
    if quota is not None:
        _check_quota(conn, tenant_id, name, owner is None, size + unpacked, quota)
    routes = [parse_route(r) for r in config.routes]
    _claim_routes(conn, tenant_id, name, routes)
    (version,) = conn.execute(
        """INSERT INTO version_counters (tenant_id, name, last_version) VALUES (?, ?, 1)
           ON CONFLICT (tenant_id, name) DO UPDATE SET last_version = last_version + 1
           RETURNING last_version""",
        (tenant_id, name),
    ).fetchone()
    created = not conn.execute(
        "SELECT 1 FROM functions WHERE tenant_id = ? AND name = ?", (tenant_id, name)
    ).fetchone()
    if created:
        conn.execute(
            """INSERT INTO functions (tenant_id, name, active_version, latest_version,
                                      created_at, updated_at)
               VALUES (?, ?, ?, ?, ?, ?)""",
            (tenant_id, name, version, version, now, now),
        )
    else:
        conn.execute(
            """UPDATE functions SET active_version = ?, latest_version = ?, updated_at = ?
               WHERE tenant_id = ? AND name = ?""",
            (version, version, now, tenant_id, name),
        )
    conn.execute(
        """INSERT INTO versions (tenant_id, name, version, digest, size, config, created_at,
                                 unpacked)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (tenant_id, name, version, digest, size, json.dumps(config.to_json()), now, unpacked),
    )
    return FunctionVersion(tenant_id, name, version, digest, config, now, size), created


def _check_quota(
    conn: sqlite3.Connection, tenant_id: str, name: str, new: bool, adds: int, quota: UploadQuota
) -> None:
    """In the upload's own transaction, so concurrent uploads cannot overshoot together."""
    if new:
        (n,) = conn.execute(
            "SELECT count(*) FROM functions WHERE tenant_id = ?", (tenant_id,)
        ).fetchone()
        if n >= quota.functions:
            raise Conflict("function_limit", f"a tenant has at most {quota.functions} functions")
    else:
        (n,) = conn.execute(
            "SELECT count(*) FROM versions WHERE tenant_id = ? AND name = ?", (tenant_id, name)
        ).fetchone()
        if n >= quota.versions:
            raise Conflict(
                "version_limit",
                f"a function keeps at most {quota.versions} versions; delete and "
                "re-create it to start over",
            )
    if quota.code_bytes:
        used = code_usage(conn, tenant_id)
        if used + adds > quota.code_bytes:
            raise Conflict(
                "code_quota",
                f"this version takes {adds} bytes (archive plus unpacked files) and the "
                f"tenant's versions already take {used} of its {quota.code_bytes}; delete "
                "functions (every version of a function counts) to free space",
            )


def code_usage(conn: sqlite3.Connection, tenant_id: str) -> int:
    (used,) = conn.execute(
        "SELECT coalesce(sum(size + unpacked), 0) FROM versions WHERE tenant_id = ?",
        (tenant_id,),
    ).fetchone()
    return int(used)


def get_function(conn: sqlite3.Connection, tenant_id: str, name: str) -> FunctionInfo:
    row = conn.execute(
        """SELECT tenant_id, name, active_version, created_at, updated_at, latest_version
           FROM functions WHERE tenant_id = ? AND name = ?""",
        (tenant_id, name),
    ).fetchone()
    if row is None:
        raise NotFound("function_not_found", f"function {name!r} not found")
    return FunctionInfo(*row)


def find_function(conn: sqlite3.Connection, name: str) -> FunctionInfo | None:
    """Function names are global (they appear in /fn/{name}): at most one row."""
    row = conn.execute(
        """SELECT tenant_id, name, active_version, created_at, updated_at, latest_version
           FROM functions WHERE name = ? LIMIT 1""",
        (name,),
    ).fetchone()
    return FunctionInfo(*row) if row is not None else None


def list_functions(conn: sqlite3.Connection, tenant_id: str | None) -> list[FunctionInfo]:
    if tenant_id is None:
        rows = conn.execute(
            """SELECT tenant_id, name, active_version, created_at, updated_at, latest_version
               FROM functions ORDER BY tenant_id, name"""
        )
    else:
        rows = conn.execute(
            """SELECT tenant_id, name, active_version, created_at, updated_at, latest_version
               FROM functions WHERE tenant_id = ? ORDER BY name""",
            (tenant_id,),
        )
    return [FunctionInfo(*row) for row in rows]


def get_version(
    conn: sqlite3.Connection, tenant_id: str, name: str, version: int | None
) -> FunctionVersion:
    info = get_function(conn, tenant_id, name)
    number = info.active_version if version is None else version
    row = conn.execute(
        """SELECT tenant_id, name, version, digest, config, created_at, size FROM versions
            WHERE tenant_id = ? AND name = ? AND version = ?""",
        (tenant_id, name, number),
    ).fetchone()
    if row is None:
        raise NotFound("version_not_found", f"function {name!r} has no version {number}")
    return _version(row)


def list_versions(conn: sqlite3.Connection, tenant_id: str, name: str) -> list[FunctionVersion]:
    get_function(conn, tenant_id, name)
    rows = conn.execute(
        """SELECT tenant_id, name, version, digest, config, created_at, size FROM versions
            WHERE tenant_id = ? AND name = ? ORDER BY version""",
        (tenant_id, name),
    )
    return [_version(row) for row in rows]


def rollback(
    conn: sqlite3.Connection, tenant_id: str, name: str, version: int, now: float
) -> FunctionVersion:
    target = get_version(conn, tenant_id, name, version)
    _claim_routes(conn, tenant_id, name, [parse_route(r) for r in target.config.routes])
    conn.execute(
        "UPDATE functions SET active_version = ?, updated_at = ? WHERE tenant_id = ? AND name = ?",
        (version, now, tenant_id, name),
    )
    return target


def delete_function(conn: sqlite3.Connection, tenant_id: str, name: str) -> list[str]:
    """Delete; the digests its versions used (for ``unreferenced``)."""
    key = (tenant_id, name)
    if not conn.execute("DELETE FROM functions WHERE tenant_id = ? AND name = ?", key).rowcount:
        raise NotFound("function_not_found", f"function {name!r} not found")
    digests = [
        d
        for (d,) in conn.execute(
            "SELECT DISTINCT digest FROM versions WHERE tenant_id = ? AND name = ?", key
        )
    ]
    conn.execute("DELETE FROM versions WHERE tenant_id = ? AND name = ?", key)
    conn.execute("DELETE FROM routes WHERE tenant_id = ? AND name = ?", key)
    return digests


def unreferenced(
    conn: sqlite3.Connection, digests: list[str], tenant_id: str | None = None
) -> list[str]:
    """Those of ``digests`` no version of any function (of that tenant's) refers to."""
    sql = "SELECT 1 FROM versions WHERE digest = ?"
    args: tuple[str, ...] = ()
    if tenant_id is not None:
        sql += " AND tenant_id = ?"
        args = (tenant_id,)
    return [d for d in digests if not conn.execute(sql + " LIMIT 1", (d, *args)).fetchone()]


def all_routes(conn: sqlite3.Connection) -> list[RouteEntry]:
    rows = conn.execute(
        "SELECT method, path, tenant_id, name FROM routes ORDER BY path, method, tenant_id, name"
    )
    return [RouteEntry(*row) for row in rows]


def _claim_routes(
    conn: sqlite3.Connection, tenant_id: str, name: str, routes: list[tuple[str, str]]
) -> None:
    """Make `routes` the function's routes, or raise Conflict before writing anything.

    Within a tenant, only the same route twice collides ("/users/me" and
    "/users/{id}" may be two functions: the more specific serves). Across
    tenants any overlap does: one tenant's "/{rest:path}" must never serve
    (and see the cookies of) a request meant for another tenant's route.
    """
    for method, path in routes:
        others = conn.execute(
            """SELECT method, path, tenant_id, name FROM routes
               WHERE NOT (tenant_id = ? AND name = ?)
                 AND (tenant_id != ? OR pattern = ?)""",
            (tenant_id, name, tenant_id, route_pattern(path)),
        )
        for other_method, other_path, other_tenant, other_name in others:
            if not methods_overlap(method, other_method):
                continue
            if other_tenant == tenant_id:
                clash = route_shape(path) == route_shape(other_path)
            else:
                clash = paths_overlap(path, other_path)
            if clash:
                # Name the other function only to its own tenant.
                owner = (
                    f"function {other_name!r} ('{other_method} {other_path}')"
                    if other_tenant == tenant_id
                    else "a route of another tenant"
                )
                raise Conflict(
                    "route_conflict",
                    f"route '{method} {path}' is taken: it overlaps {owner}",
                )
    conn.execute("DELETE FROM routes WHERE tenant_id = ? AND name = ?", (tenant_id, name))
    conn.executemany(
        """INSERT OR IGNORE INTO routes (tenant_id, name, method, path, pattern)
           VALUES (?, ?, ?, ?, ?)""",
        [(tenant_id, name, m, p, route_pattern(p)) for m, p in routes],
    )


def _version(row: tuple[str, str, int, str, str, float, int]) -> FunctionVersion:
    tenant_id, name, version, digest, config, created_at, size = row
    return FunctionVersion(
        tenant_id, name, version, digest, FunctionConfig.from_json(config), created_at, size
    )
