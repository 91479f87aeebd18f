"""The embedded store: one SQLite database (WAL) plus content-addressed blob files.

SQLite never runs on the event loop. One thread owns the only write connection, so writes
queue in order and each is one IMMEDIATE transaction; a few reader threads, each with its
own connection, serve reads from WAL snapshots without waiting for the writer. A write
whose caller is cancelled still completes (or fails) as a whole on the writer thread.
Read-check-write sequences (quotas, route claims, version numbers) run inside one
IMMEDIATE transaction, so they stay atomic even if a second process opens the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from gateway import _sqlite_blobs as blobs
from gateway import _sqlite_catalog as catalog
from gateway import _sqlite_kv as kv
from gateway import _sqlite_logs as logs
from gateway import _sqlite_records as records
from gateway._sqlite_schema import connect, migrate, setup_fts, transaction
from gateway.store import (
    FunctionConfig,
    FunctionInfo,
    FunctionVersion,
    InvocationRecord,
    LogLine,
    NewLogLine,
    NotFound,
    RouteEntry,
    Store,
    StoreError,
    Tenant,
    UploadQuota,
    parse_route,
)

_T = TypeVar("_T")
CHECKPOINT_EVERY = 200  # transactions between WAL checkpoints (each a few pages)
INLINE_MAX_LINES = 50  # a record with more log lines goes through the writer thread


class SqliteStore(Store):
    """`Store` on SQLite in `data_dir/nsfaas.db`, blobs under `data_dir/blobs/`."""

    def __init__(self, data_dir: Path, *, readers: int = 2, fts: bool = True) -> None:
        self._data_dir = Path(data_dir)
        self._db_path = self._data_dir / "nsfaas.db"
        self._blob_dir = self._data_dir / "blobs"
        self._reader_count = readers
        self._writer: ThreadPoolExecutor | None = None
        # Keyed so that a finished invocation's record can replace its own
        # still-queued "running" insert (one write instead of two under load).
        self._pending: dict[
            object, tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
        ] = {}
        self._pending_bulk: list[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]
        ] = []
        self._flusher: asyncio.Task[None] | None = None
        self._on_loop: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]] = []
        self._readers: ThreadPoolExecutor | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._read_conns: list[sqlite3.Connection] = []
        self._read_local = threading.local()
        self._read_lock = threading.Lock()
        self._scopes: dict[tuple[str, str], int] = {}  # whoever holds the write connection
        self._want_fts = fts  # False: search by substring scan even if FTS5 is there
        self._fts = False
        self.writes = 0  # write operations committed or attempted (for tests and metrics)
        self._commits = 0  # transactions since the last checkpoint

    @property
    def fts(self) -> bool:
        """Whether log search uses the FTS5 index (else a substring scan)."""
        return self._fts

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self) -> None:
        if self._writer is not None:
            raise StoreError("store_open", "the store is already open")
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsfaas-store-write")
        try:
            await asyncio.get_running_loop().run_in_executor(writer, self._open_sync)
        except BaseException:
            writer.shutdown(wait=False)
            raise
        self._writer = writer
        self._readers = ThreadPoolExecutor(
            max_workers=self._reader_count, thread_name_prefix="nsfaas-store-read"
        )

    def _private_db_files(self) -> None:
        """The database holds every tenant's KV values, env secrets and logs:
        0600 whatever the umask and the data dir's mode (an operator may make
        the data dir traversable for a jail dir inside it). SQLite gives the
        -wal and -shm files it creates the database file's mode."""
        fd = os.open(self._db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{self._db_path}{suffix}", 0o600)

    def _open_sync(self) -> None:
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._blob_dir.mkdir(mode=0o700, exist_ok=True)
            blobs.remove_stale_temp_files(self._blob_dir)
            self._private_db_files()
            conn = connect(self._db_path, readonly=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError("storage_error", f"cannot open the store: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_size_limit = 67108864")  # trim the WAL to 64 MiB
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # see _checkpoint
            migrate(conn)
            self._fts = setup_fts(conn, self._want_fts)
            with transaction(conn, write=True):
                # Nothing runs before the store opens: a "running" record is of
                # an invocation that a crash (or SIGKILL) of the gateway ended.
                conn.execute(
                    """UPDATE invocations SET outcome = 'killed', status = 502,
                              error_type = 'GatewayStopped',
                              error_message = 'the gateway stopped during this invocation'
                        WHERE outcome = 'running'"""
                )
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError("storage_error", f"cannot open the database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._write_conn = conn

    async def aclose(self) -> None:
        writer, readers = self._writer, self._readers
        if writer is None or readers is None:
            return
        self._writer = self._readers = None  # new calls fail from here on
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)  # queued writes land
        loop = asyncio.get_running_loop()
        try:
            # Queued behind every write already submitted.
            await loop.run_in_executor(writer, self._close_writer)
        finally:
            await asyncio.to_thread(self._stop_threads, writer, readers)

    def _close_writer(self) -> None:
        conn, self._write_conn = self._write_conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA analysis_limit = 1000")  # keep optimize cheap
                conn.execute("PRAGMA optimize")
            finally:
                conn.close()

    def _stop_threads(self, writer: ThreadPoolExecutor, readers: ThreadPoolExecutor) -> None:
        writer.shutdown(wait=True)
        readers.shutdown(wait=True)
        with self._read_lock:
            conns, self._read_conns = self._read_conns, []
        for conn in conns:
            conn.close()

    # -- running work on the store's threads ----------------------------------------------

    async def _write(
        self, op: Callable[[sqlite3.Connection], _T], *, bulk: bool = False, key: object = None
    ) -> _T:
        """Run ``op`` in the writer thread, atomically (group commit).

        Writes that arrive while a batch is in the writer thread wait and go
        together in the next one: one thread hand-off and one commit for many
        writes under load. Each op still runs all-or-nothing, in a savepoint
        of its own, and only its own caller sees its exception.
        """
        if self._writer is None:
            raise StoreError("store_closed", "the store is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if bulk:
            self._pending_bulk.append((op, fut))
        else:
            self._pending[key if key is not None else fut] = (op, fut)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return cast("_T", await fut)

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        writer = self._writer
        while self._pending or self._pending_bulk or self._commits >= CHECKPOINT_EVERY:
            # Small writes (records, KV, deploys) all go at once; bulk ones (log
            # chunks, retention) one per batch, so a chatty function's logs never
            # hold everyone else's records behind them.
            if not self._pending and not self._pending_bulk:
                await loop.run_in_executor(writer, self._checkpoint)
                continue
            batch, self._pending = list(self._pending.values()), {}
            if self._pending_bulk:
                batch.append(self._pending_bulk.pop(0))
            try:
                outcomes = await loop.run_in_executor(
                    writer, self._in_write_batch, [op for op, _ in batch]
                )
            except BaseException as exc:  # the executor is gone: fail the batch
                outcomes = [(False, exc)] * len(batch)
            _resolve(batch, outcomes)

    def _note_commits(self, n: int) -> None:
        self._commits += n
        if self._commits >= CHECKPOINT_EVERY and self._writer_idle():
            self._flusher = asyncio.create_task(self._flush())

    def _checkpoint(self) -> None:
        """Move the WAL into the database, in the writer thread (SQLite's automatic
        checkpoint is off: it could run, and fsync, inside an inline write)."""
        self._commits = 0
        conn = self._write_conn
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):  # retried after the next writes
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def _in_write_batch(
        self, ops: list[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[bool, Any]]:
        conn = self._write_conn
        if conn is None:
            err = StoreError("store_closed", "the store is not open")
            return [(False, err)] * len(ops)
        self.writes += len(ops)
        self._commits += 1
        if len(ops) == 1:
            try:
                return [(True, self._in_write(ops[0]))]
            except Exception as exc:
                return [(False, exc)]
        out: list[tuple[bool, Any]] = []
        try:
            with transaction(conn, write=True):
                for op in ops:
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op(conn)
                    except Exception as exc:
                        if not conn.in_transaction:
                            raise  # SQLite gave up the whole transaction
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        out.append((False, _translate(exc)))
                    else:
                        conn.execute("RELEASE op")
                        out.append((True, value))
        except Exception as exc:
            failed = _translate(exc)
            return [(False, failed)] * len(ops)
        return out

    def _in_write(self, op: Callable[[sqlite3.Connection], _T]) -> _T:  # one op, one transaction
        conn = self._write_conn
        if conn is None:
            raise StoreError("store_closed", "the store is not open")
        try:
            with transaction(conn, write=True):
                return op(conn)
        except sqlite3.Error as exc:
            raise StoreError("storage_error", f"database error: {exc}") from exc

    async def _read(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._readers is None:
            raise StoreError("store_closed", "the store is not open")
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._in_read, op)

    def _in_read(self, op: Callable[[sqlite3.Connection], _T]) -> _T:
        try:
            conn: sqlite3.Connection | None = getattr(self._read_local, "conn", None)
            if conn is None:
                conn = connect(self._db_path, readonly=True)
                self._read_local.conn = conn
                with self._read_lock:
                    self._read_conns.append(conn)
            with transaction(conn, write=False):  # one snapshot for the whole read
                return op(conn)
        except sqlite3.Error as exc:
            raise StoreError("storage_error", f"database error: {exc}") from exc

    # -- blobs ----------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        if self._writer is None:
            raise StoreError("store_closed", "the store is not open")
        return await asyncio.to_thread(blobs.put_blob, self._blob_dir, data)

    def blob_path(self, digest: str) -> Path:
        return blobs.blob_path(self._blob_dir, digest)

    async def read_blob(self, digest: str) -> bytes:
        return await asyncio.to_thread(blobs.read_blob, self._blob_dir, digest)

    # -- tenants --------------------------------------------------------------------------

    async def create_tenant(self, name: str) -> tuple[Tenant, str]:
        if not name.strip():
            raise ValueError("tenant name must not be empty")
        now = time.time()
        return await self._write(lambda c: catalog.create_tenant(c, name, now))

    async def tenant_for_key(self, key: str) -> Tenant | None:
        return await self._read(lambda c: catalog.tenant_for_key(c, key))

    async def list_tenants(self) -> list[Tenant]:
        return await self._read(catalog.list_tenants)

    async def get_tenant(self, tenant_id: str) -> Tenant:
        return await self._read(lambda c: catalog.get_tenant(c, tenant_id))

    # -- functions ------------------------------------------------------------------------

    async def put_function(
        self,
        tenant_id: str,
        name: str,
        digest: str,
        size: int,
        config: FunctionConfig,
        *,
        unpacked: int = 0,
        quota: UploadQuota | None = None,
    ) -> tuple[FunctionVersion, bool]:
        path = self.blob_path(digest)

        def op(conn: sqlite3.Connection) -> tuple[FunctionVersion, bool]:
            # A version may only point to a blob that is already durably stored.
            if not path.is_file():
                raise NotFound("blob_not_found", f"blob {digest} not found")
            return catalog.put_function(
                conn, tenant_id, name, digest, size, config, time.time(), unpacked, quota
            )

        try:
            for route in config.routes:
                parse_route(route)  # fail on syntax before queueing behind other writes
            return await self._write(op)
        except Exception as exc:
            if getattr(exc, "code", None) != "blob_not_found":
                # Refused (a taken route, a quota...): the blob written for this
                # upload must not stay on disk with no version to account for it
                # (collect keeps it if a version uses it, whoever wrote that).
                await self._collect([digest])
            raise

    async def code_usage(self, tenant_id: str) -> int:
        return await self._read(lambda c: catalog.code_usage(c, tenant_id))

    async def get_function(self, tenant_id: str, name: str) -> FunctionInfo:
        return await self._read(lambda c: catalog.get_function(c, tenant_id, name))

    async def find_function(self, name: str) -> FunctionInfo | None:
        return await self._read(lambda c: catalog.find_function(c, name))

    async def list_functions(self, tenant_id: str | None = None) -> list[FunctionInfo]:
        return await self._read(lambda c: catalog.list_functions(c, tenant_id))

    async def get_version(
        self, tenant_id: str, name: str, version: int | None = None
    ) -> FunctionVersion:
        return await self._read(lambda c: catalog.get_version(c, tenant_id, name, version))

    async def list_versions(self, tenant_id: str, name: str) -> list[FunctionVersion]:
        return await self._read(lambda c: catalog.list_versions(c, tenant_id, name))

    async def rollback(self, tenant_id: str, name: str, version: int) -> FunctionVersion:
        now = time.time()
        return await self._write(lambda c: catalog.rollback(c, tenant_id, name, version, now))

    async def delete_function(self, tenant_id: str, name: str) -> list[str]:
        digests = await self._write(lambda c: catalog.delete_function(c, tenant_id, name))
        return await self._collect(digests)

    async def _collect(self, digests: list[str]) -> list[str]:
        """Delete the blobs among `digests` that no version uses; the ones deleted."""

        def collect(conn: sqlite3.Connection) -> list[str]:
            # A write of its own, so it is ordered with every put_function: one
            # that committed first keeps its blob; one that comes later finds
            # the blob gone (its op checks) and the upload stores it again.
            gone = catalog.unreferenced(conn, digests)
            for digest in gone:
                with contextlib.suppress(FileNotFoundError):
                    self.blob_path(digest).unlink()
            return gone

        return await self._write(collect)

    async def digest_in_use(self, digest: str, tenant_id: str | None = None) -> bool:
        return not await self._read(lambda c: catalog.unreferenced(c, [digest], tenant_id))

    async def all_routes(self) -> list[RouteEntry]:
        return await self._read(catalog.all_routes)

    # -- KV -------------------------------------------------------------------------------

    async def kv_get(self, tenant_id: str, key: str) -> bytes | None:
        return await self._read(lambda c: kv.get(c, tenant_id, key))

    async def kv_put(
        self, tenant_id: str, key: str, value: bytes, *, max_bytes: int, max_keys: int
    ) -> None:
        await self._write(
            lambda c: kv.put(c, tenant_id, key, value, max_bytes=max_bytes, max_keys=max_keys)
        )

    async def kv_delete(self, tenant_id: str, key: str) -> bool:
        return await self._write(lambda c: kv.delete(c, tenant_id, key))

    async def kv_list(
        self, tenant_id: str, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[str]:
        _check_limit(limit)
        return await self._read(lambda c: kv.list_keys(c, tenant_id, prefix, limit, after))

    async def kv_incr(
        self, tenant_id: str, key: str, delta: int = 1, *, max_bytes: int, max_keys: int
    ) -> int:
        return await self._write(
            lambda c: kv.incr(c, tenant_id, key, delta, max_bytes=max_bytes, max_keys=max_keys)
        )

    async def kv_usage(self, tenant_id: str) -> tuple[int, int]:
        return await self._read(lambda c: kv.usage(c, tenant_id))

    # -- invocation records ---------------------------------------------------------------

    async def insert_invocation(self, rec: InvocationRecord) -> None:
        await self._write(lambda c: records.insert_invocation(c, rec), key=("start", rec.id))

    async def finish_invocation(
        self, rec: InvocationRecord, lines: Sequence[NewLogLine] = (), *, alone: bool = False
    ) -> None:
        queued = self._pending.pop(("start", rec.id), None)
        if queued is not None and not queued[1].done():
            queued[1].set_result(None)  # the upsert below writes the whole record
        batch = list(lines)

        def op(c: sqlite3.Connection) -> None:
            if batch:
                logs.append(c, batch, self._scopes, fts=self._fts)
            records.finish_invocation(c, rec)

        if len(batch) > INLINE_MAX_LINES or not self._writer_idle():
            await self._write(op)
        elif alone:
            self._write_inline(op)
        else:
            await self._write_on_loop(op)

    def _writer_idle(self) -> bool:
        return (
            self._writer is not None
            and not self._pending
            and not self._pending_bulk
            and (self._flusher is None or self._flusher.done())
        )

    async def _write_on_loop(self, op: Callable[[sqlite3.Connection], None]) -> None:
        """A small write that waits for the end of this turn of the event loop and
        goes, with every other one that came meanwhile, in one transaction on the
        loop's thread (group commit without the two thread hand-offs and the GIL
        ping-pong of the writer thread; measured below in docs/performance.md)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._on_loop.append((op, fut))
        if len(self._on_loop) == 1:
            asyncio.get_running_loop().call_soon(self._flush_on_loop)
        await fut

    def _flush_on_loop(self) -> None:
        batch, self._on_loop = self._on_loop, []
        if not self._writer_idle():
            # The writer thread took work meanwhile and owns the connection:
            # these go with its next batch.
            for op, fut in batch:
                self._pending[fut] = (op, fut)
            if self._flusher is None or self._flusher.done():
                self._flusher = asyncio.create_task(self._flush())
            return
        outcomes = self._in_write_batch([op for op, _ in batch])
        self._note_commits(0)
        _resolve(batch, outcomes)

    def _write_inline(self, op: Callable[[sqlite3.Connection], None]) -> None:
        """One small write on the event loop's thread, while the writer thread is idle.

        With one invocation in flight there is nothing to batch with, and the
        two thread hand-offs cost more than the write (measured: ~0.2 ms of
        the ~0.33 ms a record took). The connection is the writer's; it is
        never used by two threads at once because the writer thread has
        nothing queued or running (``_writer_idle``), and checkpoints, which
        may fsync, always run in the writer thread (``_note_commits``).
        """
        self.writes += 1
        self._in_write(op)
        self._note_commits(1)

    async def get_invocation(self, invocation_id: str) -> InvocationRecord:
        return await self._read(lambda c: records.get_invocation(c, invocation_id))

    async def list_invocations(
        self,
        *,
        tenant_id: str | None = None,
        function: str | None = None,
        outcome: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[InvocationRecord], str | None]:
        _check_limit(limit)
        return await self._read(
            lambda c: records.list_invocations(
                c,
                tenant_id=tenant_id,
                function=function,
                outcome=outcome,
                since=since,
                until=until,
                limit=limit,
                cursor=cursor,
            )
        )

    # -- log lines ------------------------------------------------------------------------

    async def append_logs(self, lines: Sequence[NewLogLine]) -> None:
        if lines:
            batch = list(lines)
            await self._write(
                lambda c: logs.append(c, batch, self._scopes, fts=self._fts), bulk=True
            )

    async def query_logs(
        self,
        *,
        tenant_id: str | None = None,
        function: str | None = None,
        invocation_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        level_min: str | None = None,
        q: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[LogLine], str | None]:
        _check_limit(limit)
        return await self._read(
            lambda c: logs.query(
                c,
                fts=self._fts,
                tenant_id=tenant_id,
                function=function,
                invocation_id=invocation_id,
                since=since,
                until=until,
                level_min=level_min,
                q=q,
                limit=limit,
                cursor=cursor,
            )
        )

    async def last_log_id(self) -> int:
        def op(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT coalesce(max(id), 0) FROM logs").fetchone()
            return int(row[0])

        return await self._read(op)

    async def logs_after(
        self,
        *,
        tenant_id: str | None,
        function: str,
        after_id: int,
        limit: int = 1000,
        level_min: str | None = None,
        q: str | None = None,
    ) -> list[LogLine]:
        _check_limit(limit)
        return await self._read(
            lambda c: logs.after(
                c,
                fts=self._fts,
                tenant_id=tenant_id,
                function=function,
                after_id=after_id,
                limit=limit,
                level_min=level_min,
                q=q,
            )
        )

    async def enforce_retention(
        self,
        *,
        max_lines_per_function: int,
        max_age_s: float,
        batch: int = 10_000,
        max_records: int = 0,
    ) -> int:
        cutoff = time.time() - max_age_s
        return await self._write(
            lambda c: records.enforce_retention(
                c,
                max_lines=max_lines_per_function,
                cutoff=cutoff,
                budget=batch,
                max_records=max_records,
            ),
            bulk=True,
        )


def _check_limit(limit: int) -> None:
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")


def _translate(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.Error):
        return StoreError("storage_error", f"database error: {exc}")
    return exc


def _resolve(
    batch: Sequence[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any]]],
    outcomes: Sequence[tuple[bool, Any]],
) -> None:
    """Hand each write of a batch its own result or exception."""
    for (_, fut), (ok, value) in zip(batch, outcomes, strict=True):
        if fut.done():
            continue  # its caller was cancelled; the write happened anyway
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)
