"""A circuit breaker per provider: a pure state machine driven by outcomes and an injected clock.

::

    CLOSED --(failure rate over the window >= threshold, or N consecutive failures)--> OPEN
    OPEN --(open_for_s elapsed, or a healthy active probe)--> HALF_OPEN
    HALF_OPEN --(trial calls succeed)--> CLOSED
    HALF_OPEN --(a trial call fails)--> OPEN (the next open period is longer, up to max_open_for_s)

Only provider faults count as failures (see :func:`counts_as_failure`): a workflow that fails validation or
raises inside a node says nothing about the provider's health. Outcomes that say nothing about the backend
at all (the caller cancelled, the workflow is invalid) count neither way (see :func:`says_nothing`): a
half-open trial that ends so gives its slot back, and neither closes nor re-opens the circuit.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import GpuBridgeError, JobCancelled, JobFailed, JobTimeout, WorkflowError

__all__ = ["CircuitState", "BreakerConfig", "CircuitBreaker", "counts_as_failure", "says_nothing"]

Clock = Callable[[], float]


class CircuitState(str, enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"

    def __str__(self) -> str:
        return self.value


def says_nothing(exc: BaseException | None) -> bool:
    """Outcomes that say nothing about the backend's health: the caller cancelled, or the workflow is
    invalid (it fails the same everywhere). They count neither as a success nor as a failure."""
    return isinstance(exc, (JobCancelled, asyncio.CancelledError, WorkflowError))


def counts_as_failure(exc: BaseException | None) -> bool:
    """Whether an error is the provider's fault (and so counts against its circuit)."""
    if exc is None:
        return False
    if isinstance(exc, JobTimeout):
        return exc.state in (None, "queued")  # stuck in a queue: the provider's fault; a slow job is not
    if isinstance(exc, JobFailed):
        return exc.retryable  # a worker crash, not an error inside the workflow
    if isinstance(exc, GpuBridgeError):
        return exc.retryable
    return True  # an unexpected exception from a provider


@dataclass(frozen=True)
class BreakerConfig:
    window_s: float = 60.0
    """Sliding window over which the failure rate is computed."""
    min_calls: int = 10
    """Calls needed in the window before the failure rate can open the circuit."""
    failure_rate: float = 0.5
    """Open when failures / calls in the window reaches this."""
    consecutive_failures: int = 5
    """Open after this many failures in a row, whatever the rate."""
    open_for_s: float = 15.0
    """How long the circuit stays open before allowing trial calls."""
    max_open_for_s: float = 300.0
    """Each re-open after a failed trial doubles the open period, up to this."""
    half_open_trials: int = 1
    """Trial calls allowed at once in half-open; that many successes close the circuit."""
    unhealthy_probes: int = 2
    """Consecutive unhealthy active probes that open the circuit."""


class CircuitBreaker:
    """One provider's circuit. Call :meth:`allow` before a call and :meth:`record` after it."""

    def __init__(
        self,
        name: str,
        config: BreakerConfig | None = None,
        *,
        clock: Clock = time.monotonic,
        on_change: Callable[[str, CircuitState, CircuitState], None] | None = None,
    ):
        self.name = name
        self.config = config or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._state = CircuitState.CLOSED
        self._window: collections.deque[tuple[float, bool]] = collections.deque()
        self._failures_in_window = 0
        self._consecutive = 0
        self._opened_at = 0.0
        self._open_for = self.config.open_for_s
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._bad_probes = 0
        self.opened_count = 0

    # ---------------------------------------------------------------------------------------------- state

    @property
    def state(self) -> CircuitState:
        if self._state is CircuitState.OPEN and self._clock() - self._opened_at >= self._open_for:
            self._transition(CircuitState.HALF_OPEN)
        return self._state

    def _transition(self, new: CircuitState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        if new is CircuitState.OPEN:
            self._opened_at = self._clock()
            self.opened_count += 1
        if new is CircuitState.HALF_OPEN:
            self._trials_in_flight = 0
            self._trial_successes = 0
        if new is CircuitState.CLOSED:
            self._open_for = self.config.open_for_s
            self._consecutive = 0
            self._window.clear()
            self._failures_in_window = 0
        if self._on_change is not None:
            self._on_change(self.name, old, new)

    def _prune(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._window and self._window[0][0] < horizon:
            _, ok = self._window.popleft()
            if not ok:
                self._failures_in_window -= 1

    # ------------------------------------------------------------------------------------------- decisions

    def allow(self) -> bool:
        """May a call go to this provider now? In half-open this reserves one of the trial slots."""
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and self._trials_in_flight < self.config.half_open_trials:
            self._trials_in_flight += 1
            return True
        return False

    def would_allow(self) -> bool:
        """Like :meth:`allow`, without reserving a trial slot."""
        state = self.state
        return state is CircuitState.CLOSED or (
            state is CircuitState.HALF_OPEN and self._trials_in_flight < self.config.half_open_trials
        )

    def release(self) -> None:
        """Give back a half-open trial slot that was reserved but not used."""
        if self._trials_in_flight:
            self._trials_in_flight -= 1

    def record(self, exc: BaseException | None) -> None:
        """Record a call's outcome: ``None`` for success, else the error (filtered by counts_as_failure;
        an outcome that :func:`says_nothing` only gives back a reserved half-open trial slot)."""
        if says_nothing(exc):
            self.release()
        elif counts_as_failure(exc):
            self.record_failure()
        else:
            self.record_success()

    def record_success(self) -> None:
        now = self._clock()
        self._consecutive = 0
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self.release()
            self._trial_successes += 1
            if self._trial_successes >= self.config.half_open_trials:
                self._transition(CircuitState.CLOSED)
            return
        self._window.append((now, True))
        self._prune(now)

    def record_failure(self) -> None:
        now = self._clock()
        self._consecutive += 1
        state = self.state
        if state is CircuitState.HALF_OPEN:
            self.release()
            self._open_for = min(self.config.max_open_for_s, self._open_for * 2)
            self._transition(CircuitState.OPEN)
            return
        if state is CircuitState.OPEN:
            return
        self._window.append((now, False))
        self._failures_in_window += 1
        self._prune(now)
        calls = len(self._window)
        if self._consecutive >= self.config.consecutive_failures or (
            calls >= self.config.min_calls and self._failures_in_window / calls >= self.config.failure_rate
        ):
            self._transition(CircuitState.OPEN)

    def record_probe(self, healthy: bool) -> None:
        """An active health probe's verdict. Unhealthy probes can open the circuit; a healthy probe (only
        ``healthy``: a degraded one is not fed here) lets an open circuit try again without waiting out
        its open period."""
        if healthy:
            self._bad_probes = 0
            if self._state is CircuitState.OPEN:
                self._transition(CircuitState.HALF_OPEN)
            return
        self._bad_probes += 1
        if self._bad_probes >= self.config.unhealthy_probes and self.state is not CircuitState.OPEN:
            self._transition(CircuitState.OPEN)

    # ------------------------------------------------------------------------------------------- views

    def failure_rate(self) -> float | None:
        self._prune(self._clock())
        return self._failures_in_window / len(self._window) if self._window else None

    def snapshot(self) -> dict[str, Any]:
        state = self.state
        rate = self.failure_rate()
        return {
            "provider": self.name,
            "circuit": state.value,
            "failure_rate": round(rate, 4) if rate is not None else None,
            "calls_in_window": len(self._window),
            "consecutive_failures": self._consecutive,
            "opened_count": self.opened_count,
            "open_for_s": self._open_for if state is not CircuitState.CLOSED else None,
        }

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name} {self.state.value}>"
