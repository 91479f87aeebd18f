"""Per-tenant KV data of the SQLite store.

Keys live as-is in a (tenant_id, key) primary key: no key, whatever its characters, can
name another tenant's row. Usage (key bytes + value bytes, key count) is kept per tenant
in `kv_usage` and checked inside the same write transaction as the change it allows.
"""

from __future__ import annotations

import re
import sqlite3

from gateway.store import Conflict, QuotaExceeded

_INT = re.compile(rb"-?[0-9]{1,19}")
_INT64 = (-(2**63), 2**63 - 1)


def get(conn: sqlite3.Connection, tenant_id: str, key: str) -> bytes | None:
    row = conn.execute(
        "SELECT value FROM kv WHERE tenant_id = ? AND key = ?", (tenant_id, key)
    ).fetchone()
    return bytes(row[0]) if row else None


def put(
    conn: sqlite3.Connection,
    tenant_id: str,
    key: str,
    value: bytes,
    *,
    max_bytes: int,
    max_keys: int,
) -> None:
    old = conn.execute(
        "SELECT length(value) FROM kv WHERE tenant_id = ? AND key = ?", (tenant_id, key)
    ).fetchone()
    key_bytes = len(key.encode())
    old_size = key_bytes + old[0] if old else 0
    _charge(
        conn,
        tenant_id,
        key_bytes + len(value) - old_size,
        0 if old else 1,
        max_bytes=max_bytes,
        max_keys=max_keys,
    )
    conn.execute(
        """INSERT INTO kv (tenant_id, key, value) VALUES (?, ?, ?)
           ON CONFLICT (tenant_id, key) DO UPDATE SET value = excluded.value""",
        (tenant_id, key, value),
    )


def delete(conn: sqlite3.Connection, tenant_id: str, key: str) -> bool:
    row = conn.execute(
        "DELETE FROM kv WHERE tenant_id = ? AND key = ? RETURNING length(value)",
        (tenant_id, key),
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        "UPDATE kv_usage SET bytes = bytes - ?, keys = keys - 1 WHERE tenant_id = ?",
        (len(key.encode()) + row[0], tenant_id),
    )
    return True


def incr(
    conn: sqlite3.Connection,
    tenant_id: str,
    key: str,
    delta: int,
    *,
    max_bytes: int,
    max_keys: int,
) -> int:
    old = get(conn, tenant_id, key)
    if old is not None and not _INT.fullmatch(old):
        raise Conflict("not_an_integer", f"the value of key {key!r} is not a decimal integer")
    value = (int(old) if old is not None else 0) + delta
    if not _INT64[0] <= value <= _INT64[1]:
        raise Conflict("integer_overflow", f"incrementing key {key!r} leaves the 64-bit range")
    put(conn, tenant_id, key, str(value).encode(), max_bytes=max_bytes, max_keys=max_keys)
    return value


def list_keys(
    conn: sqlite3.Connection, tenant_id: str, prefix: str, limit: int, after: str | None
) -> list[str]:
    # A range on the primary key, not LIKE: '%', '_' and '\' in a prefix are plain characters.
    sql = "SELECT key FROM kv WHERE tenant_id = ? AND key >= ?"
    params: list[object] = [tenant_id, prefix]
    upper = _prefix_end(prefix)
    if upper is not None:
        sql += " AND key < ?"
        params.append(upper)
    if after is not None:
        sql += " AND key > ?"
        params.append(after)
    sql += " ORDER BY key LIMIT ?"
    params.append(limit)
    return [key for (key,) in conn.execute(sql, params) if key.startswith(prefix)]


def usage(conn: sqlite3.Connection, tenant_id: str) -> tuple[int, int]:
    row = conn.execute(
        "SELECT bytes, keys FROM kv_usage WHERE tenant_id = ?", (tenant_id,)
    ).fetchone()
    return (row[0], row[1]) if row else (0, 0)


def _charge(
    conn: sqlite3.Connection,
    tenant_id: str,
    add_bytes: int,
    add_keys: int,
    *,
    max_bytes: int,
    max_keys: int,
) -> None:
    """Account a change, or raise QuotaExceeded if it grows usage past a limit."""
    used_bytes, used_keys = usage(conn, tenant_id)
    # A change that does not grow usage is allowed even over a (since lowered) quota.
    if add_bytes > 0 and used_bytes + add_bytes > max_bytes:
        raise QuotaExceeded(
            "kv_quota_exceeded",
            f"KV storage is limited to {max_bytes} bytes ({used_bytes} used, "
            f"this write needs {add_bytes} more)",
        )
    if add_keys > 0 and used_keys + add_keys > max_keys:
        raise QuotaExceeded("kv_quota_exceeded", f"KV storage is limited to {max_keys} keys")
    conn.execute(
        """INSERT INTO kv_usage (tenant_id, bytes, keys) VALUES (?, ?, ?)
           ON CONFLICT (tenant_id) DO UPDATE
           SET bytes = bytes + excluded.bytes, keys = keys + excluded.keys""",
        (tenant_id, add_bytes, add_keys),
    )


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with `prefix` (None: no bound).

    SQLite compares TEXT as UTF-8 bytes, which orders like code points; surrogates cannot
    occur in stored keys, so the step over them skips nothing.
    """
    chars = list(prefix)
    while chars:
        last = ord(chars.pop())
        if last < 0x10FFFF:
            nxt = last + 1
            if 0xD800 <= nxt <= 0xDFFF:
                nxt = 0xE000
            return "".join(chars) + chr(nxt)
    return None
