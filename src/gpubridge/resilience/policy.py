"""The pure decisions of the resilience layer: retry budget, backoff, failover choice, stuck-job trigger.

Each is a small object with an injected clock and no I/O, so every branch is unit-tested directly. The
async loop in :mod:`gpubridge.resilience.failover` only asks them what to do.
"""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from ..errors import AuthError, GpuBridgeError, RateLimited, WorkflowError, is_retryable
from .breaker import CircuitBreaker

__all__ = ["RetryBudget", "Backoff", "FailoverChoice", "FailoverPolicy", "StuckJobTrigger", "should_fail_over"]

Clock = Callable[[], float]


class RetryBudget:
    """Caps retries to a fraction of recent traffic, so an outage does not multiply load (Finagle's idea).

    Over the last ``ttl_s`` seconds, retries may be at most ``min_per_s * ttl_s + ratio * requests``.
    """

    def __init__(self, ratio: float = 0.2, min_per_s: float = 1.0, ttl_s: float = 10.0, *, clock: Clock = time.monotonic):
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.ttl_s = ttl_s
        self._clock = clock
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()
        self.refused = 0

    def _prune(self, now: float) -> None:
        horizon = now - self.ttl_s
        for q in (self._requests, self._retries):
            while q and q[0] < horizon:
                q.popleft()

    def record_request(self) -> None:
        self._requests.append(self._clock())

    def allowance(self) -> float:
        now = self._clock()
        self._prune(now)
        return self.min_per_s * self.ttl_s + self.ratio * len(self._requests) - len(self._retries)

    def try_spend(self) -> bool:
        """Take one retry from the budget; False (and counted) when it is spent."""
        if self.allowance() >= 1.0:
            self._retries.append(self._clock())
            return True
        self.refused += 1
        return False


@dataclass(frozen=True)
class Backoff:
    """Full-jitter exponential backoff: a delay drawn from [0, min(max_s, initial_s * 2**n)]."""

    initial_s: float = 0.2
    max_s: float = 10.0

    def delay(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Delay before retry number ``attempt`` (1-based). A server's Retry-After is honoured as a floor."""
        cap = min(self.max_s, self.initial_s * (2 ** max(0, attempt - 1)))
        jittered = (rng or random).uniform(0, cap)
        if retry_after is not None:
            return max(retry_after, jittered)
        return jittered


def should_fail_over(exc: BaseException) -> bool:
    """Whether an error may be retried, here or elsewhere. Invalid workflows and bad credentials never are:
    they fail the same way everywhere."""
    if isinstance(exc, (WorkflowError, AuthError)):
        return False
    return is_retryable(exc)


@dataclass(frozen=True)
class FailoverChoice:
    provider: str | None
    panic: bool = False
    reason: str = ""


class FailoverPolicy:
    """Chooses the provider for the next attempt of a job.

    Providers are tried in order, skipping open circuits and (while others remain) providers this job
    already failed on. If every circuit is open, it still picks one (panic mode) rather than refuse all
    traffic: the first provider this job has not failed on, else the first.
    """

    def __init__(self, order: Sequence[str]):
        if not order:
            raise ValueError("FailoverPolicy needs at least one provider")
        self.order = list(order)

    def choose(self, breakers: Mapping[str, CircuitBreaker], failed: Sequence[str] = (),
               exclude: Collection[str] = ()) -> FailoverChoice:
        """The provider for the next attempt. ``exclude``: providers that cannot run this job at all (they
        lack a node class or model file); never chosen."""
        order = [p for p in self.order if p not in exclude]
        if not order:
            return FailoverChoice(None, reason="no provider can run this job")
        fresh = [p for p in order if p not in failed]
        for name in fresh:
            if breakers[name].allow():
                return FailoverChoice(name, reason="first healthy provider in order")
        for name in order:
            if name in fresh:
                continue
            if breakers[name].allow():
                return FailoverChoice(name, reason="every other provider failed; trying again")
        pick = (fresh or order)[0]
        return FailoverChoice(pick, panic=True, reason="every circuit is open (panic mode)")


class StuckJobTrigger:
    """Decides when a queued job has waited too long for a worker (the stuck-IN_QUEUE case).

    ``queue_timeout`` bounds the time in the queue; it never extends past the job's own deadline.
    """

    def __init__(self, queue_timeout: float | None, *, clock: Clock = time.monotonic):
        self.queue_timeout = queue_timeout
        self._clock = clock

    def due_at(self, queued_since: float, deadline: float | None) -> float | None:
        """When a job queued at ``queued_since`` should be rerouted (clock time), or None."""
        if self.queue_timeout is None:
            return None
        due = queued_since + self.queue_timeout
        return min(due, deadline) if deadline is not None else due

    def is_stuck(self, queued_since: float, still_queued: bool) -> bool:
        if self.queue_timeout is None or not still_queued:
            return False
        return self._clock() - queued_since >= self.queue_timeout


def retry_after_of(exc: BaseException) -> float | None:
    return exc.retry_after if isinstance(exc, RateLimited) else None


def error_name(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    return type(exc).__name__ if isinstance(exc, GpuBridgeError) else f"{type(exc).__module__}.{type(exc).__name__}"
