"""The pure decision objects, driven by a fake clock: no I/O, no sleeps."""

from __future__ import annotations

import random

import pytest

from gpubridge.errors import (
    AuthError,
    JobFailed,
    JobTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkflowInvalid,
)
from gpubridge.resilience import (
    Backoff,
    BreakerConfig,
    CircuitBreaker,
    CircuitState,
    FailoverPolicy,
    RetryBudget,
    StuckJobTrigger,
    counts_as_failure,
    should_fail_over,
)


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def breaker(clock: Clock, **kw) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []
    b = CircuitBreaker("p", BreakerConfig(**kw), clock=clock, on_change=lambda n, o, new: changes.append((o.value, new.value)))
    return b, changes


def test_consecutive_failures_open_then_half_open_then_close():
    clock = Clock()
    b, changes = breaker(clock, consecutive_failures=3, open_for_s=10, min_calls=100)
    for _ in range(2):
        b.record_failure()
    assert b.state is CircuitState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is CircuitState.OPEN and not b.allow()
    clock.advance(9.9)
    assert not b.allow()
    clock.advance(0.2)
    assert b.state is CircuitState.HALF_OPEN
    assert b.allow()  # one trial slot
    assert not b.allow()  # only one at a time
    b.record_success()
    assert b.state is CircuitState.CLOSED
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_trial_reopens_with_a_longer_open_period():
    clock = Clock()
    b, _ = breaker(clock, consecutive_failures=1, open_for_s=10, max_open_for_s=25)
    b.record_failure()
    clock.advance(10)
    assert b.allow()
    b.record_failure()
    assert b.state is CircuitState.OPEN
    clock.advance(19)
    assert b.state is CircuitState.OPEN  # now 20 s
    clock.advance(1)
    assert b.state is CircuitState.HALF_OPEN
    b.allow()
    b.record_failure()
    clock.advance(24)
    assert b.state is CircuitState.OPEN  # capped at 25 s
    clock.advance(1)
    assert b.state is CircuitState.HALF_OPEN


def test_failure_rate_over_sliding_window():
    clock = Clock()
    b, _ = breaker(clock, window_s=60, min_calls=10, failure_rate=0.5, consecutive_failures=100)
    for i in range(10):
        (b.record_failure if i % 2 else b.record_success)()
        clock.advance(1)
    assert b.state is CircuitState.OPEN  # 5/10 failed
    clock2 = Clock()
    b2, _ = breaker(clock2, window_s=60, min_calls=10, failure_rate=0.5, consecutive_failures=100)
    for _ in range(4):
        b2.record_failure()
    clock2.advance(61)  # those failures age out of the window
    for i in range(10):
        (b2.record_failure if i % 3 == 0 else b2.record_success)()
    assert b2.state is CircuitState.CLOSED
    assert b2.failure_rate() == pytest.approx(0.4)


def test_probes_open_and_shortcut_recovery():
    clock = Clock()
    b, _ = breaker(clock, unhealthy_probes=2, open_for_s=60)
    b.record_probe(False)
    assert b.state is CircuitState.CLOSED
    b.record_probe(False)
    assert b.state is CircuitState.OPEN
    b.record_probe(True)  # no need to wait 60 s: allow a trial now
    assert b.state is CircuitState.HALF_OPEN


def test_only_provider_faults_count():
    assert counts_as_failure(ProviderUnavailable("down"))
    assert counts_as_failure(RateLimited("slow down"))
    assert counts_as_failure(JobTimeout("stuck", state="queued"))
    assert not counts_as_failure(JobTimeout("slow job", state="running"))
    assert counts_as_failure(JobFailed("worker died", retryable=True))
    assert not counts_as_failure(JobFailed("node raised"))
    assert not counts_as_failure(WorkflowInvalid(error={"message": "bad"}))
    assert not counts_as_failure(None)


def test_failover_eligibility():
    assert should_fail_over(ProviderUnavailable("x"))
    assert should_fail_over(JobTimeout("stuck", state="queued"))
    assert not should_fail_over(WorkflowInvalid(error={"message": "bad"}))
    assert not should_fail_over(AuthError("nope"))
    assert not should_fail_over(JobFailed("node raised"))
    assert not should_fail_over(ValueError("unknown"))


def test_failover_policy_order_skips_open_circuits_and_panics():
    clock = Clock()
    breakers = {n: breaker(clock, consecutive_failures=1)[0] for n in ("modal", "runpod")}
    policy = FailoverPolicy(["modal", "runpod"])
    assert policy.choose(breakers).provider == "modal"
    assert policy.choose(breakers, failed=["modal"]).provider == "runpod"
    breakers["modal"].record_failure()
    assert policy.choose(breakers).provider == "runpod"
    breakers["runpod"].record_failure()
    choice = policy.choose(breakers)
    assert choice.panic and choice.provider == "modal"
    assert policy.choose(breakers, failed=["modal"]).provider == "runpod"


def test_failover_policy_retries_a_failed_provider_when_nothing_else_is_left():
    clock = Clock()
    breakers = {"only": breaker(clock)[0]}
    choice = FailoverPolicy(["only"]).choose(breakers, failed=["only"])
    assert choice.provider == "only" and not choice.panic


def test_retry_budget_caps_retries_to_a_share_of_traffic():
    clock = Clock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.0, ttl_s=10, clock=clock)
    for _ in range(50):
        budget.record_request()
    spent = sum(budget.try_spend() for _ in range(20))
    assert spent == 5 and budget.refused == 15
    clock.advance(11)  # the window moves on
    assert not budget.try_spend()
    for _ in range(10):
        budget.record_request()
    assert budget.try_spend()


def test_retry_budget_minimum_rate_allows_retries_at_low_traffic():
    budget = RetryBudget(ratio=0.0, min_per_s=0.5, ttl_s=10, clock=Clock())
    assert sum(budget.try_spend() for _ in range(10)) == 5


def test_backoff_is_jittered_capped_and_honours_retry_after():
    rng = random.Random(1)
    b = Backoff(initial_s=1, max_s=8)
    delays = [b.delay(n, rng) for n in range(1, 8) for _ in range(50)]
    assert all(0 <= d <= 8 for d in delays)
    assert max(b.delay(1, rng) for _ in range(100)) <= 1
    assert b.delay(1, rng, retry_after=5) >= 5


def test_stuck_trigger_never_passes_the_deadline():
    clock = Clock(0)
    trig = StuckJobTrigger(30, clock=clock)
    assert trig.due_at(0, deadline=100) == 30
    assert trig.due_at(0, deadline=20) == 20
    assert not trig.is_stuck(0, still_queued=True)
    clock.advance(30)
    assert trig.is_stuck(0, still_queued=True)
    assert not trig.is_stuck(0, still_queued=False)
    assert StuckJobTrigger(None).due_at(0, 10) is None
