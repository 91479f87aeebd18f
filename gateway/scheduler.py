"""Admission control: a global, a per-tenant and a per-function concurrency cap,
one bounded queue.

Past ``max_concurrency`` running invocations, past ``tenant_concurrency`` of
one tenant's functions, or past ``function_concurrency`` of one function,
callers wait in a FIFO queue of at most ``queue_size`` for at
most ``queue_timeout_s``; a full queue or an expired wait is the ``rejected``
outcome (HTTP 429). Waiters hold no request body beyond the already capped one,
so the gateway's memory stays bounded.

A call that can run runs at once, whoever waits: waiters are granted the
moment a slot they can use frees up, so those left in the queue are all blocked
by a cap that also blocks the newcomer (the global one), or by their own
tenant's or function's cap, which is no reason to hold back a call of another.

One tenant can neither take every running slot (the tenant cap, below the
global one, leaves the rest to others) nor fill the queue: a tenant's waiters
are at most ``tenant_queue`` (3/4 of the queue), so another tenant's call can
still wait for a slot instead of being turned away.

A nested call (``ctx.invoke``) never waits: its caller holds a slot, and a
callee queued behind its own callers (a function that calls itself at its
cap, or chains filling the global cap) would wait until they time out. It
runs if both caps allow, or is rejected at once (the caller sees
``invoke_failed``).

A waiter whose client has gone (``gone``, awaited only while the call waits)
leaves the queue at once with ClientGone: a call nobody will read the answer
of must not run, nor hold a place in the queue; without this, requests sent
and abandoned at once queued work that held no connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable


class Rejected(Exception):
    """No slot within the queue limits; ``retry_after`` is a hint in seconds."""

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class ClientGone(Exception):
    """The caller went away while its call waited for a slot: it never ran."""


class Scheduler:
    def __init__(
        self,
        *,
        max_concurrency: int,
        function_concurrency: int,
        queue_size: int,
        queue_timeout_s: float,
        tenant_concurrency: int | None = None,
    ) -> None:
        self.max_concurrency = max(1, max_concurrency)
        self.function_concurrency = max(1, function_concurrency)
        self.tenant_concurrency = max(1, tenant_concurrency or self.max_concurrency)
        self.queue_size = queue_size
        self.tenant_queue = max(1, queue_size * 3 // 4)
        self.queue_timeout_s = queue_timeout_s
        self.running = 0
        self.per_function: collections.Counter[str] = collections.Counter()
        self.per_tenant: collections.Counter[str] = collections.Counter()
        self._queued: collections.Counter[str] = collections.Counter()  # waiters per tenant
        # One FIFO per function, each entry numbered in arrival order: a slot
        # that frees up goes to the earliest waiter whose caps allow it, found
        # among the functions' heads. One FIFO for all, scanned (and an entry
        # removed from it) at every release, made a call cost 44-52 us at 120
        # waiters of one function at its cap and 135-163 us at 500 (29-47 us
        # now, in a loop of the scheduler alone): the deeper behind, the slower.
        self._waiters: dict[str, collections.deque[_Entry]] = {}
        self._waiting = 0
        self._arrivals = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once nothing is running (used by graceful shutdown)."""
        await self._idle.wait()

    @property
    def queued(self) -> int:
        return self._waiting

    def _can_run(self, key: str) -> bool:
        return (
            self.running < self.max_concurrency
            and self.per_function[key] < self.function_concurrency
            and self.per_tenant[_tenant(key)] < self.tenant_concurrency
        )

    @contextlib.asynccontextmanager
    async def slot(
        self,
        key: str,
        *,
        nested: bool = False,
        gone: Callable[[], Awaitable[object]] | None = None,
    ) -> AsyncIterator[None]:
        """Hold a running slot for function ``key``, "tenant/function" (or raise
        Rejected). ``gone`` returns when the caller has gone away: a call still
        waiting then leaves the queue (ClientGone); one that runs is not stopped."""
        if nested:
            if not self._can_run(key):
                raise Rejected("no free slot for a nested call (nested calls do not wait)")
            self._grant(key)
        elif not self._can_run(key):
            if self._waiting >= self.queue_size:
                raise Rejected("the invocation queue is full")
            tenant = _tenant(key)
            if self._queued[tenant] >= self.tenant_queue:
                raise Rejected("this tenant's share of the invocation queue is full")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = _Entry(next(self._arrivals), key, fut)
            self._waiters.setdefault(key, collections.deque()).append(entry)
            self._waiting += 1
            self._queued[tenant] += 1
            watcher = asyncio.ensure_future(gone()) if gone is not None else None
            try:
                if watcher is None:
                    await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
                else:
                    await asyncio.wait(
                        (fut, watcher),
                        timeout=self.queue_timeout_s,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not fut.done():
                        if not watcher.done():
                            raise TimeoutError
                        self._unqueue(entry)
                        raise ClientGone
            except TimeoutError:
                if fut.done():
                    self._release(key)  # granted at the last moment: give it back
                else:
                    self._unqueue(entry)
                raise Rejected("timed out waiting for a free slot") from None
            except asyncio.CancelledError:
                if fut.done():
                    self._release(key)
                else:
                    self._unqueue(entry)
                raise
            finally:
                if watcher is not None:
                    if watcher.done() and not watcher.cancelled():
                        watcher.exception()  # retrieved: a failed watch counts as gone
                    watcher.cancel()
        else:
            self._grant(key)
        try:
            yield
        finally:
            self._release(key)

    def _grant(self, key: str) -> None:
        self.running += 1
        self.per_function[key] += 1
        self.per_tenant[_tenant(key)] += 1
        self._idle.clear()

    def _release(self, key: str) -> None:
        self.running -= 1
        self.per_function[key] -= 1
        tenant = _tenant(key)
        self.per_tenant[tenant] -= 1
        if not self.running:
            self._idle.set()
        if not self.per_function[key]:
            del self.per_function[key]
        if not self.per_tenant[tenant]:
            del self.per_tenant[tenant]
        self._wake()

    def _unqueue(self, entry: _Entry) -> None:
        queue = self._waiters[entry.key]
        if queue[0] is entry:
            queue.popleft()
        else:
            queue.remove(entry)  # left early (timeout, gone): rare
        if not queue:
            del self._waiters[entry.key]
        self._waiting -= 1
        tenant = _tenant(entry.key)
        self._queued[tenant] -= 1
        if not self._queued[tenant]:
            del self._queued[tenant]

    def _wake(self) -> None:
        """Grant slots to waiters in arrival order, skipping functions (and
        tenants) at their own cap: each grant looks at one head per function."""
        while self._waiting and self.running < self.max_concurrency:
            first: _Entry | None = None
            for key, queue in self._waiters.items():
                head = queue[0]
                if (first is None or head.n < first.n) and self._can_run(key):
                    first = head
            if first is None:
                return
            self._unqueue(first)
            if first.fut.done():  # never granted twice (nothing else resolves it)
                continue
            self._grant(first.key)
            first.fut.set_result(None)


class _Entry:
    __slots__ = ("fut", "key", "n")

    def __init__(self, n: int, key: str, fut: asyncio.Future[None]) -> None:
        self.n = n
        self.key = key
        self.fut = fut


def _tenant(key: str) -> str:
    return key.partition("/")[0]
