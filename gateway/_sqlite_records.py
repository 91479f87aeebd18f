"""Invocation records and retention of the SQLite store."""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import fields

from gateway._sqlite_logs import prune_marks
from gateway._sqlite_schema import decode_cursor, encode_cursor
from gateway.store import InvocationRecord, NotFound, safe_text

# Dataclass field order; the table names the `trigger` field `trigger_kind` (a keyword).
_FIELDS = [f.name for f in fields(InvocationRecord)]
_COLUMNS = ", ".join("trigger_kind" if f == "trigger" else f for f in _FIELDS)
_PLACEHOLDERS = ", ".join("?" for _ in _FIELDS)
_UPDATES = ", ".join(
    f"{c} = excluded.{c}" for c in _COLUMNS.split(", ") if c not in ("id", "started_at")
)
# Built once from the dataclass; every value is bound as a parameter.
_INSERT = f"INSERT INTO invocations ({_COLUMNS}) VALUES ({_PLACEHOLDERS})"  # noqa: S608
_UPSERT = f"{_INSERT} ON CONFLICT (id) DO UPDATE SET {_UPDATES}"
_SELECT = f"SELECT {_COLUMNS} FROM invocations"  # noqa: S608


def _values(rec: InvocationRecord) -> tuple[object, ...]:
    # Every field is a scalar: dataclasses.astuple's deep copy only costs time.
    values = [getattr(rec, name) for name in _FIELDS]
    return tuple([safe_text(v) if isinstance(v, str) else v for v in values])


def insert_invocation(conn: sqlite3.Connection, rec: InvocationRecord) -> None:
    # The start of an invocation that already finished (its record was written
    # first) must not overwrite the finished record.
    conn.execute(_INSERT + " ON CONFLICT (id) DO NOTHING", _values(rec))


def finish_invocation(conn: sqlite3.Connection, rec: InvocationRecord) -> None:
    conn.execute(_UPSERT, _values(rec))


def get_invocation(conn: sqlite3.Connection, invocation_id: str) -> InvocationRecord:
    row = conn.execute(_SELECT + " WHERE id = ?", (invocation_id,)).fetchone()
    if row is None:
        raise NotFound("invocation_not_found", f"invocation {invocation_id!r} not found")
    return _record(row)


def list_invocations(
    conn: sqlite3.Connection,
    *,
    tenant_id: str | None,
    function: str | None,
    outcome: str | None,
    since: float | None,
    until: float | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[InvocationRecord], str | None]:
    # Each combination of equality filters has an index ending in (started_at, id).
    where: list[str] = []
    params: list[object] = []
    for column, value in (("tenant_id", tenant_id), ("function", function), ("outcome", outcome)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("started_at >= ?")
        params.append(since)
    if until is not None:
        where.append("started_at < ?")
        params.append(until)
    if cursor is not None:
        ts, ident = decode_cursor(cursor, str)
        where.append("started_at <= ? AND (started_at < ? OR id < ?)")
        params += [ts, ts, ident]
    sql = _SELECT
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
    params.append(limit + 1)
    records = [_record(row) for row in conn.execute(sql, params)]
    if len(records) <= limit:
        return records, None
    last = records[limit - 1]
    return records[:limit], encode_cursor(last.started_at, last.id)


def enforce_retention(
    conn: sqlite3.Connection,
    *,
    max_lines: int,
    cutoff: float,
    budget: int,
    max_records: int = 0,
) -> int:
    """Delete up to `budget` rows: old lines, lines past `max_lines` per function, old
    records, and the oldest records past `max_records` (0: no cap)."""
    deleted: Counter[int] = Counter()
    left = budget
    if left > 0:
        rows = conn.execute(
            """DELETE FROM logs WHERE id IN (
                   SELECT id FROM logs WHERE ts < ? ORDER BY ts LIMIT ?)
               RETURNING scope_id""",
            (cutoff, left),
        ).fetchall()
        deleted.update(scope for (scope,) in rows)
        left -= len(rows)
    over = conn.execute(
        "SELECT id, lines FROM log_scopes WHERE lines > ? ORDER BY lines DESC", (max_lines,)
    ).fetchall()
    for scope, lines in over:
        excess = min(lines - deleted[scope] - max_lines, left)
        if excess <= 0:
            continue
        count = conn.execute(
            """DELETE FROM logs WHERE id IN (
                   SELECT id FROM logs WHERE scope_id = ? ORDER BY ts, id LIMIT ?)""",
            (scope, excess),
        ).rowcount
        deleted[scope] += count
        left -= count
    conn.executemany(
        "UPDATE log_scopes SET lines = lines - ? WHERE id = ?",
        [(n, scope) for scope, n in deleted.items()],
    )
    removed = sum(deleted.values())
    if removed:
        prune_marks(conn)
    if left > 0:
        removed += conn.execute(
            """DELETE FROM invocations WHERE rowid IN (
                   SELECT rowid FROM invocations WHERE started_at < ?
                   ORDER BY started_at LIMIT ?)""",
            (cutoff, left),
        ).rowcount
        left = budget - removed
    if left > 0 and max_records > 0:
        # Records are deleted oldest first, so the rowid span is close to the
        # count (and never below it): the exact count, a scan, only near the cap.
        lo, hi = conn.execute("SELECT min(rowid), max(rowid) FROM invocations").fetchone()
        if hi is not None and hi - lo + 1 > max_records:
            (count,) = conn.execute("SELECT count(*) FROM invocations").fetchone()
            if count > max_records:
                removed += conn.execute(
                    """DELETE FROM invocations WHERE rowid IN (
                           SELECT rowid FROM invocations ORDER BY started_at LIMIT ?)""",
                    (min(count - max_records, left),),
                ).rowcount
    return removed


def _record(row: tuple[object, ...]) -> InvocationRecord:
    values = dict(zip(_FIELDS, row, strict=True))
    values["logs_truncated"] = bool(values["logs_truncated"])
    return InvocationRecord(**values)  # type: ignore[arg-type]  # columns mirror the fields
