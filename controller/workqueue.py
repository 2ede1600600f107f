"""A keyed work queue, as in client-go: each key is queued at most once, never processed by two workers at
once, re-queued when it changed while being processed, and delayed re-queues keep only the earliest time.

Kopf's watch handlers only `add()` keys; workers `get()` a key, reconcile it and call `done()`.
"""
from __future__ import annotations

import asyncio
from collections.abc import Hashable


class WorkQueue:
    def __init__(self) -> None:
        self._queue: asyncio.Queue[Hashable] = asyncio.Queue()
        self._queued: set[Hashable] = set()
        self._processing: set[Hashable] = set()
        self._dirty: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._failures: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self._queued)

    def add(self, key: Hashable) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.put_nowait(key)

    def add_after(self, key: Hashable, delay: float) -> None:
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._timers.get(key)
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return  # an earlier wake-up is already planned
        if timer is not None:
            timer.cancel()
        self._timers[key] = loop.call_at(when, self._fire, key)

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> Hashable:
        key = await self._queue.get()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: Hashable) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def backoff(self, key: Hashable, base: float = 0.5, cap: float = 60.0) -> float:
        """The delay before retrying a key that failed (exponential per key); `forget()` resets it."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        return min(base * 2 ** n, cap)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)
