"""The request gate: at most ``limit`` requests handed to an HTTP client at once; the rest wait here, in FIFO
order, for at most ``timeout`` seconds (then :class:`~gpubridge.errors.ProviderUnavailable`, as a pool timeout).

httpcore rescans its whole request queue, and every connection, each time a request is queued or a response
closes, so letting 1,000 concurrent jobs queue inside an httpx pool makes each request cost O(queued): the
client, not the backend, then limits throughput (bench/scale.py, BENCHMARKS.md). Every provider puts this gate
in front of its pool, sized to the pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .errors import ProviderUnavailable

__all__ = ["RequestGate"]


class RequestGate:
    """One per client; bound to the event loop it is first used on (a new loop gets a new semaphore)."""

    __slots__ = ("_loop", "_slots", "limit", "timeout")

    def __init__(self, limit: int, timeout: float | None):
        self.limit = limit
        self.timeout = timeout
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _semaphore(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._slots, self._loop = asyncio.Semaphore(self.limit), loop
        return self._slots

    def slot(self, *, provider: str | None, what: str | Callable[[], str]) -> _Slot:
        """Hold one slot around one request (``async with gate.slot(...)``). ``what`` names it in the timeout's
        message (a callable is called only then: a hot path need not format it per request)."""
        return _Slot(self._semaphore(), self.timeout, provider, what)


class _Slot:
    """``async with``: one slot of a gate (a class, not a generator-based context manager: it is on every
    request's path)."""

    __slots__ = ("_provider", "_slots", "_timeout", "_what")

    def __init__(self, slots: asyncio.Semaphore, timeout: float | None, provider: str | None,
                 what: str | Callable[[], str]):
        self._slots, self._timeout, self._provider, self._what = slots, timeout, provider, what

    async def __aenter__(self) -> None:
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self._timeout):
                    await slots.acquire()
            except TimeoutError:
                what = self._what if isinstance(self._what, str) else self._what()
                raise ProviderUnavailable(f"{what} timed out waiting for a connection (PoolTimeout)",
                                          provider=self._provider) from None
        else:
            await slots.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()
