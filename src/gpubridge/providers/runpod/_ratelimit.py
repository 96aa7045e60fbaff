"""Rate limiting requests to RunPod: RunPod's documented per-endpoint limits, one bucket per route class.

RunPod limits each endpoint per route (docs.runpod.io, "Endpoint operations / rate limits"): ``/run``
1,000 and ``/status`` 2,000 requests per 10 s, ``/cancel`` 100 per 10 s; beyond that it answers 429.
:class:`TokenBucket` is the pure decision (an injected clock, no I/O); :class:`EndpointLimits` holds one
bucket per route class of one endpoint and is shared, through :func:`shared_limits`, by everything in
the process that talks to that endpoint (each RunPodRunner, and so the failover runner and its reaper,
which reach RunPod only through a runner).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["RUNPOD_RATE_LIMITS", "TokenBucket", "EndpointLimits", "shared_limits", "route_class"]

Clock = Callable[[], float]

RUNPOD_RATE_LIMITS: dict[str, tuple[int, float]] = {
    "run": (1000, 10.0),
    "runsync": (2000, 10.0),
    "status": (2000, 10.0),
    "stream": (2000, 10.0),
    "cancel": (100, 10.0),
    "purge-queue": (2, 10.0),
}
"""Route class -> (requests, per seconds), per endpoint, as RunPod documents them."""


def route_class(path: str) -> str:
    """``/status/abc`` -> ``status``; ``/runsync?wait=1`` -> ``runsync``; ``/status-sync/abc`` counts as
    ``status``."""
    route = path.split("?", 1)[0].strip("/").split("/", 1)[0]
    return "status" if route == "status-sync" else route


class TokenBucket:
    """At most ``limit`` takes in any ``window`` seconds, with a burst of ``burst`` (default a tenth).

    The bucket holds up to ``burst`` tokens and refills at ``(limit - burst) / window`` per second, so any
    window of ``window`` seconds admits at most ``burst + (limit - burst) = limit`` takes: a server that
    counts requests in a sliding window never sees more than its limit. :meth:`reserve` takes a token now
    or books the next free one and says how long to wait for it (callers queue in order, none starve).
    """

    def __init__(self, limit: int, window: float, *, burst: int | None = None, clock: Clock = time.monotonic):
        if limit < 1 or window <= 0:
            raise ValueError("a rate limit needs limit >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self.burst = max(1, min(limit, burst if burst is not None else max(1, limit // 10)))
        refill = (limit - self.burst) / window
        self.rate = refill if refill > 0 else limit / window
        self._clock = clock
        self._tokens = float(self.burst)
        self._at = clock()

    def _refill(self, now: float) -> None:
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def reserve(self) -> float:
        """Take one token; returns 0 if it was there, else the seconds until the booked one is."""
        now = self._clock()
        self._refill(now)
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def available(self) -> float:
        self._refill(self._clock())
        return self._tokens


class EndpointLimits:
    """One :class:`TokenBucket` per route class of one endpoint (a tenth under RunPod's limit); routes
    without a limit pass freely."""

    def __init__(self, limits: Mapping[str, tuple[int, float]] | None = None, *, margin: float = 0.9,
                 clock: Clock = time.monotonic):
        # ``margin``: keep a tenth under the limit, so network jitter (requests bunching on the way) does
        # not push the server's count over it.
        self.buckets = {route: TokenBucket(max(1, int(n * margin)), per, clock=clock) for route, (n, per) in
                        (RUNPOD_RATE_LIMITS if limits is None else limits).items()}
        self._lock = threading.Lock()  # runners of one endpoint may live on different loops

    def reserve(self, route: str) -> float:
        bucket = self.buckets.get(route)
        if bucket is None:
            return 0.0
        with self._lock:
            return bucket.reserve()

    async def acquire(self, route: str) -> None:
        delay = self.reserve(route)
        if delay > 0:
            await asyncio.sleep(delay)


_SHARED: dict[tuple[str, str], EndpointLimits] = {}
_SHARED_LOCK = threading.Lock()


def shared_limits(base_url: str, endpoint_id: str,
                  limits: Mapping[str, tuple[int, float]] | None = None) -> EndpointLimits:
    """The process-wide limits of one endpoint (created with ``limits`` on first use)."""
    key = (base_url.rstrip("/"), endpoint_id)
    with _SHARED_LOCK:
        found = _SHARED.get(key)
        if found is None:
            found = _SHARED[key] = EndpointLimits(limits)
        return found


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
