"""Schema, migrations, connections and small shared helpers of the SQLite store."""

from __future__ import annotations

import base64
import binascii
import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from gateway.store import StoreError
from jail.runtime import _frames

_I = TypeVar("_I", str, int)

BUSY_TIMEOUT_MS = 5000
_MAX_CURSOR_ID = 256  # invocation ids are far shorter

# Each migration is a list of statements applied in one transaction; append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            key_hash TEXT NOT NULL UNIQUE,  -- sha256 hex of the API key; the key is never kept
            created_at REAL NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE functions (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            active_version INTEGER NOT NULL,
            latest_version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, name)
        ) WITHOUT ROWID""",
        # Function names are global: they appear in /fn/{name}.
        "CREATE UNIQUE INDEX functions_name ON functions (name)",
        # The last version number handed out per function name. It outlives a delete, so a
        # (function, version) pair in old records or caches never names different code.
        """CREATE TABLE version_counters (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            last_version INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE versions (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            digest TEXT NOT NULL,
            size INTEGER NOT NULL,
            config TEXT NOT NULL,  -- FunctionConfig.to_json()
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, name, version)
        )""",
        # Routes of each function's active version; `pattern` has every {param} as {}.
        """CREATE TABLE routes (
            tenant_id TEXT NOT NULL,
            name TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            pattern TEXT NOT NULL,
            PRIMARY KEY (tenant_id, name, method, path)
        ) WITHOUT ROWID""",
        "CREATE INDEX routes_pattern ON routes (pattern)",
        """CREATE TABLE kv (
            tenant_id TEXT NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            PRIMARY KEY (tenant_id, key)
        )""",
        """CREATE TABLE kv_usage (
            tenant_id TEXT PRIMARY KEY,
            bytes INTEGER NOT NULL,  -- UTF-8 key bytes plus value bytes
            keys INTEGER NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE invocations (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            function TEXT NOT NULL,
            version INTEGER NOT NULL,
            trigger_kind TEXT NOT NULL,
            method TEXT NOT NULL,
            path TEXT NOT NULL,
            status INTEGER,
            outcome TEXT NOT NULL,
            started_at REAL NOT NULL,
            wall_ms REAL,
            cpu_ms REAL,
            peak_memory_mb REAL,
            start TEXT,
            timeout_s REAL NOT NULL,
            memory_mb INTEGER NOT NULL,
            request_bytes INTEGER NOT NULL,
            response_bytes INTEGER,
            log_lines INTEGER NOT NULL,
            logs_truncated INTEGER NOT NULL,
            error_type TEXT,
            error_message TEXT,
            limit_name TEXT,
            limit_value REAL
        )""",
        "CREATE INDEX invocations_started ON invocations (started_at, id)",
        "CREATE INDEX invocations_tenant ON invocations (tenant_id, started_at, id)",
        "CREATE INDEX invocations_function ON invocations (tenant_id, function, started_at, id)",
        """CREATE INDEX invocations_outcome
            ON invocations (tenant_id, function, outcome, started_at, id)""",
        # One row per (tenant, function) that has logged; log lines point here by a small
        # integer, which keeps the log indexes compact and gives FTS a per-function token.
        """CREATE TABLE log_scopes (
            id INTEGER PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            function TEXT NOT NULL,
            lines INTEGER NOT NULL DEFAULT 0,  -- kept exact by append and retention
            UNIQUE (tenant_id, function)
        )""",
        # AUTOINCREMENT: ids never go back, even when retention deletes the newest lines,
        # so a live tail that remembers the last id it saw never misses a line.
        """CREATE TABLE logs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            scope_id INTEGER NOT NULL,
            ts REAL NOT NULL,
            invocation_id TEXT,
            level INTEGER NOT NULL,
            message TEXT NOT NULL,
            fields TEXT,  -- JSON object, NULL when empty
            scope TEXT GENERATED ALWAYS AS ('s' || scope_id) VIRTUAL  -- FTS column source
        )""",
        "CREATE INDEX logs_scope_ts ON logs (scope_id, ts)",  # function + time range
        "CREATE INDEX logs_scope_id ON logs (scope_id, id)",  # live tail
        "CREATE INDEX logs_ts ON logs (ts)",  # all functions; age retention
        "CREATE INDEX logs_invocation ON logs (invocation_id, ts) WHERE invocation_id IS NOT NULL",
        # Marks of the form "every line with id <= last_id has ts <= max_ts", one per few
        # hundred ids (first_id..last_id). Lines arrive roughly in time order but not
        # exactly (an invocation's lines are stored when it ends), so a text search that
        # walks matches newest id first uses them to know when no older id can still hold
        # a newer line.
        """CREATE TABLE log_marks (
            last_id INTEGER PRIMARY KEY,
            first_id INTEGER NOT NULL,
            max_ts REAL NOT NULL
        )""",
        "CREATE INDEX log_marks_ts ON log_marks (max_ts)",
    ),
    (
        # Bytes of the version's files once unpacked (0 for versions stored before
        # this column): with `size` it is what the tenant's code quota counts.
        "ALTER TABLE versions ADD COLUMN unpacked INTEGER NOT NULL DEFAULT 0",
    ),
)

# Full-text index over log messages. Its `scope` column holds one token per (tenant,
# function), so a search can be limited to a function inside the index itself instead of
# filtering every match afterwards. Lines are indexed by `_sqlite_logs.append`, one
# INSERT ... SELECT per batch: a per-row AFTER INSERT trigger cost 54-56 us a line
# against 15-28 us (bench: a 1,000-line log cost the store's writer ~100 ms, and every
# other tenant's record waited behind it). Deletes (retention) keep their trigger. The
# delete trigger's presence says the index is in step with the table.
_FTS_STATEMENTS = (
    """CREATE VIRTUAL TABLE IF NOT EXISTS logs_fts
        USING fts5(message, scope, content='logs', content_rowid='id')""",
    """CREATE TRIGGER logs_fts_delete AFTER DELETE ON logs BEGIN
        INSERT INTO logs_fts (logs_fts, rowid, message, scope)
        VALUES ('delete', old.id, old.message, 's' || old.scope_id);
    END""",
    "INSERT INTO logs_fts (logs_fts) VALUES ('rebuild')",
)
_FTS_IN_STEP = "logs_fts_delete"
_FTS_LEGACY_INSERT = "logs_fts_insert"  # the per-row trigger of earlier versions


def connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    """A connection in autocommit mode; transactions are explicit (see `transaction`)."""
    # check_same_thread=False only so aclose() can close reader connections after their
    # threads have stopped; each connection is otherwise used by one thread.
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
    )
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable at checkpoints, never corrupt
    conn.execute("PRAGMA cache_size = -32000")  # KiB
    conn.execute("PRAGMA temp_store = MEMORY")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection, *, write: bool) -> Iterator[None]:
    """One transaction; IMMEDIATE for writes so a second process waits instead of failing."""
    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may already have rolled back (disk full, ...)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def has_fts5(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("CREATE VIRTUAL TABLE temp.nsfaas_fts5_probe USING fts5(x)")
    except sqlite3.OperationalError:
        return False
    conn.execute("DROP TABLE temp.nsfaas_fts5_probe")
    return True


def migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the newest version, one transaction per migration."""
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)"""
    )
    with transaction(conn, write=True):
        (current,) = conn.execute(
            "SELECT coalesce(max(version), 0) FROM schema_migrations"
        ).fetchone()
    if current > len(MIGRATIONS):
        raise StoreError(
            "schema_too_new", f"database schema version {current} is newer than this code"
        )
    for version in range(current + 1, len(MIGRATIONS) + 1):
        with transaction(conn, write=True):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, time.time()),
            )


def setup_fts(conn: sqlite3.Connection, want: bool = True) -> bool:
    """Create (and fill) the log search index if SQLite has FTS5 and it is wanted; True
    if it is in use (`append` then keeps it filled).

    Otherwise the triggers are dropped: lines stored from now on are not indexed, and a
    later start that uses the index rebuilds it from the log table.
    """
    use = want and has_fts5(conn)
    present = {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND name IN (?, ?)",
            (_FTS_IN_STEP, _FTS_LEGACY_INSERT),
        )
    }
    with transaction(conn, write=True):
        if _FTS_LEGACY_INSERT in present:
            conn.execute(f"DROP TRIGGER {_FTS_LEGACY_INSERT}")  # append indexes now
        if not use:
            if _FTS_IN_STEP in present:
                conn.execute(f"DROP TRIGGER {_FTS_IN_STEP}")
        elif _FTS_IN_STEP not in present:
            for statement in _FTS_STATEMENTS:
                conn.execute(statement)
    return use


def encode_cursor(ts: float, ident: str | int) -> str:
    """An opaque page cursor for the position (ts, id)."""
    raw = json.dumps([ts, ident], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[_I]) -> tuple[float, _I]:
    """The (ts, id) of `encode_cursor`; ValueError if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        ts, ident = _frames.loads(raw)  # ValueError for too-deep nesting too
    except (ValueError, TypeError, binascii.Error):
        raise ValueError("invalid cursor") from None
    if isinstance(ts, bool) or not isinstance(ts, int | float) or type(ident) is not kind:
        raise ValueError("invalid cursor")
    # Both values are bound into SQL: a cursor must not be able to make the query itself
    # fail (an int beyond int64 is an OverflowError, a lone surrogate cannot be UTF-8),
    # and no stored row has an infinite time to page from.
    try:
        stamp = float(ts)  # an int past float's range is an OverflowError here
    except OverflowError:
        raise ValueError("invalid cursor") from None
    if not math.isfinite(stamp):
        raise ValueError("invalid cursor")
    if isinstance(ident, int) and not 0 <= ident < 2**63:
        raise ValueError("invalid cursor")
    if isinstance(ident, str) and (len(ident) > _MAX_CURSOR_ID or not ident.isprintable()):
        raise ValueError("invalid cursor")
    return stamp, ident
