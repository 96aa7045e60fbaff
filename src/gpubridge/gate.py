"""The request gate: at most ``limit`` requests handed to an HTTP client at once; the rest wait here, in FIFO
order, for at most ``timeout`` seconds (then :class:`~gpubridge.errors.ProviderUnavailable`, as a pool timeout).

httpcore rescans its whole request queue, and every connection, each time a request is queued or a response
closes, so letting 1,000 concurrent jobs queue inside an httpx pool makes each request cost O(queued): the
client, not the backend, then limits throughput (bench/scale.py, BENCHMARKS.md). Every provider puts this gate
in front of its pool, sized to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .errors import ProviderUnavailable

__all__ = ["RequestGate"]


class RequestGate:
    """One per client; bound to the event loop it is first used on (a new loop gets a new semaphore)."""

    __slots__ = ("limit", "timeout", "_slots", "_loop")

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

    @contextlib.asynccontextmanager
    async def slot(self, *, provider: str | None, what: str) -> AsyncIterator[None]:
        """Hold one slot around one request. ``what`` names it in the timeout's message."""
        slots = self._semaphore()
        if slots.locked():
            try:
                async with asyncio.timeout(self.timeout):
                    await slots.acquire()
            except TimeoutError:
                raise ProviderUnavailable(f"{what} timed out waiting for a connection (PoolTimeout)",
                                          provider=provider) from None
        else:
            await slots.acquire()
        try:
            yield
        finally:
            slots.release()
