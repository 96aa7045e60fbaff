"""Resilience composed around providers: health probes, circuit breakers, retries and failover.

Nothing here knows a concrete provider: :class:`FailoverRunner` wraps any :class:`WorkflowRunner`.
The decisions are pure objects with an injected clock (:mod:`.breaker`, :mod:`.policy`); the async loop
in :mod:`.failover` only asks them what to do.
"""

from .breaker import BreakerConfig, CircuitBreaker, CircuitState, counts_as_failure
from .failover import FailoverRunner, JobOutcome, ResilienceConfig
from .health import HealthMonitor
from .policy import Backoff, FailoverChoice, FailoverPolicy, RetryBudget, StuckJobTrigger, should_fail_over

__all__ = [
    "Backoff",
    "BreakerConfig",
    "CircuitBreaker",
    "CircuitState",
    "FailoverChoice",
    "FailoverPolicy",
    "FailoverRunner",
    "HealthMonitor",
    "JobOutcome",
    "ResilienceConfig",
    "RetryBudget",
    "StuckJobTrigger",
    "counts_as_failure",
    "should_fail_over",
]
