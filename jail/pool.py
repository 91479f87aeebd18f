"""Warm path: idle jailed workers per function version, reused across invocations.

A warm worker is a jail whose runtime has already imported the function; each
invocation still runs in a fresh child forked from it (see runtime/bootstrap.py),
so what one invocation may see of an earlier one is exactly: nothing in memory
(fresh fork), nothing in /tmp (wiped between invocations), no leftover process
(all killed), no fd (closed in the child). What the function's *import* did
happens once per worker, as with Lambda's init phase.

A worker that ends an invocation broken (timeout, killed runtime, protocol
error) is never reused: the next invocation gets a fresh one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .command import JailConfig, JailSpec
from .errors import WorkerError, WorkerGone
from .proxy import ProxyHandler
from .result import JailResult
from .worker import Invocation, Worker, start_within_timeout

HOT_S = 1.0  # called again within this many seconds: keep a second warm worker
IDLE_WATCH_S = 1.0  # how often idle workers' CPU use is looked at (watch_idle)
IDLE_CPU_MS = 100.0  # CPU between two looks that counts an idle worker as busy
IDLE_BUSY_LOOKS = 2  # busy at this many looks in a row: closed
IDLE_CPU_MS_TOTAL = 400.0  # CPU since its first look that closes it


@dataclass(slots=True)
class PoolStats:
    started: int = 0
    reused: int = 0
    replaced: int = 0  # workers that died or broke and were dropped
    evicted: int = 0  # idle workers closed by the reaper or the memory budget
    busy_idle: int = 0  # idle workers closed because their jail used CPU (watch_idle)


@dataclass(slots=True)
class _Key:
    idle: collections.deque[Worker] = field(default_factory=collections.deque)
    busy: int = 0
    starting: int = 0
    min_idle: int = 0
    spec: JailSpec | None = None
    last_call: float = -1e9
    call_ms: float = 0.0  # moving average of its warm calls (0: none yet)
    # Calls waiting for a busy worker to come back (instead of a cold start).
    waiters: collections.deque[asyncio.Future[Worker]] = field(default_factory=collections.deque)


class WarmPool:
    """Keyed by function version: a new version never reuses an old worker."""

    def __init__(
        self,
        config: JailConfig,
        *,
        max_idle_per_key: int = 4,
        idle_s: float = 120.0,
        memory_budget_mb: int = 2048,
        on_change: Callable[[int], None] = lambda n: None,
        proxy_handler: ProxyHandler | None = None,
        proxy_rate_per_s: float = 200.0,
    ) -> None:
        self.proxy_rate_per_s = proxy_rate_per_s
        self.config = config
        self.proxy_handler = proxy_handler
        self.max_idle_per_key = max_idle_per_key
        self.idle_s = idle_s
        self.memory_budget_mb = memory_budget_mb
        self.on_change = on_change
        self.stats = PoolStats()
        self._keys: dict[str, _Key] = {}
        self._current: dict[str, str] = {}  # function -> its current version key
        self._closing: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self._start_ms = 0.0  # moving average of worker start times (0: none yet)

    @property
    def idle_workers(self) -> int:
        return sum(len(k.idle) for k in self._keys.values())

    def start(self) -> None:
        self._reaper = asyncio.create_task(self._reap_loop())

    async def run(self, key: str, spec: JailSpec, inv: Invocation) -> JailResult:
        spec = replace(spec, mode="warm")
        self._retire_old_versions(key)
        entry = self._keys.setdefault(key, _Key())
        t0 = time.monotonic()
        worker = None
        while entry.idle:
            # Least recently used first: a worker that just answered is still
            # cleaning up and forking its next child; another one is ready now.
            cand = entry.idle.popleft()
            if cand.alive:
                worker = cand
                break
            self.stats.replaced += 1
            self._close_later(cand)
        wait = self._wait_budget(entry) if worker is None else 0.0
        kind = "warm"
        entry.busy += 1  # before any wait: a worker handed over meanwhile is counted
        try:
            if wait > 0:
                self._scale_out(key, entry, spec)
                worker = await self._wait_for_worker(entry, wait)
            if worker is None:
                kind = "cold"
                worker = self._new_worker(spec)
                failed = await start_within_timeout(worker, t0)
                if failed is not None:
                    return failed
                self._started_in(time.monotonic() - t0)
            else:
                self.stats.reused += 1
            deadline = t0 + spec.limits.timeout_s if kind == "cold" else None
            t1 = time.monotonic()
            try:
                result = await worker.invoke(inv, start=kind, deadline=deadline)
            except WorkerGone:
                # It retired (or died idle) before taking the request: nothing
                # ran, so the invocation goes to a new worker (once).
                self.stats.replaced += 1
                kind = "cold"
                worker = self._new_worker(spec)
                failed = await start_within_timeout(worker, t0)
                if failed is not None:
                    return failed
                result = await worker.invoke(inv, start=kind, deadline=t0 + spec.limits.timeout_s)
            if kind == "warm":
                entry.call_ms = _average(entry.call_ms, (time.monotonic() - t1) * 1000.0)
        finally:
            entry.busy -= 1
        if worker.alive and self._current.get(_fn(key)) == key and not self._closed:
            if self._hand_over(entry, worker):
                pass
            elif len(entry.idle) < self.max_idle_per_key:
                entry.idle.append(worker)
                self._enforce_budget()
            else:
                self._close_later(worker)
        else:
            if not worker.alive and worker.load_error is None:
                self.stats.replaced += 1
            self._close_later(worker)
        self._hot_spare(key, entry, spec, t0)
        self.on_change(self.idle_workers)
        return replace(result, wall_ms=(time.monotonic() - t0) * 1000.0)

    def _new_worker(self, spec: JailSpec) -> Worker:
        self.stats.started += 1
        return Worker(
            self.config,
            spec,
            proxy_handler=self.proxy_handler,
            proxy_rate_per_s=self.proxy_rate_per_s,
        )

    def _wait_budget(self, entry: _Key) -> float:
        """How long a call may wait for a busy worker of its version (seconds).

        Only when one will come back (a call is running or a worker starting)
        and this version's calls are much shorter than starting a worker: then
        waiting is faster on average than a cold start, and it does not add a
        jail. Bounded by half a start, at most 250 ms.
        """
        if not (entry.busy or entry.starting) or not entry.call_ms or not self._start_ms:
            return 0.0
        if entry.call_ms * 3 >= self._start_ms:
            return 0.0
        return min(self._start_ms / 2, 250.0) / 1000.0

    async def _wait_for_worker(self, entry: _Key, budget_s: float) -> Worker | None:
        fut: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
        entry.waiters.append(fut)
        try:
            return await asyncio.wait_for(fut, budget_s)
        except TimeoutError:
            return None
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # Handed a worker just as the caller went away: it stays in use.
                worker = fut.result()
                if not self._hand_over(entry, worker):
                    entry.idle.append(worker)
                    self._enforce_budget()
            raise
        finally:
            with contextlib.suppress(ValueError):
                entry.waiters.remove(fut)

    def _scale_out(self, key: str, entry: _Key, spec: JailSpec) -> None:
        """Every worker of this version is busy and a call waits for one: start
        one more in the background (the call takes whichever is free first).

        Without it a version whose quick calls rise to a steady concurrency
        above its workers would queue behind them for good: waiting is chosen
        over a cold start call by call, so nothing else adds a worker (hot
        spares stop at two). One start at a time, up to ``max_idle_per_key``
        workers; beyond that, calls wait or start cold as before.
        """
        held = entry.busy - 1 - len(entry.waiters)  # this call holds none yet
        if self._closed or entry.starting or len(entry.idle) + held >= self.max_idle_per_key:
            return
        self._start_in_background(key, entry, entry.spec or spec)

    def _hand_over(self, entry: _Key, worker: Worker) -> bool:
        """Give a free worker straight to the oldest waiting call, if any."""
        while entry.waiters:
            fut = entry.waiters.popleft()
            if not fut.done():
                worker.last_used = time.monotonic()
                fut.set_result(worker)
                return True
        return False

    def _started_in(self, seconds: float) -> None:
        self._start_ms = _average(self._start_ms, seconds * 1000.0)

    def _hot_spare(self, key: str, entry: _Key, spec: JailSpec, now: float) -> None:
        """A version called again within HOT_S gets a second worker, so calls
        alternate between two: each worker's cleanup and next fork (about a
        millisecond) then overlap with the other's call instead of delaying it."""
        hot = now - entry.last_call < HOT_S
        entry.last_call = now
        entry.spec = entry.spec or spec
        if not hot or self._closed or self._current.get(_fn(key)) != key:
            return
        if len(entry.idle) + entry.busy + entry.starting < min(2, self.max_idle_per_key):
            self._start_in_background(key, entry, entry.spec)

    def prewarm(self, key: str, spec: JailSpec, n: int) -> None:
        """Keep at least ``n`` idle workers for this version (started in the
        background now, and again by the reaper whenever one dies)."""
        spec = replace(spec, mode="warm")
        self._retire_old_versions(key)
        entry = self._keys.setdefault(key, _Key())
        entry.min_idle, entry.spec = n, spec
        self._top_up(key, entry)

    def _top_up(self, key: str, entry: _Key) -> None:
        if self._closed or entry.spec is None or self._current.get(_fn(key)) != key:
            return
        missing = entry.min_idle - len(entry.idle) - entry.starting
        for _ in range(max(0, missing)):
            self._start_in_background(key, entry, entry.spec)

    def _start_in_background(self, key: str, entry: _Key, spec: JailSpec) -> None:
        entry.starting += 1
        task = asyncio.create_task(self._start_idle(key, entry, spec))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _start_idle(self, key: str, entry: _Key, spec: JailSpec) -> None:
        worker = self._new_worker(spec)
        try:
            t0 = time.monotonic()
            async with asyncio.timeout(spec.limits.timeout_s):
                await worker.start()
            self._started_in(time.monotonic() - t0)
        except (TimeoutError, WorkerError):
            await worker.aclose(kill=True)
            return
        finally:
            entry.starting -= 1
        if worker.alive and not self._closed and self._current.get(_fn(key)) == key:
            if not self._hand_over(entry, worker):
                worker.last_used = time.monotonic()
                entry.idle.append(worker)
                # Hot spares and prewarmed workers count too: over the budget
                # they stayed until the next call of some version.
                self._enforce_budget()
                self.on_change(self.idle_workers)
        else:
            await worker.aclose()

    def _retire_old_versions(self, key: str) -> None:
        fn = _fn(key)
        old = self._current.get(fn)
        self._current[fn] = key
        if old is not None and old != key:
            entry = self._keys.get(old)
            if entry is not None:
                while entry.idle:
                    self._close_later(entry.idle.pop())
                if not entry.busy:
                    del self._keys[old]

    def _close_later(self, worker: Worker) -> None:
        task = asyncio.create_task(worker.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _enforce_budget(self) -> None:
        """While over the memory budget, close the least recently used idle
        worker of the tenant whose idle workers take the most memory. One LRU
        across tenants let one call of a tenant's 2 GB function close every
        other tenant's idle workers (their next calls cold, which they could
        see: a channel between tenants, and everyone's warm starts at one
        tenant's will). Now a tenant's workers only push out those of tenants
        that hold more than it does (max-min fairness): a tenant within its
        fair share keeps its warm workers whatever the others do."""
        while True:
            per_tenant: dict[str, int] = {}
            idle = [(w.last_used, k, w) for k, e in self._keys.items() for w in e.idle]
            for _, k, w in idle:
                per_tenant[_tenant(k)] = per_tenant.get(_tenant(k), 0) + w.spec.limits.memory_mb
            if sum(per_tenant.values()) <= self.memory_budget_mb or not idle:
                return
            fattest = max(per_tenant, key=lambda t: per_tenant[t])
            _, k, w = min((t for t in idle if _tenant(t[1]) == fattest), key=lambda t: t[0])
            self._keys[k].idle.remove(w)
            self.stats.evicted += 1
            self._close_later(w)

    async def _reap_loop(self) -> None:
        every = min(5.0, max(0.05, self.idle_s / 4))
        last = time.monotonic()
        while True:
            await asyncio.sleep(IDLE_WATCH_S)
            self.watch_idle()
            if time.monotonic() - last >= every:
                last = time.monotonic()
                self.reap()

    def watch_idle(self) -> None:
        """Close idle workers whose jail uses CPU. An idle jail waits: the
        zygote for a request, its pre-forked child on its stdin. But tenant
        code can run there before any request (at-fork hooks the module
        registered run in every forked child, as does a patch of the
        runtime it made at import) with no call in flight: no timeout, no
        concurrency cap and no penalty box saw 8 CPU burners per idle worker
        (load average 23, other tenants' calls 2-4x slower). Past
        IDLE_CPU_MS of CPU between two looks (IDLE_WATCH_S apart), or with a
        process in its slot that was not there at the last look, the worker is
        closed, and whatever it started with it, once it does so at two looks
        in a row or has used more than IDLE_CPU_MS_TOTAL since its first look
        (a burner busy at every other look adds up): one small busy look is
        the settling of its last call (the runtime's clean-up and the next
        child's fork can outlast IDLE_WATCH_S on a busy machine, and on v1 any
        wake-up counts a whole period, two or three with the counter's lag; a
        quiet worker was closed so now and then). (On cgroup v1 CPU use is
        counted in the CFS periods the slot ran in, SlotPool.cpu_ms: a sum
        over /proc missed a manager forking short burners whose exits it
        ignored, 355 ms of CPU a second. An idle jail starts no process.)"""
        slots = self.config.slots
        for entry in self._keys.values():
            for w in list(entry.idle):
                if w.slot is None:
                    continue
                if time.monotonic() - w.last_used < IDLE_WATCH_S:
                    # Its last call's child may not be reaped yet (its CPU then
                    # lands on the zygote), nor the next child's dry run done.
                    w.idle_cpu_mark = w.idle_cpu_base = None
                    w.idle_busy_looks = 0
                    continue
                pids = slots.pids_in(w.slot)
                used = slots.cpu_ms(w.slot)
                if used is None:
                    continue
                mark, w.idle_cpu_mark = w.idle_cpu_mark, (used, frozenset(pids))
                if mark is None or w.idle_cpu_base is None:
                    w.idle_cpu_base = used
                    continue
                busy = used - mark[0] > IDLE_CPU_MS or not mark[1] >= set(pids)
                w.idle_busy_looks = w.idle_busy_looks + 1 if busy else 0
                total = used - w.idle_cpu_base
                if w.idle_busy_looks >= IDLE_BUSY_LOOKS or total > IDLE_CPU_MS_TOTAL:
                    entry.idle.remove(w)
                    self.stats.busy_idle += 1
                    self._close_later(w)

    def reap(self) -> None:
        now = time.monotonic()
        for k, entry in list(self._keys.items()):
            for w in list(entry.idle):
                if not w.alive or (
                    now - w.last_used > self.idle_s and len(entry.idle) > entry.min_idle
                ):
                    entry.idle.remove(w)
                    if w.alive:
                        self.stats.evicted += 1
                    else:
                        self.stats.replaced += 1
                    self._close_later(w)
            if not entry.idle and not entry.busy and self._current.get(_fn(k)) != k:
                del self._keys[k]
            else:
                self._top_up(k, entry)  # replaces prewarmed workers that died
        self.on_change(self.idle_workers)

    def forget(self, function: str) -> None:
        """A function was deleted: drop its idle workers."""
        for k, entry in list(self._keys.items()):
            if _fn(k) == function:
                entry.min_idle = 0
                while entry.idle:
                    self._close_later(entry.idle.pop())
        self._current.pop(function, None)

    async def aclose(self) -> None:
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for entry in self._keys.values():
            while entry.idle:
                self._close_later(entry.idle.pop())
        if self._closing:
            await asyncio.gather(*list(self._closing), return_exceptions=True)
        self.on_change(0)


def _fn(key: str) -> str:
    return key.split("@", 1)[0]


def _tenant(key: str) -> str:
    """The tenant of a pool key (``tenant/name@version:digest``; a key
    without a tenant is its own)."""
    return key.split("/", 1)[0] if "/" in key else key


def _average(previous: float, ms: float) -> float:
    """A moving average that starts at its first sample (0 means none yet)."""
    return ms if not previous else 0.8 * previous + 0.2 * ms
