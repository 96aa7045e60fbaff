"""Reading RunPod's ``/health``: is the endpoint stuck (jobs queued, no ready worker, nothing finishing)?"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["StallTracker"]


class StallTracker:
    """A pure decision with an injected clock: how long has an endpoint been stalled?

    Stalled: jobs in its queue, no ready (idle or running) worker, and no job finishing since the last
    look. :meth:`observe` feeds one ``/health`` sample and returns the seconds stalled so far (None when
    not stalled); :meth:`is_unhealthy` says whether that passed ``unhealthy_after``.
    """

    def __init__(self, unhealthy_after: float, *, clock: Callable[[], float] = time.monotonic):
        self.unhealthy_after = unhealthy_after
        self._clock = clock
        self._since: float | None = None
        self._completed: int | None = None

    def observe(self, in_queue: int, ready: int, completed: int) -> float | None:
        now = self._clock()
        moving = self._completed is not None and completed > self._completed
        self._completed = completed
        if in_queue <= 0 or ready > 0:
            self._since = None
            return None
        if self._since is None or moving:
            self._since = now
        return now - self._since

    def is_unhealthy(self, stalled_for: float | None) -> bool:
        return stalled_for is not None and stalled_for >= self.unhealthy_after
