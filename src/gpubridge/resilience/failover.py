"""FailoverRunner: a runner that wraps runners, and routes a job around a failing provider.

Per job, a supervisor drives attempts with tenacity. Each attempt asks the pure
:class:`~gpubridge.resilience.policy.FailoverPolicy` for a provider (in order, skipping open circuits,
panic mode when all are open), submits with the time left before the job's deadline, and follows it:

- a retryable error (see ``should_fail_over``) falls through to the next attempt; WorkflowInvalid and
  AuthError never do; nothing is retried past the deadline, or beyond the retry budget;
- a job still queued after ``queue_timeout`` (the stuck-IN_QUEUE case) is cancelled and resubmitted;
- an attempt that may still be running is cancelled, and the cancel confirmed, before the next one is
  submitted; only the provider's own terminal answer confirms a cancel (a cancel answered "completed"
  delivers that result instead of rerouting); a cancel that cannot be confirmed goes to the reaper, which
  keeps trying (within the provider's rate limits) until the job is terminal or gone (no orphans);
- a job still queued at ``queue_timeout`` is rerouted only after that; a status check that fails then
  (429, 5xx) means "may be running": cancel and confirm first;
- a caller's cancel is a state checked before every attempt (a cancel during a backoff is not lost),
  and it wakes the backoff;
- the result is delivered once, names the provider that served it, and lists every attempt.

Stuck jobs are rerouted (cancel, then resubmit) rather than hedged (submit a second copy, cancel the
loser). Hedging buys a little latency when the stuck queue starts moving in the same instant, but it
doubles GPU spend exactly when capacity is short, and it makes "exactly one remote job per request"
depend on a cancel racing a start. Rerouting keeps at most one remote copy alive at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from ..comfy.preflight import preflight
from ..errors import GpuBridgeError, JobCancelled, JobNotFound, JobTimeout, ProviderError, WorkflowUnsupported
from ..models import (
    STATE_EVENTS,
    Attempt,
    EventType,
    HealthReport,
    HealthState,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
)
from ..runner import EventStream, JobRef, WorkflowRunner, job_id_of
from .breaker import BreakerConfig, CircuitBreaker, CircuitState
from .health import HealthMonitor
from .policy import Backoff, FailoverPolicy, RetryBudget, StuckJobTrigger, error_name, retry_after_of, should_fail_over

__all__ = ["FailoverRunner", "ResilienceConfig", "JobOutcome"]

log = logging.getLogger("gpubridge.resilience")


class ResilienceConfig(BaseModel):
    """Knobs of the resilience layer (TOML table ``[resilience]``)."""

    max_attempts: int = Field(default=3, ge=1)
    """Attempts per job, over all providers."""
    queue_timeout: float | None = Field(default=None, gt=0)
    """Reroute a job that waited longer than this for a worker."""
    backoff_initial_s: float = Field(default=0.2, ge=0)
    backoff_max_s: float = Field(default=10.0, ge=0)
    retry_budget_ratio: float = Field(default=0.2, ge=0)
    retry_budget_min_per_s: float = Field(default=1.0, ge=0)
    retry_budget_ttl_s: float = Field(default=10.0, gt=0)
    probe_interval_s: float | None = Field(default=30.0, gt=0)
    probe_timeout_s: float = Field(default=10.0, gt=0)
    cancel_timeout_s: float = Field(default=30.0, gt=0)
    """How long to wait for an attempt's cancel before resubmitting (the reaper keeps trying after)."""
    reap_for_s: float = Field(default=3600.0, gt=0)
    """How long the reaper keeps trying to cancel an attempt it could not confirm (RunPod drops a job
    once its ttl passes); what it still could not cancel then is reported in ``cancel_failures``."""
    reap_initial_s: float = Field(default=1.0, gt=0)
    reap_max_s: float = Field(default=30.0, gt=0)
    preflight: bool = True
    """Skip providers whose capabilities lack a node class or model file the workflow needs."""
    preflight_timeout: float = Field(default=5.0, gt=0)
    """Seconds to wait for a provider's capabilities before sending it the job regardless."""
    breaker_window_s: float = 60.0
    breaker_min_calls: int = 10
    breaker_failure_rate: float = 0.5
    breaker_consecutive_failures: int = 5
    breaker_open_for_s: float = 15.0
    breaker_max_open_for_s: float = 300.0

    def breaker(self) -> BreakerConfig:
        return BreakerConfig(
            window_s=self.breaker_window_s,
            min_calls=self.breaker_min_calls,
            failure_rate=self.breaker_failure_rate,
            consecutive_failures=self.breaker_consecutive_failures,
            open_for_s=self.breaker_open_for_s,
            max_open_for_s=self.breaker_max_open_for_s,
        )


class JobOutcome(BaseModel):
    """What the outcome hook receives once per job."""

    job_id: str
    request_id: str | None
    state: JobState
    provider: str | None
    error: str | None = None
    error_message: str | None = None
    attempts: list[Attempt] = Field(default_factory=list)
    total_s: float | None = None


@dataclass(eq=False)
class _Supervised:
    id: str
    request: JobRequest
    deadline: float
    stream: EventStream = field(default_factory=EventStream)
    done: asyncio.Future[JobResult] | None = None
    accepted: asyncio.Future[JobHandle] | None = None
    attempts: list[Attempt] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    excluded: set[str] = field(default_factory=set)  # providers that lack what the job needs
    current: tuple[str, JobHandle] | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_requested: bool = False
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    last_error: BaseException | None = None
    want_events: bool = False
    forwarder: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None
    t0: float = 0.0


class FailoverRunner(WorkflowRunner):
    """Runs each job on the first healthy provider, and fails over on retryable errors and stuck queues."""

    def __init__(
        self,
        runners: Sequence[WorkflowRunner],
        config: ResilienceConfig | None = None,
        *,
        default_timeout: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_outcome: Callable[[JobOutcome], None] | None = None,
        on_breaker_change: Callable[[str, CircuitState, CircuitState], None] | None = None,
        hooks: Any = None,
    ):
        if not runners:
            raise ValueError("FailoverRunner needs at least one runner")
        self.runners = {r.name: r for r in runners}
        if len(self.runners) != len(runners):
            raise ValueError("runner names must be unique")
        self.config = config or ResilienceConfig()
        self.default_timeout = default_timeout
        self.name = runners[0].name if len(runners) == 1 else "failover(" + ",".join(self.runners) + ")"
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_outcome = on_outcome
        self._on_breaker_change = on_breaker_change
        self._hooks = hooks
        self.breakers = {
            n: CircuitBreaker(n, self.config.breaker(), clock=clock, on_change=self._breaker_changed)
            for n in self.runners
        }
        self.policy = FailoverPolicy(list(self.runners))
        self.budget = RetryBudget(
            self.config.retry_budget_ratio, self.config.retry_budget_min_per_s, self.config.retry_budget_ttl_s,
            clock=clock,
        )
        self.trigger = StuckJobTrigger(self.config.queue_timeout, clock=clock)
        self.backoff = Backoff(self.config.backoff_initial_s, self.config.backoff_max_s)
        self.monitor = HealthMonitor(
            self.runners, self.breakers, interval_s=self.config.probe_interval_s, timeout_s=self.config.probe_timeout_s
        )
        self._jobs: OrderedDict[str, _Supervised] = OrderedDict()
        self._max_retained = 10_000
        self._reaper: set[asyncio.Task[None]] = set()
        self.unconfirmed_cancels: dict[tuple[str, str], int] = {}
        """(provider, job id) -> tries so far, for attempts the reaper is still cancelling."""
        self.cancel_failures: list[tuple[str, str]] = []
        """(provider, job id) of attempts the reaper gave up on after ``reap_for_s`` (it may have run)."""
        self.counters = {
            "submitted": 0, "succeeded": 0, "failed": 0, "failovers": 0, "stuck": 0, "panic": 0, "skipped": 0,
            "unconfirmed_submits": 0,
        }

    # ------------------------------------------------------------------------------------------- hooks

    def _breaker_changed(self, name: str, old: CircuitState, new: CircuitState) -> None:
        log.warning("circuit of %s: %s -> %s", name, old.value, new.value)
        if self._on_breaker_change is not None:
            with contextlib.suppress(Exception):
                self._on_breaker_change(name, old, new)
        if self._hooks is not None:
            with contextlib.suppress(Exception):
                self._hooks.breaker_change(provider=name, old=old.value, new=new.value)

    def _emit_outcome(self, sup: _Supervised, state: JobState, provider: str | None, exc: BaseException | None) -> None:
        outcome = JobOutcome(
            job_id=sup.id,
            request_id=sup.request.request_id,
            state=state,
            provider=provider,
            error=error_name(exc),
            error_message=str(exc) if exc else None,
            attempts=list(sup.attempts),
            total_s=round(self._clock() - sup.t0, 6),
        )
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:
                log.exception("outcome callback failed")
        if self._hooks is not None:
            try:
                self._hooks.job_outcome(outcome=outcome)
            except Exception:
                log.exception("outcome hook failed")

    # ------------------------------------------------------------------------------------------- submit

    async def submit(self, request: JobRequest) -> JobHandle:
        self.monitor.start()
        loop = asyncio.get_running_loop()
        timeout = request.timeout or self.default_timeout
        sup = _Supervised(id="", request=request, deadline=self._clock() + timeout, t0=self._clock())
        sup.done = loop.create_future()
        sup.accepted = loop.create_future()
        self.budget.record_request()
        self.counters["submitted"] += 1
        sup.task = asyncio.create_task(self._supervise(sup), name=f"failover-{request.request_id[:8]}")
        try:
            handle = await asyncio.shield(sup.accepted)
        except asyncio.CancelledError:
            self._request_cancel(sup)
            sup.task.cancel()
            raise
        return handle

    @staticmethod
    def _request_cancel(sup: _Supervised) -> None:
        sup.cancel_requested = True
        sup.cancel_event.set()

    def _remember(self, sup: _Supervised) -> None:
        self._jobs[sup.id] = sup
        while len(self._jobs) > self._max_retained:
            old_id, old = next(iter(self._jobs.items()))
            if old.done is not None and not old.done.done():
                break
            self._jobs.pop(old_id)

    async def _supervise(self, sup: _Supervised) -> None:
        assert sup.done is not None and sup.accepted is not None
        retrying = AsyncRetrying(
            stop=self._stop(sup),
            wait=self._wait(sup),
            retry=retry_if_exception(lambda exc: self._should_retry(sup, exc)),
            before_sleep=lambda state: self._before_next(sup, state),
            sleep=lambda delay: self._backoff_sleep(sup, delay),
            reraise=True,
        )
        provider: str | None = None
        try:
            await self._preflight(sup)
            async for attempt in retrying:
                with attempt:
                    provider, result = await self._attempt(sup)
            result.job_id = sup.id
            result.attempts = list(sup.attempts)
            result.request_id = result.request_id or sup.request.request_id
            self.counters["succeeded"] += 1
            sup.stream.publish(self._event(sup, EventType.SUCCEEDED, provider))
            self._emit_outcome(sup, JobState.SUCCEEDED, provider, None)
            sup.done.set_result(result)
        except BaseException as exc:  # noqa: BLE001 - every end is delivered to the waiter
            if isinstance(exc, asyncio.CancelledError):
                exc = JobCancelled(f"Job {sup.id or sup.request.request_id} was cancelled", job_id=sup.id or None)
            state = JobState.of_error(exc)
            self.counters["failed"] += 1
            last = sup.current[0] if sup.current else None
            sup.stream.publish(self._event(sup, STATE_EVENTS[state], last, message=str(exc), data={"error": _to_dict(exc)}))
            self._emit_outcome(sup, state, last, exc)
            if not sup.accepted.done():
                sup.accepted.set_exception(exc)
            sup.done.set_exception(exc)
            sup.done.exception()  # mark retrieved: a caller that only submitted must not log it
        finally:
            if sup.forwarder is not None:
                sup.forwarder.cancel()

    async def _preflight(self, sup: _Supervised) -> None:
        """Skip the providers that lack a node class or model file the workflow needs (as their
        ``capabilities()`` say), before any submit or cold start; each is listed as a skipped attempt.
        A provider that cannot say (or does not answer in time) is not skipped."""
        if not self.config.preflight or len(self.runners) < 2:
            return  # one provider: its own validation names what it lacks
        try:
            prompt = sup.request.workflow.to_api()
        except Exception:
            return  # the submit reports a malformed workflow

        async def lacks(name: str, runner: WorkflowRunner) -> tuple[str, list[dict[str, Any]]]:
            try:
                info = await asyncio.wait_for(runner.capabilities(), self.config.preflight_timeout)
            except Exception as exc:  # noqa: BLE001 - unknown capabilities never block a provider
                log.debug("capabilities of %s unknown: %s", name, exc)
                return name, []
            if not info:
                return name, []
            return name, [p.to_dict() for p in preflight(prompt, info) if p.backend_lacks]

        found = await asyncio.gather(*(lacks(n, r) for n, r in self.runners.items()))
        lacking = {name: problems for name, problems in found if problems}
        now = time.time()
        for name, problems in lacking.items():
            sup.excluded.add(name)
            self.counters["skipped"] += 1
            sup.attempts.append(Attempt(provider=name, outcome="skipped", started_at=now, ended_at=now, error={
                "type": "CapabilityMissing", "retryable": True, "provider": name, "problems": problems,
                "message": f"{name} cannot run this workflow: " + "; ".join(p["message"] for p in problems),
            }))
        if lacking and len(lacking) == len(self.runners):
            raise WorkflowUnsupported(
                "No provider can run this workflow: " + " | ".join(
                    f"{name}: " + "; ".join(p["message"] for p in problems) for name, problems in lacking.items()),
                problems=lacking,
            )

    @staticmethod
    async def _backoff_sleep(sup: _Supervised, delay: float) -> None:
        """The backoff between two attempts; a caller's cancel ends it at once."""
        if delay <= 0 or sup.cancel_requested:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(sup.cancel_event.wait(), delay)

    def _stop(self, sup: _Supervised) -> Callable[[RetryCallState], bool]:
        def stop(state: RetryCallState) -> bool:
            return (
                state.attempt_number >= self.config.max_attempts
                or self._clock() >= sup.deadline
                or sup.cancel_requested
            )

        return stop

    def _wait(self, sup: _Supervised) -> Callable[[RetryCallState], float]:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            # Another provider can be tried at once; the same one only after a backoff (and Retry-After).
            nxt = self.policy.choose({n: _Peek(b) for n, b in self.breakers.items()}, sup.failed, sup.excluded)
            last = sup.attempts[-1].provider if sup.attempts else None
            if nxt.provider != last:
                return 0.0
            delay = self.backoff.delay(state.attempt_number, self._rng, retry_after_of(exc) if exc else None)
            return max(0.0, min(delay, sup.deadline - self._clock()))

        return wait

    def _should_retry(self, sup: _Supervised, exc: BaseException) -> bool:
        if sup.cancel_requested or not should_fail_over(exc):
            return False
        if isinstance(exc, JobTimeout) and exc.state != "queued" and self._clock() >= sup.deadline:
            return False  # the job's own deadline passed
        if not self.budget.try_spend():
            log.warning("retry budget spent: not retrying job %s after %s", sup.id, error_name(exc))
            return False
        return True

    def _before_next(self, sup: _Supervised, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        last = sup.attempts[-1].provider if sup.attempts else "?"
        sup.stream.publish(
            self._event(
                sup, EventType.RETRYING, last,
                message=f"attempt {state.attempt_number} on {last} failed ({error_name(exc)}: {exc}); retrying",
            )
        )

    def _event(self, sup: _Supervised, type: EventType, provider: str | None, **kw: Any) -> JobEvent:
        return JobEvent(type=type, job_id=sup.id or sup.request.request_id, provider=provider, **kw)

    # ------------------------------------------------------------------------------------------- attempts

    async def _attempt(self, sup: _Supervised) -> tuple[str, JobResult]:
        if sup.cancel_requested:  # checked before every attempt: a cancel during a backoff is not lost
            raise JobCancelled(f"Job {sup.id or sup.request.request_id} was cancelled", job_id=sup.id or None)
        choice = self.policy.choose(self.breakers, sup.failed, sup.excluded)
        name = choice.provider
        assert name is not None  # _preflight raised if every provider is excluded
        runner = self.runners[name]
        breaker = self.breakers[name]
        tried = [a for a in sup.attempts if a.outcome != "skipped"]
        previous = tried[-1].provider if tried else None
        if choice.panic:
            self.counters["panic"] += 1
            log.warning("all circuits open; trying %s anyway (panic mode)", name)
        if previous is not None and previous != name:
            self.counters["failovers"] += 1
            sup.stream.publish(
                self._event(sup, EventType.FAILOVER, name, message=f"failing over from {previous} to {name}",
                            data={"from": previous, "to": name})
            )
        remaining = sup.deadline - self._clock()
        if remaining <= 0:
            breaker.release()
            if sup.last_error is not None:
                raise sup.last_error  # time ran out while backing off: report what went wrong
            raise JobTimeout(
                f"Job {sup.id or sup.request.request_id} ran out of time before it could be (re)submitted",
                job_id=sup.id or None, state="queued", cancelled=True, retryable=False,
            )
        attempt = Attempt(provider=name, outcome="submitting", started_at=time.time())
        sup.attempts.append(attempt)
        request = sup.request.model_copy(update={"timeout": remaining})
        try:
            handle = await runner.submit(request)
        except BaseException as exc:
            if getattr(exc, "job_may_be_running", False):
                # The provider could not tell whether it accepted the job, and gave us no id to cancel.
                # Its own deadline (the request's timeout) bounds such a job; count it so it shows.
                self.counters["unconfirmed_submits"] += 1
                log.warning("submit to %s may have been accepted without an answer: %s", name, exc)
            self._close_attempt(sup, attempt, exc)
            breaker.record(exc)  # a caller's cancel says nothing: it only gives back a trial slot
            raise
        attempt.job_id = handle.job_id
        attempt.outcome = "running"
        sup.current = (name, handle)
        sup.started.clear()
        if not sup.id:
            sup.id = f"{name}:{handle.job_id}"
            self._remember(sup)
        if sup.want_events:
            self._forward(sup, runner, handle)
        assert sup.accepted is not None
        if not sup.accepted.done():
            sup.accepted.set_result(
                JobHandle(
                    job_id=sup.id, provider=self.name, request_id=sup.request.request_id,
                    submitted_at=handle.submitted_at, deadline=handle.submitted_at + (sup.deadline - sup.t0),
                    extra={"attempt_provider": name, "attempt_job_id": handle.job_id},
                )
            )
        try:
            result = await self._follow(sup, runner, handle)
        except BaseException as exc:
            cancelled = isinstance(exc, asyncio.CancelledError)
            if not getattr(exc, "cancel_handled", False) and (
                cancelled or getattr(exc, "job_may_be_running", False) or not isinstance(exc, GpuBridgeError)
                or isinstance(exc, ProviderError)  # 429/5xx/unreadable: not the backend's word on the job
            ):
                confirmed = await self._cancel_attempt(runner, handle)
                if not cancelled and not sup.cancel_requested and confirmed is not None and (
                    confirmed.state is JobState.SUCCEEDED
                ):
                    # It finished before the cancel reached it: deliver that result, run nothing again.
                    delivered = await self._late_result(sup, runner, handle)
                    if delivered is not None:
                        breaker.record_success()
                        attempt.outcome, attempt.ended_at = "succeeded", time.time()
                        return name, delivered
            self._close_attempt(sup, attempt, exc)
            caller_cancel = cancelled or sup.cancel_requested or isinstance(exc, JobCancelled)
            breaker.record(JobCancelled("cancelled by the caller") if caller_cancel else exc)
            if isinstance(exc, GpuBridgeError) and should_fail_over(exc):
                sup.failed.append(name)
            raise
        breaker.record_success()
        attempt.outcome = "succeeded"
        attempt.ended_at = time.time()
        return name, result

    def _close_attempt(self, sup: _Supervised, attempt: Attempt, exc: BaseException) -> None:
        attempt.ended_at = time.time()
        sup.last_error = exc
        if isinstance(exc, asyncio.CancelledError) or isinstance(exc, JobCancelled):
            attempt.outcome = "cancelled"
        elif isinstance(exc, JobTimeout):
            attempt.outcome = "stuck" if exc.state == "queued" else "timed_out"
        else:
            attempt.outcome = "failed"
        attempt.error = _to_dict(exc)
        if attempt.job_id is None and isinstance(exc, GpuBridgeError) and should_fail_over(exc):
            sup.failed.append(attempt.provider)

    async def _late_result(self, sup: _Supervised, runner: WorkflowRunner, handle: JobHandle) -> JobResult | None:
        """The result of an attempt whose cancel was answered "completed", if it can still be had: a
        transient error fetching it (429, 5xx) is asked again, a few times, before the deadline."""
        for attempt in range(1, 6):
            left = sup.deadline - self._clock()
            if left <= 0:
                break
            try:
                return await runner.wait(handle, timeout=left)
            except ProviderError as exc:
                log.info("result of %s job %s (completed as it was cancelled) not fetched yet: %s",
                         runner.name, handle.job_id, exc)
                await asyncio.sleep(min(left, self.backoff.delay(attempt, self._rng, retry_after_of(exc))))
            except Exception as exc:
                log.warning("%s job %s completed as it was cancelled, but its result could not be had: %s",
                            runner.name, handle.job_id, exc)
                return None
        return None

    async def _follow(self, sup: _Supervised, runner: WorkflowRunner, handle: JobHandle) -> JobResult:
        waiter = asyncio.create_task(runner.wait(handle))
        rerouting = False
        try:
            due = self.trigger.due_at(self._clock(), sup.deadline)
            while due is not None and not waiter.done():
                timeout = max(0.0, due - self._clock())
                done, _ = await asyncio.wait({waiter}, timeout=timeout)
                if done:
                    break
                due = None
                try:
                    status: JobStatus | None = await runner.status(handle)
                except GpuBridgeError as exc:  # 429/5xx: it may be running; find out by cancelling it
                    log.info("queue-timeout check of %s job %s failed (%s); cancelling it before rerouting",
                             runner.name, handle.job_id, exc)
                    status = None
                if status is not None and status.state is not JobState.QUEUED:
                    break  # it left the queue: wait for it to finish
                rerouting = True
                confirmed = await self._cancel_attempt(runner, handle)
                if confirmed is None:
                    break  # the reaper keeps cancelling; the attempt ends when that lands (or it finishes)
                if confirmed.state in (JobState.SUCCEEDED, JobState.FAILED):
                    return await waiter  # it finished first: its own result (or failure) stands
                raise self._stuck(handle, runner)
            try:
                return await waiter
            except JobCancelled:
                if rerouting and not sup.cancel_requested:
                    raise self._stuck(handle, runner) from None  # our own cancel, confirmed: reroute
                raise
        finally:
            if not waiter.done():
                waiter.cancel()
                with contextlib.suppress(BaseException):
                    await waiter
            elif not waiter.cancelled():
                # Ended (say with the JobCancelled of our own cancel) while the branch above decided what this
                # attempt's end is: read, so asyncio does not log it as never retrieved.
                waiter.exception()

    def _stuck(self, handle: JobHandle, runner: WorkflowRunner) -> JobTimeout:
        """A queued attempt, cancelled and confirmed: reroute it."""
        self.counters["stuck"] += 1
        err = JobTimeout(
            f"Job {handle.job_id} waited {self.config.queue_timeout:g}s in {runner.name}'s queue; cancelled",
            job_id=handle.job_id, provider=runner.name, state="queued", cancelled=True,
        )
        err.cancel_handled = True  # type: ignore[attr-defined]
        return err

    async def _cancel_attempt(self, runner: WorkflowRunner, handle: JobHandle) -> JobStatus | None:
        """Cancel an attempt and confirm it, bounded. Confirmed only by the provider's own terminal answer
        (cancelled, or the end the job reached first), returned; else None, and the reaper takes it."""
        try:
            status = await asyncio.wait_for(runner.cancel(handle), self.config.cancel_timeout_s)
            if status.state.is_terminal:
                return status
        except JobNotFound:
            return JobStatus(job_id=handle.job_id, provider=runner.name, state=JobState.CANCELLED,
                             message="the provider no longer has the job")
        except Exception as exc:
            log.warning("cancel of %s job %s failed: %s", runner.name, handle.job_id, exc)
        self._reap(runner, handle)
        return None

    def _reap(self, runner: WorkflowRunner, handle: JobHandle) -> None:
        """Keep cancelling until the provider says the job is terminal or gone, backing off; the runner's
        own rate limits pace it. After ``reap_for_s`` give up and report it in ``cancel_failures``."""
        key = (runner.name, handle.job_id)
        if key in self.unconfirmed_cancels:
            return
        self.unconfirmed_cancels[key] = 0
        give_up = self._clock() + self.config.reap_for_s

        async def reap() -> None:
            delay = self.config.reap_initial_s
            while key in self.unconfirmed_cancels:
                try:
                    status = await asyncio.wait_for(runner.cancel(handle), self.config.cancel_timeout_s)
                    if status.state.is_terminal:
                        self.unconfirmed_cancels.pop(key, None)
                        return
                except JobNotFound:
                    self.unconfirmed_cancels.pop(key, None)
                    return
                except Exception as exc:
                    log.info("reaper: cancel of %s job %s not confirmed yet: %s", runner.name, handle.job_id, exc)
                self.unconfirmed_cancels[key] += 1
                if self._clock() >= give_up:
                    self.unconfirmed_cancels.pop(key, None)
                    self.cancel_failures.append(key)
                    log.error("reaper: could not cancel %s job %s within %gs; it may have run",
                              runner.name, handle.job_id, self.config.reap_for_s)
                    return
                await asyncio.sleep(delay * (0.5 + self._rng.random() / 2))
                delay = min(self.config.reap_max_s, delay * 2)

        task = asyncio.create_task(reap(), name=f"reap-{handle.job_id[:8]}")
        self._reaper.add(task)
        task.add_done_callback(self._reaper.discard)

    # ------------------------------------------------------------------------------------------- events

    def _forward(self, sup: _Supervised, runner: WorkflowRunner, handle: JobHandle) -> None:
        if sup.forwarder is not None:
            sup.forwarder.cancel()

        async def forward() -> None:
            async for ev in runner.events(handle):
                if ev.terminal:
                    return  # the supervisor publishes the job's own terminal event
                sup.stream.publish(ev.model_copy(update={"job_id": sup.id, "data": {**ev.data, "attempt_job_id": handle.job_id}}))

        sup.forwarder = asyncio.create_task(forward(), name=f"failover-events-{sup.id[:12]}")

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        sup = self._jobs.get(job_id_of(job))
        if sup is None:
            name, inner = self._split(job_id_of(job))
            return self.runners[name].events(inner)
        if not sup.want_events:
            sup.want_events = True
            if sup.current is not None and not (sup.done and sup.done.done()):
                name, handle = sup.current
                self._forward(sup, self.runners[name], handle)
        return sup.stream.subscribe()

    # ------------------------------------------------------------------------------------------- queries

    def _split(self, job_id: str) -> tuple[str, str]:
        name, sep, inner = job_id.partition(":")
        if not sep or name not in self.runners:
            raise JobNotFound(f"Unknown job {job_id!r} (expected PROVIDER:ID)", job_id=job_id)
        return name, inner

    async def status(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        sup = self._jobs.get(job_id)
        if sup is None:
            name, inner = self._split(job_id)
            st = await self.runners[name].status(inner)
            return st.model_copy(update={"job_id": job_id})
        assert sup.done is not None
        if sup.done.done():
            exc = sup.done.exception()
            state = JobState.SUCCEEDED if exc is None else JobState.of_error(exc)
            provider = sup.current[0] if sup.current else self.name
            return JobStatus(job_id=job_id, provider=provider, state=state, error=_to_dict(exc) if exc else None)
        if sup.current is None:
            return JobStatus(job_id=job_id, provider=self.name, state=JobState.QUEUED)
        name, handle = sup.current
        try:
            st = await self.runners[name].status(handle)
        except GpuBridgeError as exc:
            return JobStatus(job_id=job_id, provider=name, state=JobState.QUEUED, message=f"status unavailable: {exc}")
        state = st.state if not st.state.is_terminal else JobState.RUNNING  # the supervisor decides the end
        return st.model_copy(update={"job_id": job_id, "state": state})

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        job_id = job_id_of(job)
        sup = self._jobs.get(job_id)
        if sup is None:
            name, inner = self._split(job_id)
            return await self.runners[name].wait(inner, timeout=timeout)
        assert sup.done is not None
        try:
            return await asyncio.wait_for(asyncio.shield(sup.done), timeout)
        except TimeoutError:
            raise JobTimeout(
                f"Stopped waiting for job {job_id} after {timeout:g}s", job_id=job_id, cancelled=False,
                state="running" if sup.current else "queued",
            ) from None

    async def cancel(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        sup = self._jobs.get(job_id)
        if sup is None:
            name, inner = self._split(job_id)
            st = await self.runners[name].cancel(inner)
            return st.model_copy(update={"job_id": job_id})
        self._request_cancel(sup)
        if sup.current is not None and not (sup.done and sup.done.done()):
            name, handle = sup.current
            await self._cancel_attempt(self.runners[name], handle)
        assert sup.done is not None
        if not sup.done.done():
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(sup.done), self.config.cancel_timeout_s)
        return await self.status(job_id)

    async def health(self) -> HealthReport:
        reports = await self.monitor.probe_all()
        components = self.monitor.snapshot()
        names = list(self.runners)
        primary_ok = reports[names[0]].ok and self.breakers[names[0]].state is not CircuitState.OPEN
        any_ok = any(r.ok and self.breakers[n].state is not CircuitState.OPEN for n, r in reports.items())
        state = HealthState.HEALTHY if primary_ok else HealthState.DEGRADED if any_ok else HealthState.UNHEALTHY
        served_by = next(
            (n for n in names if reports[n].ok and self.breakers[n].state is not CircuitState.OPEN), None
        )
        if len(names) == 1:
            # One provider (resilience settings but no fallbacks): its own report, so `health --json` keeps
            # the provider's shape (details.url, version, queue depth); an open circuit makes it unhealthy.
            report = reports[names[0]].model_copy(deep=True)
            report.provider = self.name
            if not primary_ok and report.ok:
                report.state = HealthState.UNHEALTHY
                report.message = f"{names[0]}'s circuit is open"
            report.details["circuit"] = self.breakers[names[0]].state.value
            return report
        return HealthReport(
            provider=self.name,
            state=state,
            message=None if primary_ok else (f"{names[0]} is down; serving from {served_by}" if served_by else "all providers down"),
            details={"components": components, "order": names},
        )

    async def aclose(self) -> None:
        await self.monitor.stop()
        for sup in list(self._jobs.values()):
            if sup.task is not None and not sup.task.done():
                sup.task.cancel()
        tasks = [s.task for s in self._jobs.values() if s.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in list(self._reaper):
            task.cancel()
        await asyncio.gather(*(r.aclose() for r in self.runners.values()), return_exceptions=True)


class _Peek:
    """A read-only view of a breaker for planning (does not reserve half-open trial slots)."""

    def __init__(self, breaker: CircuitBreaker):
        self._b = breaker

    def allow(self) -> bool:
        return self._b.would_allow()






def _to_dict(exc: BaseException | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    if isinstance(exc, GpuBridgeError):
        d = exc.to_dict()
        if exc.job_may_be_running:  # an unconfirmed submit, or a job whose cancel was not confirmed
            d["job_may_be_running"] = True
        return d
    return {"type": type(exc).__name__, "message": str(exc), "retryable": False}


def new_job_id() -> str:  # pragma: no cover - kept for callers that need ids before submission
    return uuid.uuid4().hex
