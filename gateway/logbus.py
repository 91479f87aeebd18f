"""Live log tails and the tenants' log budgets.

Tails: writers say which function logged; only that function's followers
wake and re-query the store (a store query per follower per write of any
function let 500 idle tails of a quiet function slow every other call 3x).
How many tails are open at once is capped, per tenant and in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import NewLogLine

Scope = tuple[str, str]  # (tenant id, function name)


class TooManyTails(Exception):
    """A tail over the per-tenant or overall cap."""


@dataclass(slots=True)
class _Topic:
    generation: int = 0
    followers: int = 0
    event: asyncio.Event = field(default_factory=asyncio.Event)


class LogBus:
    """Per function: a generation counter plus a one-shot event per generation.
    A follower compares generations, so it never misses a wake-up between two
    waits. Only functions someone follows are known here."""

    def __init__(self, *, max_tails: int = 256, max_tails_per_tenant: int = 16) -> None:
        self.closed = False
        self.max_tails = max_tails
        self.max_tails_per_tenant = max_tails_per_tenant
        self._topics: dict[Scope, _Topic] = {}
        self._per_tenant: dict[str, int] = {}
        self._tails = 0

    def notify(self, scopes: Iterable[Scope]) -> None:
        for scope in scopes:
            topic = self._topics.get(scope)
            if topic is not None:
                topic.generation += 1
                topic.event.set()
                topic.event = asyncio.Event()

    def generation(self, scope: Scope) -> int:
        topic = self._topics.get(scope)
        return topic.generation if topic is not None else 0

    def follow(self, scope: Scope, owner: object) -> None:
        """Count a tail of ``scope`` until ``owner`` (a token its response
        holds and drops when it ends) is gone. A lifetime, not a ``finally`` in
        the stream, is what counts: a stream cancelled before its first chunk
        never runs its ``finally``. TooManyTails past a cap."""
        tenant = scope[0]
        if self._tails >= self.max_tails:
            raise TooManyTails(f"{self._tails} live log tails are open (the limit)")
        if self._per_tenant.get(tenant, 0) >= self.max_tails_per_tenant:
            raise TooManyTails(
                f"this tenant has {self.max_tails_per_tenant} live log tails open (the limit)"
            )
        topic = self._topics.setdefault(scope, _Topic())
        topic.followers += 1
        self._per_tenant[tenant] = self._per_tenant.get(tenant, 0) + 1
        self._tails += 1
        weakref.finalize(owner, self._release, scope)

    def _release(self, scope: Scope) -> None:
        tenant = scope[0]
        self._tails -= 1
        left = self._per_tenant.get(tenant, 1) - 1
        if left > 0:
            self._per_tenant[tenant] = left
        else:
            self._per_tenant.pop(tenant, None)
        topic = self._topics.get(scope)
        if topic is not None:
            topic.followers -= 1
            if topic.followers <= 0:
                del self._topics[scope]

    @property
    def tails(self) -> int:
        return self._tails

    async def wait(self, scope: Scope, seen: int, max_wait_s: float) -> int:
        """Wait until ``scope``'s generation moves past ``seen`` (at most ``max_wait_s``)."""
        topic = self._topics.get(scope)
        if topic is None:  # not followed (cannot happen while a tail waits): no busy loop
            await asyncio.sleep(max_wait_s)
            return seen
        if topic.generation == seen and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(topic.event.wait(), max_wait_s)
        return topic.generation

    def close(self) -> None:
        self.closed = True
        for topic in self._topics.values():
            topic.generation += 1
            topic.event.set()


# Bytes a stored line counts beyond its text. The gateway's cost is per line, not
# per byte: 38 us of CPU a line (reading, the record, the row, its indexes and
# search index), measured alike for 4,000 lines of one character and 900 of 1 KB.
# At 32, a tenant at its 1 MiB/s budget in short lines had ~31,000 lines a second
# stored, 1.2 cores of the gateway's CPU; at 512, ~2,000, under a tenth of a core.
LINE_OVERHEAD = 512


def line_size(line: NewLogLine) -> int:
    """What a log line counts against budgets: its message and its fields."""
    size = len(line.message) + LINE_OVERHEAD
    if line.fields:
        size += len(str(line.fields))
    return size


class LogBudget:
    """Per tenant, a token bucket of log bytes: ``rate`` per second, up to
    ``burst`` at once. Storing and indexing a line costs the gateway far more
    than writing it costs a function; this bounds what one tenant's logs can
    take of it. ``rate`` 0: no budget."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(burst, rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant: (tokens, when)

    def allow(self, tenant: str, size: int) -> bool:
        """Whether one line of ``size`` bytes (its text as the function wrote
        it) fits; if so its bytes, plus LINE_OVERHEAD, are taken."""
        return self.take(tenant, [size + LINE_OVERHEAD]) == 1

    def take(self, tenant: str, sizes: list[int]) -> int:
        """How many of these lines (in order) fit; their bytes are taken."""
        if self.rate <= 0:
            return len(sizes)
        now = time.monotonic()
        tokens, when = self._buckets.get(tenant, (self.burst, now))
        tokens = min(self.burst, tokens + (now - when) * self.rate)
        kept = 0
        for size in sizes:
            if size > tokens:
                break
            tokens -= size
            kept += 1
        if tokens >= self.burst:
            self._buckets.pop(tenant, None)  # full again: nothing to remember
        else:
            self._buckets[tenant] = (tokens, now)
        return kept
