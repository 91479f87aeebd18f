"""One invocation from start to record: admission, code, jail, logs, response."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog
from starlette.responses import Response

from jail import Invocation, JailResult, JailRunner, Limits
from jail.pool import WarmPool

from .config import Settings
from .errors import error_response
from .logbus import LogBudget
from .metrics import Metrics
from .scheduler import ClientGone, Rejected, Scheduler
from .store import FunctionVersion, InvocationRecord, NewLogLine, NotFound, Store
from .upload import unpack_bundle

log = structlog.get_logger("nsfaas.invoke")

STATUS_BY_OUTCOME = {
    "error": 500,
    "timeout": 504,
    "oom": 502,
    "killed": 502,
    "output_limit": 502,
    "bad_response": 502,
    "rejected": 429,
    "jail_failure": 503,
}
MESSAGES = {
    "error": "the function raised an error",
    "timeout": "the function timed out",
    "oom": "the function ran out of memory",
    "killed": "the function was killed",
    "output_limit": "the function's output exceeded its limit",
    "bad_response": "the function returned an invalid response",
    "rejected": "too many invocations in flight; retry later",
    "jail_failure": "the sandbox failed to start; retry later",
}


LOG_CHUNK = 50  # log lines per store write
MAX_RECORDED_PATH = 2048  # characters of the request path kept in an invocation record
# An invocation's "running" record is written only once it has run this long:
# most end within milliseconds, and writing their record twice (running, then
# finished) costs the store a second transaction for a state nobody could see.
RUNNING_RECORD_AFTER_S = 0.1
# What a record says of an invocation the gateway's shutdown ended (as the
# store says of one a crash of the gateway left running).
GATEWAY_STOPPED = ("GatewayStopped", "the gateway stopped during this invocation")


def new_invocation_id() -> str:
    # Time-ordered prefix (ms) so ids sort roughly by start; random tail.
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"


PROBATION_BOXES = 10  # a boxed function's next limit re-boxes it for this many boxes' time
# Each box entered on probation lasts twice the one before, up to penalty_s
# times 2 ** PENALTY_DOUBLINGS (60 s → 16 min): a CPU loop called over and over
# otherwise had one call at the full quota every minute, and the good calls
# that overlapped it had a p99 of ~59 ms in the soak, against ~20 ms.
PENALTY_DOUBLINGS = 4


def _strike_key(tenant_id: str, name: str, version: int) -> str:
    return f"{tenant_id}/{name}@{version}"


def code_key(tenant_id: str, digest: str) -> str:
    """The name of a tenant's unpacked copy of some code (jail dir/code/<key>)."""
    return f"{digest}.{tenant_id}"


@dataclass(frozen=True, slots=True)
class Call:
    """An invocation request, already authenticated and size-checked."""

    method: str
    path: str
    query_string: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    path_params: dict[str, str]
    trigger: str = "http"
    depth: int = 0
    # Returns once the caller has gone away (its connection closed): awaited
    # only while the call waits in the scheduler's queue, which it then leaves.
    client_gone: Callable[[], Awaitable[object]] | None = None


class Invoker:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        runner: JailRunner | None,
        pool: WarmPool | None,
        scheduler: Scheduler,
        metrics: Metrics,
        on_logs: Callable[[list[tuple[str, str]]], None] = lambda scopes: None,
        proxy_dir_for: Callable[[str], Any] | None = None,
        log_budget: LogBudget | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.pool = pool
        self.scheduler = scheduler
        self.metrics = metrics
        self.on_logs = on_logs
        self.log_budget = log_budget
        self.unavailable_reason: str | None = None
        self._code_locks: dict[str, asyncio.Lock] = {}
        self._unpacked: set[str] = set()  # code keys known to be on disk: no stat per call
        self._code_users: Counter[str] = Counter()  # invocations admitted, per code key
        self._doomed: set[str] = set()  # code keys whose versions were deleted
        # Per version: (invocations in a row that ended at a limit, when the last
        # did, how many boxes in a row it went back into on probation).
        self._strikes: dict[str, tuple[int, float, int]] = {}
        self._removals: set[asyncio.Task[None]] = set()
        # The task of every invocation waiting for a slot or running (shutdown
        # ends them: stop_all), and the ones stop_all has cancelled.
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._stopped: set[str] = set()
        self.stopping = False

    def stop_all(self) -> int:
        """Shutdown: end every invocation still waiting or running (a running
        one's jail is killed, as for any cancelled call); each is answered and
        recorded as ``killed`` with GATEWAY_STOPPED, and calls that arrive from
        now on are answered so without running. How many were ended."""
        self.stopping = True
        for inv_id, task in list(self._running.items()):
            if inv_id not in self._stopped:
                self._stopped.add(inv_id)
                task.cancel(GATEWAY_STOPPED[1])
        return len(self._stopped)

    def throttled(self, fv: FunctionVersion) -> bool:
        """Whether this function version is in the penalty box (see Settings.penalty_*)."""
        s = self.settings
        key = _strike_key(fv.tenant_id, fv.name, fv.version)
        count, last, level = self._strikes.get(key, (0, 0.0, 0))
        if s.penalty_strikes <= 0 or count < s.penalty_strikes:
            return False
        return time.monotonic() - last < self._box_s(level)

    def _box_s(self, level: int) -> float:
        return float(self.settings.penalty_s * 2 ** min(level, PENALTY_DOUBLINGS))

    def _strike(self, record: InvocationRecord, result: JailResult, throttled: bool) -> None:
        """Count a limit outcome, or clear the count. Per version: a new version
        (the fix) starts clean. And a call that ran in the box neither counts
        nor extends it: on a tenth of the CPU a healthy call can time out, and
        counting that kept the box closed for as long as calls came."""
        key = _strike_key(record.tenant_id, record.function, record.version)
        if result.outcome in ("rejected", "jail_failure") or result.error_type in _NOT_RUN_BY_IT:
            return  # says nothing about the function's own behaviour
        # Limits only: a function that kills itself (a bug, SIGSEGV, its own
        # SIGTERM) or is cancelled (its caller went away) used nothing up.
        if result.outcome in ("timeout", "oom", "output_limit") or (
            result.outcome == "killed" and result.limit_name is not None
        ):
            if throttled:
                return  # the box ends _box_s after it began, or at a call that is fine
            count, last, level = self._strikes.get(key, (0, 0.0, 0))
            age = time.monotonic() - last
            if count >= self.settings.penalty_strikes:
                # Out of the box by time, not by a call that was fine: on
                # probation, its next limit puts it back at once (a CPU loop
                # called over and over got three calls at the full quota after
                # every box, and the soak's good calls fell behind), for twice
                # as long as the last box.
                if age >= PROBATION_BOXES * self._box_s(level):
                    count = level = 0
                else:
                    level += 1
            elif age >= self.settings.penalty_s:
                count = 0  # the earlier run of limits is old news
            self._strikes[key] = (count + 1, time.monotonic(), level)
            if count + 1 == self.settings.penalty_strikes:
                log.warning(
                    "function_throttled",
                    strikes=count + 1,
                    cpu_ms_per_sec=self.settings.penalty_cpu_ms_per_sec,
                )
        else:
            self._strikes.pop(key, None)

    def limits_for(self, fv: FunctionVersion, *, throttled: bool = False) -> Limits:
        s = self.settings
        cpu = s.cpu_ms_per_sec
        if throttled:
            cpu = min(cpu, s.penalty_cpu_ms_per_sec)
        return Limits(
            timeout_s=fv.config.timeout_s,
            memory_mb=fv.config.memory_mb,
            pids=s.pids,
            cpu_ms_per_sec=cpu,
            log_bytes=s.max_log_bytes,
            log_lines=s.max_log_lines,
            response_bytes=s.max_response_bytes,
            request_bytes=s.max_request_bytes,
            penalty_box=throttled,
        )

    async def code_dir(self, tenant_id: str, digest: str) -> Path:
        """The unpacked, precompiled code of a version: one directory per
        tenant and digest. Shared across tenants, a directory's timestamps told
        a tenant whether another had deployed exactly the same code (secrets in
        it included): a guess-and-check oracle. Raises NotFound if the code is
        gone (its function was deleted before it was ever unpacked)."""
        assert self.runner is not None
        runner = self.runner
        key = code_key(tenant_id, digest)
        path = runner.code_dir(key)
        if key in self._unpacked:
            return path
        lock = self._code_locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not path.exists():
                blob = await self.store.read_blob(digest)
                await asyncio.to_thread(runner.ensure_code, key, lambda p: unpack_bundle(blob, p))
        self._unpacked.add(key)
        return path

    def forget_code(self, tenant_id: str, digests: list[str]) -> list[asyncio.Task[None]]:
        """Remove the tenant's unpacked code of versions it no longer has: now
        if no invocation uses it, else when the last one that does ends (one
        that was running or queued when its function was deleted finishes on
        its code). A fixed grace of ~5 minutes kept every deleted copy that
        long: a delete-and-recreate loop held ~19 GB on disk."""
        tasks = []
        for digest in set(digests):
            key = code_key(tenant_id, digest)
            self._doomed.add(key)
            if not self._code_users[key]:
                tasks.append(self._schedule_removal(tenant_id, digest))
        return tasks

    def _schedule_removal(self, tenant_id: str, digest: str) -> asyncio.Task[None]:
        task = asyncio.create_task(self._remove_code(tenant_id, digest))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        return task

    async def _remove_code(self, tenant_id: str, digest: str) -> None:
        if self.runner is None:
            return
        key = code_key(tenant_id, digest)
        async with self._code_locks.setdefault(key, asyncio.Lock()):
            if key not in self._doomed or self._code_users[key]:
                return  # removed already, or in use again: its last user removes it
            self._doomed.discard(key)
            if await self.store.digest_in_use(digest, tenant_id):
                return  # the same code was uploaded again meanwhile
            self._unpacked.discard(key)
            await asyncio.to_thread(self.runner.remove_code, key)
        self._code_locks.pop(key, None)

    @contextlib.contextmanager
    def _using_code(self, tenant_id: str, digest: str) -> Iterator[None]:
        """Counts an invocation from admission to its end as a user of its code."""
        key = code_key(tenant_id, digest)
        self._code_users[key] += 1
        try:
            yield
        finally:
            self._code_users[key] -= 1
            if not self._code_users[key]:
                del self._code_users[key]
                if key in self._doomed:
                    self._schedule_removal(tenant_id, digest)

    async def sweep_code(self) -> None:
        """At start: remove unpacked code its tenant no longer has (removals
        that a stop or a crash cut short, and shared directories of old)."""
        if self.runner is None:
            return
        root = self.runner.code_dir(code_key("t", "0" * 64)).parent
        try:
            names = await asyncio.to_thread(lambda: [p.name for p in root.iterdir()])
        except OSError:
            return
        for name in names:
            digest, dot, tenant_id = name.partition(".")
            if dot and len(digest) == 64 and await self.store.digest_in_use(digest, tenant_id):
                continue
            if len(digest) == 64:
                await asyncio.to_thread(self.runner.remove_code, name)

    def cancel_removals(self) -> None:
        for task in list(self._removals):
            task.cancel()

    def pool_key(self, fv: FunctionVersion, *, throttled: bool = False) -> str:
        # A throttled function's workers have the smaller CPU quota in their
        # cgroup: a key of their own (switching retires the other's workers).
        suffix = "+throttled" if throttled else ""
        return f"{fv.tenant_id}/{fv.name}@{fv.version}:{fv.digest}{suffix}"

    async def prewarm(self, fv: FunctionVersion) -> None:
        """A version became active: unpack its code now (a call queued when its
        function is deleted then still finds it, and the first call is not
        slowed by it), and start the configured minimum of warm workers."""
        if self.runner is None:
            return
        try:
            code = await self.code_dir(fv.tenant_id, fv.digest)
        except (NotFound, OSError) as exc:  # deleted meanwhile, or a disk error: the call retries
            log.warning("code_unpack_failed", function=fv.name, error=str(exc))
            return
        n = self.settings.warm_min_workers
        if self.pool is None or n <= 0:
            return
        spec = self.runner.spec(code, fv.config.entrypoint, self.limits_for(fv))
        self.pool.prewarm(self.pool_key(fv), spec, n)

    async def invoke(self, fv: FunctionVersion, call: Call) -> tuple[JailResult, str]:
        """Run one invocation and record it. Never raises for function behaviour."""
        result, inv_id, report = await self.invoke_reporting_later(fv, call)
        report()
        return result, inv_id

    async def invoke_reporting_later(
        self, fv: FunctionVersion, call: Call
    ) -> tuple[JailResult, str, Callable[[], None]]:
        """``invoke``, with its metrics and ``invocation_finished`` line left to
        the returned callable (the HTTP path calls it after the response is
        sent). The record and logs are written before this returns."""
        inv_id = new_invocation_id()
        structlog.contextvars.bind_contextvars(
            invocation_id=inv_id, function=fv.name, version=fv.version, tenant=fv.tenant_id
        )
        throttled = self.throttled(fv)
        limits = self.limits_for(fv, throttled=throttled)
        record = InvocationRecord(
            id=inv_id,
            tenant_id=fv.tenant_id,
            function=fv.name,
            version=fv.version,
            trigger=call.trigger,
            method=call.method,
            # The function gets the whole path; the record keeps its head: an
            # anonymous caller of a public function sent 60 KB paths and grew
            # the store by ~5 MB a second.
            path=call.path[:MAX_RECORDED_PATH],
            started_at=time.time(),
            timeout_s=limits.timeout_s,
            memory_mb=limits.memory_mb,
            request_bytes=len(call.body),
        )
        inserted = _RunningRecord(self.store, record)
        t0 = time.monotonic()
        result: JailResult
        task = asyncio.current_task()
        try:
            if self.runner is None:
                result = JailResult(
                    outcome="jail_failure",
                    error_type="JailUnavailable",
                    error_message=self.unavailable_reason or "jails are unavailable",
                )
            elif self.stopping or task is None:
                result = _gateway_stopped()
            else:
                self._running[inv_id] = task
                try:
                    with self._using_code(fv.tenant_id, fv.digest):
                        result = await self._run(fv, call, inv_id, limits, throttled, inserted)
                finally:
                    del self._running[inv_id]
        except Rejected as exc:
            result = JailResult(outcome="rejected", error_type="Rejected", error_message=exc.reason)
        except ClientGone:
            # Dropped from the queue: it never ran (no start, no strike).
            result = JailResult(
                outcome="killed", error_type="ClientGone", error_message="the client went away"
            )
        except Exception as exc:
            # A bug of ours: the caller still gets its invocation id and the
            # record is finished, never left "running".
            log.exception("invocation_failed")
            result = JailResult(
                outcome="jail_failure",
                error_type=type(exc).__name__,
                error_message="internal error",
            )
        except asyncio.CancelledError:
            ours = inv_id in self._stopped
            self._stopped.discard(inv_id)
            if not (ours and task is not None and task.uncancel() == 0):
                # Cancelled by someone else (the server gave up on the request):
                # recorded, and the cancellation goes on.
                result = JailResult(
                    outcome="killed",
                    error_type="GatewayStopped" if ours else "Cancelled",
                    error_message=GATEWAY_STOPPED[1] if ours else "the client went away",
                )
                report = await asyncio.shield(
                    self._record(record, result, t0, inserted, throttled)
                )
                report()
                raise
            # Ended by stop_all: answered and recorded like any other outcome.
            result = _gateway_stopped()
        report = await self._record(record, result, t0, inserted, throttled)
        self._strike(record, result, throttled)
        return result, inv_id, report

    async def _run(
        self,
        fv: FunctionVersion,
        call: Call,
        inv_id: str,
        limits: Limits,
        throttled: bool,
        inserted: _RunningRecord,
    ) -> JailResult:
        assert self.runner is not None
        key = f"{fv.tenant_id}/{fv.name}"
        self.metrics.queued.set(self.scheduler.queued)
        async with self.scheduler.slot(key, nested=call.depth > 0, gone=call.client_gone):
            # Only a call that runs gets a "running" record: under a deep queue
            # every call waits past RUNNING_RECORD_AFTER_S, and a second store
            # write per call there made the gateway slower the further behind it
            # was (c=128: 0.90x the rate of c=8 with it, 0.98x without).
            inserted.arm()
            self.metrics.in_flight.inc()
            try:
                try:
                    code = await self.code_dir(fv.tenant_id, fv.digest)
                except NotFound:
                    return JailResult(
                        outcome="jail_failure",
                        error_type="FunctionDeleted",
                        error_message="the function was deleted before its code was unpacked",
                    )
                spec = self.runner.spec(code, fv.config.entrypoint, limits)
                inv = Invocation(
                    invocation_id=inv_id,
                    function=fv.name,
                    version=fv.version,
                    tenant=fv.tenant_id,
                    method=call.method,
                    path=call.path,
                    query_string=call.query_string,
                    headers=call.headers,
                    path_params=call.path_params,
                    body=call.body,
                    env=dict(fv.config.env),
                    egress_allow=fv.config.egress_allow,
                    depth=call.depth,
                    log_gate=(
                        functools.partial(self.log_budget.allow, fv.tenant_id)
                        if self.log_budget is not None
                        else None
                    ),
                )
                if self.pool is not None:
                    key = self.pool_key(fv, throttled=throttled)
                    return await self.pool.run(key, spec, inv)
                return await self.runner.run(spec, inv)
            finally:
                self.metrics.in_flight.dec()

    async def _record(
        self,
        record: InvocationRecord,
        result: JailResult,
        t0: float,
        inserted: _RunningRecord,
        throttled: bool = False,
    ) -> Callable[[], None]:
        wall_ms = (time.monotonic() - t0) * 1000.0
        inserted.stop()
        lines = [
            NewLogLine(
                ts=e.ts,
                invocation_id=record.id,
                tenant_id=record.tenant_id,
                function=record.function,
                level=e.level,
                message=e.message,
                fields={**e.fields, "stream": e.stream} if e.stream != "ctx" else e.fields,
            )
            for e in result.logs
        ]
        truncated = result.logs_truncated
        if result.logs_dropped:
            # The tenant's log budget refused them as they came (Invocation.log_gate),
            # before they were decoded.
            dropped = result.logs_dropped
            s = self.settings
            lines.append(
                _notice(
                    record,
                    f"[nsfaas] {dropped} log lines dropped: this tenant's functions "
                    f"logged more than {s.log_rate_bytes} bytes per second "
                    f"(bursts up to {s.log_burst_bytes})",
                    dropped=dropped,
                )
            )
            self.metrics.log_lines_dropped.inc(dropped)
            truncated = True
        if throttled:
            s = self.settings
            lines.insert(
                0,
                _notice(
                    record,
                    f"[nsfaas] throttled to {s.penalty_cpu_ms_per_sec} ms of CPU per second: "
                    f"{s.penalty_strikes} or more invocations in a row ended at a limit "
                    f"(lifted by one that does not, or after {s.penalty_s:g} s)",
                    ts=record.started_at,
                    throttled=True,
                ),
            )
        if result.logs_truncated:
            lines.append(
                _notice(
                    record,
                    "[nsfaas] log output truncated: the invocation exceeded its log limit",
                    truncated=True,
                )
            )
            self.metrics.log_lines_dropped.inc()
        status = result.status if result.outcome == "ok" else STATUS_BY_OUTCOME[result.outcome]
        ran = result.outcome not in ("rejected", "jail_failure") and not (
            result.outcome == "killed" and result.error_type in _NEVER_STARTED
        )
        final = replace(
            record,
            status=status,
            outcome=result.outcome,
            wall_ms=round(wall_ms, 3),
            cpu_ms=result.cpu_ms,
            peak_memory_mb=result.peak_memory_mb,
            start=result.start if ran else None,
            response_bytes=len(result.body),
            log_lines=len(lines),
            logs_truncated=truncated,
            error_type=result.error_type,
            error_message=result.error_message,
            limit_name=result.limit_name,
            limit_value=result.limit_value,
        )
        # In chunks: one chatty invocation's thousands of lines must not hold the
        # store's single writer (and every other invocation's record) for long.
        # The last chunk goes with the record: one write for a typical call.
        last = max(0, len(lines) - LOG_CHUNK)
        for i in range(0, last, LOG_CHUNK):
            await self.store.append_logs(lines[i : min(i + LOG_CHUNK, last)])
        alone = self.scheduler.running <= 1 and self.scheduler.queued == 0
        await self.store.finish_invocation(final, lines[last:], alone=alone)
        await inserted.written()  # done by now (or replaced by the finish while queued)
        if lines:
            self.on_logs([(record.tenant_id, record.function)])

        def report() -> None:
            self.metrics.invocations.labels(record.function, result.outcome).inc()
            self.metrics.duration.labels(record.function).observe(wall_ms / 1000.0)
            if ran:
                self.metrics.starts.labels(result.start).inc()
            log.info(
                "invocation_finished",
                method=record.method,
                path=record.path,
                outcome=result.outcome,
                status=status,
                wall_ms=round(wall_ms, 2),
                cpu_ms=result.cpu_ms,
                start=final.start,
                log_lines=len(lines),
                limit=result.limit_name,
            )

        return report


# Killed by no doing of the function's own: no strike, nor a strike's reset.
_NOT_RUN_BY_IT = frozenset({"ClientGone", "GatewayStopped"})
# Killed before a jail was asked for anything: the record has no start.
_NEVER_STARTED = frozenset({"ClientGone"})


def _gateway_stopped() -> JailResult:
    return JailResult(
        outcome="killed", error_type=GATEWAY_STOPPED[0], error_message=GATEWAY_STOPPED[1]
    )


def _notice(
    record: InvocationRecord, message: str, *, ts: float | None = None, **fields: Any
) -> NewLogLine:
    """A line of the gateway's own in an invocation's log (stream "runtime")."""
    return NewLogLine(
        ts=time.time() if ts is None else ts,
        invocation_id=record.id,
        tenant_id=record.tenant_id,
        function=record.function,
        level="warning",
        message=message,
        fields={**fields, "stream": "runtime"},
    )


class _RunningRecord:
    """The "running" record of an invocation that runs over RUNNING_RECORD_AFTER_S
    (counted from its admission: a call waiting in the queue has no record yet).

    The store's single writer keeps insert-then-finish in order; a finish that
    finds the insert still queued replaces it, and a late insert never
    overwrites a finished record (the insert does nothing on conflict).
    """

    def __init__(self, store: Store, record: InvocationRecord) -> None:
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._store = store
        self._record = record

    def arm(self) -> None:
        """The invocation was admitted and starts now (always before ``stop``)."""
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                RUNNING_RECORD_AFTER_S, self._start
            )

    def _start(self) -> None:
        self._task = asyncio.create_task(self._store.insert_invocation(self._record))

    def stop(self) -> None:
        """The invocation ended: no running record from now on."""
        if self._timer is not None:
            self._timer.cancel()

    async def written(self) -> None:
        if self._task is not None:
            await self._task


def to_http(result: JailResult, inv_id: str) -> Response:
    """The HTTP answer for an invocation outcome (a HEAD takes the GET's and
    drops its body: app.py)."""
    if result.outcome == "ok":
        assert result.status is not None
        # 204 and 304 never carry a body (HTTP/1.1 framing): it is dropped; a
        # 205 has none either, but says so (Content-Length: 0, RFC 9110 §15.3.6).
        bodiless = result.status in (204, 304)
        empty = bodiless or result.status == 205
        resp = Response(b"" if empty else result.body, status_code=result.status)
        if bodiless:
            del resp.headers["content-length"]
        for k, v in result.headers:
            resp.headers.append(k, v)
        resp.headers["X-Invocation-Id"] = inv_id
        return resp
    extra = {"Retry-After": "1"} if result.outcome == "rejected" else None
    detail: dict[str, Any] = {}
    if result.limit_name:
        detail = {"limit": result.limit_name, "limit_value": result.limit_value}
    message = MESSAGES[result.outcome]
    if result.error_type == "JailUnavailable" and result.error_message:
        # The operator's problem, not the function's: say exactly what is missing.
        message = f"{message}: {result.error_message}"
    return error_response(
        STATUS_BY_OUTCOME[result.outcome],
        result.outcome,
        message,
        invocation_id=inv_id,
        headers=extra,
        detail=detail,
    )
