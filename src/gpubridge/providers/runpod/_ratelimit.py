"""Rate limiting requests to RunPod."""

from __future__ import annotations

import asyncio



class _RateLimiter:
    """At most ``rate`` acquisitions per second, spread evenly (a leaky bucket of one), shared by pollers."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = 0.0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)

