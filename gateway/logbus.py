"""Wake-ups for live log tails: writers notify, followers re-query the store."""

from __future__ import annotations

import asyncio
import contextlib


class LogBus:
    """A generation counter plus a one-shot event per generation: a follower
    compares generations, so it never misses a wake-up between two waits."""

    def __init__(self) -> None:
        self.generation = 0
        self.closed = False
        self._event = asyncio.Event()

    def notify(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, seen: int, max_wait_s: float) -> int:
        """Wait until the generation moves past ``seen`` (at most ``max_wait_s``)."""
        if self.generation == seen and not self.closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event.wait(), max_wait_s)
        return self.generation

    def close(self) -> None:
        self.closed = True
        self.notify()
