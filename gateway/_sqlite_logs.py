"""Log lines of the SQLite store: batch append, filtered pages, live tail.

Lines point to a `log_scopes` row per (tenant, function). A page without text search runs
on the (scope_id, ts) index, newest first, and stops after the page (several functions:
one such query each, merged). A text search walks the FTS5 matches from the newest id
down, with the functions' scope tokens inside the match expression, and stops as soon as
`log_marks` proves no older id can hold a newer line: the cost follows the page, not the
number of matches. Without FTS5, `q` is a case-insensitive substring scan.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import sqlite3
from collections import Counter
from collections.abc import Sequence
from typing import Any

from gateway._sqlite_schema import decode_cursor, encode_cursor
from gateway.store import LOG_LEVELS, LogLine, NewLogLine, fields_json, safe_text

_MAX_SCOPE_TOKENS = 64  # above this many functions, filter rows instead of the FTS match
_MARK_SPAN = 256  # ids per log_marks row: finer marks stop a search sooner
_LEVEL_NAMES = {number: name for name, number in LOG_LEVELS.items()}
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}
_WORD = re.compile(r"\w")
_SELECT = "SELECT id, scope_id, ts, invocation_id, level, message, fields FROM logs"
_Row = tuple[int, int, float, str | None, int, str, str | None]
_Scopes = dict[int, tuple[str, str]]


def level_number(level: str) -> int:
    name = level.lower()
    number = LOG_LEVELS.get(_LEVEL_ALIASES.get(name, name))
    if number is None:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LOG_LEVELS)}")
    return number


def append(
    conn: sqlite3.Connection,
    lines: Sequence[NewLogLine],
    scopes: dict[tuple[str, str], int],
    *,
    fts: bool,
) -> None:
    """Insert lines, and index them if `fts`; `scopes` caches scope ids and is only
    ever used by the writer thread."""
    if not lines:
        return
    if not all(math.isfinite(line.ts) for line in lines):
        raise ValueError("log line timestamps must be finite")
    added = [k for k in {(line.tenant_id, line.function) for line in lines} if k not in scopes]
    try:
        for tenant_id, function in added:
            conn.execute(
                "INSERT OR IGNORE INTO log_scopes (tenant_id, function) VALUES (?, ?)",
                (tenant_id, function),
            )
            (scopes[tenant_id, function],) = conn.execute(
                "SELECT id FROM log_scopes WHERE tenant_id = ? AND function = ?",
                (tenant_id, function),
            ).fetchone()
        rows = [
            (
                scopes[line.tenant_id, line.function],
                line.ts,
                line.invocation_id,
                level_number(line.level),
                safe_text(line.message),
                fields_json(line.fields) if line.fields else None,
            )
            for line in lines
        ]
        before = 0
        if fts:
            (before,) = conn.execute("SELECT coalesce(max(id), 0) FROM logs").fetchone()
        conn.executemany(
            """INSERT INTO logs (scope_id, ts, invocation_id, level, message, fields)
               VALUES (?, ?, ?, ?, ?, ?)""",
            rows,
        )
        if fts:  # the ids past `before` are these lines: the store has one writer
            conn.execute(
                """INSERT INTO logs_fts (rowid, message, scope)
                   SELECT id, message, 's' || scope_id FROM logs WHERE id > ?""",
                (before,),
            )
        conn.executemany(
            "UPDATE log_scopes SET lines = lines + ? WHERE id = ?",
            [(n, scope) for scope, n in Counter(row[0] for row in rows).items()],
        )
        _advance_marks(conn, [line.ts for line in lines])
    except BaseException:
        for key in added:  # the transaction rolls back, so these ids may not exist
            scopes.pop(key, None)
        raise


def query(
    conn: sqlite3.Connection,
    *,
    fts: bool,
    tenant_id: str | None,
    function: str | None,
    invocation_id: str | None,
    since: float | None,
    until: float | None,
    level_min: str | None,
    q: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[LogLine], str | None]:
    scopes = _scopes(conn, tenant_id, function)
    if scopes is not None and not scopes:
        return [], None
    where: list[str] = []
    params: list[object] = []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    if level_min is not None:
        where.append("level >= ?")
        params.append(level_number(level_min))
    if cursor is not None:
        ts, ident = decode_cursor(cursor, int)
        where.append("ts <= ? AND (ts < ? OR id < ?)")
        params += [ts, ts, ident]
    words = _split_q(q, fts, where, params)
    if invocation_id is not None:
        # Few lines per invocation: its own index, with the scope check kept off-index.
        where.append("invocation_id = ?")
        params.append(invocation_id)
        _filter_scopes(scopes, where, params, indexed=False)
        bounds = (None, None)
        if words:
            bounds = conn.execute(
                "SELECT min(id), max(id) FROM logs WHERE invocation_id = ?", (invocation_id,)
            ).fetchone()
            _match(words, scopes, where, params, bounds)
        rows = [] if words and bounds[0] is None else _page(conn, where, params, limit + 1)
    elif words:
        _filter_scopes(scopes, where, params, indexed=False, tokens=True)
        rows = _search(conn, _match_expr(words, scopes), where, params, limit + 1, since)
    elif scopes is not None and len(scopes) <= _MAX_SCOPE_TOKENS:
        rows = []
        for scope in scopes:
            rows += _page(conn, [*where, "scope_id = ?"], [*params, scope], limit + 1)
        rows.sort(key=lambda r: (r[2], r[0]), reverse=True)
    else:
        _filter_scopes(scopes, where, params, indexed=False)
        rows = _page(conn, where, params, limit + 1)
    names = scopes if scopes is not None else _scope_names(conn, {r[1] for r in rows})
    lines = [_line(row, names) for row in rows[:limit]]
    if len(rows) <= limit:
        return lines, None
    return lines, encode_cursor(lines[-1].ts, lines[-1].id)


def after(
    conn: sqlite3.Connection,
    *,
    fts: bool,
    tenant_id: str | None,
    function: str,
    after_id: int,
    limit: int,
    level_min: str | None,
    q: str | None,
) -> list[LogLine]:
    scopes = _scopes(conn, tenant_id, function)
    if not scopes:
        return []
    where = ["id > ?"]
    params: list[object] = [after_id]
    if level_min is not None:
        where.append("level >= ?")
        params.append(level_number(level_min))
    words = _split_q(q, fts, where, params)
    _filter_scopes(scopes, where, params, indexed=True)
    if words:
        _match(words, scopes, where, params, (after_id + 1, None))
    rows = _page(conn, where, params, limit, order="id")
    return [_line(row, scopes) for row in rows]


def prune_marks(conn: sqlite3.Connection) -> None:
    """Drop marks that only cover deleted lines (the newest mark always stays)."""
    conn.execute("DELETE FROM log_marks WHERE last_id < (SELECT min(id) FROM logs)")


def _page(
    conn: sqlite3.Connection,
    where: list[str],
    params: list[object],
    limit: int,
    *,
    order: str = "ts DESC, id DESC",
) -> list[_Row]:
    # Every fragment of `where` is a constant of this module; values are bound.
    sql = f"{_SELECT} WHERE {' AND '.join(where) or '1'} ORDER BY {order} LIMIT ?"
    return conn.execute(sql, [*params, limit]).fetchall()


def _search(
    conn: sqlite3.Connection,
    match: str,
    where: list[str],
    params: list[object],
    limit: int,
    since: float | None,
) -> list[_Row]:
    """The newest `limit` rows by (ts, id) among FTS matches that also pass `where`."""
    fts_sql = "SELECT rowid FROM logs_fts WHERE logs_fts MATCH ?"
    fts_params: list[object] = [match]
    floor = None if since is None else _id_floor(conn, since)
    if floor is not None:
        fts_sql += " AND rowid > ?"
        fts_params.append(floor)
    matches = conn.execute(fts_sql + " ORDER BY rowid DESC", fts_params)
    rows_sql = " AND ".join(["id IN (SELECT value FROM json_each(?))", *where])
    best: list[tuple[float, int, _Row]] = []  # min-heap of the newest rows so far
    chunk = 128
    try:
        while ids := [ident for (ident,) in matches.fetchmany(chunk)]:
            rows = conn.execute(f"{_SELECT} WHERE {rows_sql}", [json.dumps(ids), *params])
            for row in rows:
                item = (row[2], row[0], row)
                if len(best) < limit:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
            if len(ids) < chunk:
                break
            # Unseen matches all have smaller ids; stop once none can be newer than the page.
            ceiling = _ts_ceiling(conn, ids[-1] - 1)
            if len(best) == limit and ceiling is not None and ceiling <= best[0][0]:
                break
            if since is not None and ceiling is not None and ceiling < since:
                break
            chunk = min(chunk * 2, 4096)
    finally:
        matches.close()
    return [row for _, _, row in sorted(best, reverse=True)]


def _advance_marks(conn: sqlite3.Connection, stamps: list[float]) -> None:
    """Extend log_marks over the ids just inserted (contiguous: one writer, AUTOINCREMENT)."""
    (last_id,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'logs'").fetchone()
    top = conn.execute(
        "SELECT last_id, first_id, max_ts FROM log_marks ORDER BY last_id DESC LIMIT 1"
    ).fetchone()
    first_new = last_id - len(stamps) + 1
    if top is None:
        mark_last, mark_first, running = None, first_new, -math.inf
    else:
        mark_last, mark_first, running = top
        conn.execute("DELETE FROM log_marks WHERE last_id = ?", (mark_last,))
    marks = []
    for ident, ts in enumerate(stamps, start=first_new):
        if mark_last is not None and ident - mark_first >= _MARK_SPAN:
            marks.append((mark_last, mark_first, running))
            mark_first = ident
        running = max(running, ts)
        mark_last = ident
    marks.append((mark_last, mark_first, running))
    conn.executemany("INSERT INTO log_marks (last_id, first_id, max_ts) VALUES (?, ?, ?)", marks)


def _ts_ceiling(conn: sqlite3.Connection, up_to_id: int) -> float | None:
    """No line with id <= up_to_id has a ts above this (None: unknown)."""
    row = conn.execute(
        "SELECT max_ts FROM log_marks WHERE last_id >= ? ORDER BY last_id LIMIT 1", (up_to_id,)
    ).fetchone()
    return row[0] if row else None


def _id_floor(conn: sqlite3.Connection, since: float) -> int | None:
    """Every line with id <= this has ts < since (None: no such id known)."""
    row = conn.execute(
        """SELECT last_id FROM log_marks WHERE max_ts < ?
           ORDER BY max_ts DESC, last_id DESC LIMIT 1""",
        (since,),
    ).fetchone()
    return row[0] if row else None


def _split_q(q: str | None, fts: bool, where: list[str], params: list[object]) -> list[str]:
    """Words for the FTS match; other terms become substring filters in `where`."""
    terms = (q or "").split()
    words = [t for t in terms if _WORD.search(t)] if fts else []
    for term in terms:
        if term not in words:
            where.append("instr(lower(message), ?) > 0")
            params.append(term.lower())
    return words


def _match_expr(words: list[str], scopes: _Scopes | None) -> str:
    # Each word is a quoted phrase on the message column; a trailing * makes it a prefix.
    phrases = []
    for word in words:
        body = word.rstrip("*") if word.endswith("*") else word
        star = "*" if body != word else ""
        phrases.append('message : "' + body.replace('"', '""') + '"' + star)
    expr = " AND ".join(phrases)
    if scopes is not None and len(scopes) <= _MAX_SCOPE_TOKENS:
        expr = "scope : (" + " OR ".join(f'"s{s}"' for s in scopes) + ") AND " + expr
    return expr


def _match(
    words: list[str],
    scopes: _Scopes | None,
    where: list[str],
    params: list[object],
    bounds: tuple[int | None, int | None],
) -> None:
    """Filter rows by the FTS match, read only within the id bounds (for small id ranges)."""
    sub = "SELECT rowid FROM logs_fts WHERE logs_fts MATCH ?"
    params.append(_match_expr(words, scopes))
    if bounds[0] is not None:
        sub += " AND rowid >= ?"
        params.append(bounds[0])
    if bounds[1] is not None:
        sub += " AND rowid <= ?"
        params.append(bounds[1])
    where.append(f"id IN ({sub})")


def _filter_scopes(
    scopes: _Scopes | None,
    where: list[str],
    params: list[object],
    *,
    indexed: bool,
    tokens: bool = False,
) -> None:
    if scopes is None or (tokens and len(scopes) <= _MAX_SCOPE_TOKENS):
        return  # no filter, or the FTS match already holds the scope tokens
    # "+scope_id" keeps SQLite from using a scope index when another index is better.
    column = "scope_id" if indexed else "+scope_id"
    if len(scopes) == 1:
        where.append(f"{column} = ?")
        params.append(next(iter(scopes)))
    else:
        where.append(f"{column} IN (SELECT value FROM json_each(?))")  # noqa: S608 - constant
        params.append(json.dumps(list(scopes)))


def _scopes(
    conn: sqlite3.Connection, tenant_id: str | None, function: str | None
) -> _Scopes | None:
    """Scope ids for the filter (None: no filter), mapped to (tenant_id, function)."""
    if tenant_id is None and function is None:
        return None
    if tenant_id is not None and function is not None:
        sql = "SELECT id, tenant_id, function FROM log_scopes WHERE tenant_id = ? AND function = ?"
        rows = conn.execute(sql, (tenant_id, function))
    elif tenant_id is not None:
        sql = "SELECT id, tenant_id, function FROM log_scopes WHERE tenant_id = ?"
        rows = conn.execute(sql, (tenant_id,))
    else:
        sql = "SELECT id, tenant_id, function FROM log_scopes WHERE function = ?"
        rows = conn.execute(sql, (function,))
    return {scope: (t, f) for scope, t, f in rows}


def _scope_names(conn: sqlite3.Connection, ids: set[int]) -> _Scopes:
    rows = conn.execute(
        """SELECT id, tenant_id, function FROM log_scopes
           WHERE id IN (SELECT value FROM json_each(?))""",
        (json.dumps(sorted(ids)),),
    )
    return {scope: (t, f) for scope, t, f in rows}


def _line(row: _Row, names: _Scopes) -> LogLine:
    ident, scope, ts, invocation_id, level, message, fields = row
    tenant_id, function = names[scope]
    decoded: dict[str, Any] = json.loads(fields) if fields else {}
    return LogLine(
        ident,
        ts,
        invocation_id,
        tenant_id,
        function,
        _LEVEL_NAMES.get(level, str(level)),
        message,
        decoded,
    )
