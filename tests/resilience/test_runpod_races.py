"""Issue 23: failover between two RunPod endpoint doubles on loopback, RunPod's limits enforced.

No orphan and no double run: a failed-over attempt is cancelled (and the cancel confirmed by RunPod)
before the job runs elsewhere; a cancel that finds the job finished delivers that result; a caller's
cancel is never lost; the breaker and health only learn from what says something about the backend.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gpubridge.errors import JobCancelled, WorkflowInvalid
from gpubridge.models import EventType, HealthState, JobRequest
from gpubridge.providers.runpod import RunPodRunner
from gpubridge.resilience import CircuitState, FailoverRunner, ResilienceConfig
from gpubridge.resilience.breaker import BreakerConfig, CircuitBreaker
from gpubridge.resilience.health import HealthMonitor
from gpubridge.testing.runpod import RunPodEndpointDouble

from ..fakes import ScriptedRunner
from ..runpod.conftest import API_KEY

WF = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


class Gate:
    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, job: dict[str, Any]) -> Any:
        if job["input"].get("gpubridge", {}).get("tags", {}).get("hold"):
            await self.open.wait()
        return {"images": [{"filename": "out.png", "type": "base64", "data": PNG}]}


@pytest.fixture
async def gate() -> Gate:
    return Gate()


@pytest.fixture
async def pair(gate: Gate) -> AsyncIterator[tuple[RunPodEndpointDouble, RunPodEndpointDouble]]:
    async with RunPodEndpointDouble(gate, api_key=API_KEY, endpoint_id="ep-a", rate_limits=True) as a, \
            RunPodEndpointDouble(gate, api_key=API_KEY, endpoint_id="ep-b", rate_limits=True) as b:
        yield a, b


def rp_runner(double: RunPodEndpointDouble, name: str, **kw: Any) -> RunPodRunner:
    options: dict[str, Any] = dict(api_key=API_KEY, base_url=double.base_url, name=name, poll_initial=0.005,
                                   poll_max=0.05, retry_initial=0.0, retry_max_wait=0.05, health_resample=0)
    options.update(kw)
    return RunPodRunner(double.endpoint_id, **options)


def req(hold: bool = False, **kw: Any) -> JobRequest:
    return JobRequest(workflow=WF, tags={"hold": "1"} if hold else {}, **kw)


def failover(runners: list[Any], **cfg: Any) -> FailoverRunner:
    config = dict(probe_interval_s=None, backoff_initial_s=0.0, cancel_timeout_s=5.0, reap_initial_s=0.05)
    config.update(cfg)
    return FailoverRunner(runners, ResilienceConfig(**config))


async def test_a_429_storm_does_not_fail_over_a_running_job(pair, gate: Gate):
    """Defect 3: after six 429s on /status the failover runner took the cached FAILED as a confirmed
    cancel: no /cancel sent, and the job ran on both endpoints."""
    a, b = pair
    runner = failover([rp_runner(a, "a", max_attempts=2), rp_runner(b, "b")])
    try:
        handle = await runner.submit(req(hold=True, timeout=30))
        await a.wait_for(lambda d: d.in_progress == 1)
        a.throttle_routes = {"status"}
        a.throttle = 6
        drained = asyncio.ensure_future(a.wait_for(lambda d: d.throttle == 0))
        rerouted = asyncio.ensure_future(b.wait_for(lambda d: d.counters["submitted"] > 0))  # main did
        await asyncio.wait({drained, rerouted}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        rerouted.cancel()
        gate.open.set()
        result = await asyncio.wait_for(runner.wait(handle), 10)
        assert result.provider == "a"
        assert b.counters["submitted"] == 0 and sum(a.completions.values()) == 1
    finally:
        await runner.aclose()


async def test_a_failed_queue_timeout_check_cancels_before_rerouting(pair):
    """Defect 4: with /status rate-limited at the queue-timeout check, the attempt failed over with no
    cancel at all; the original stayed IN_QUEUE and ran later beside the rerouted copy."""
    a, b = pair
    a.workers = 0
    runner = failover([rp_runner(a, "a", max_attempts=1), rp_runner(b, "b")], queue_timeout=0.3)
    try:
        handle = await runner.submit(req(timeout=30))
        a.throttle_routes = {"status"}
        a.throttle = 10**6
        result = await asyncio.wait_for(runner.wait(handle), 10)
        assert result.provider == "b"
        (original,) = a.job_ids
        assert a.status_of(original) == "CANCELLED"
        a.throttle = 0
        a.workers = 1
        assert not a.handler_runs and sum(b.completions.values()) == 1
    finally:
        await runner.aclose()


async def test_a_cancel_answered_completed_delivers_that_result(pair):
    """Defect 9: the queue-timeout reroute took a cancel that answered COMPLETED as a confirmed cancel,
    and ran the job again elsewhere; the result in hand was lost."""
    a, b = pair
    a.workers = 0

    class FinishFirst(httpx.AsyncBaseTransport):
        """Lets the job finish at RunPod just before the /cancel reaches it (the race, made certain)."""

        def __init__(self) -> None:
            self.real = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if "/cancel/" in request.url.path:
                job_id = request.url.path.rsplit("/", 1)[1]
                a.workers = 1
                await a.wait_status(job_id, "COMPLETED")
            return await self.real.handle_async_request(request)

        async def aclose(self) -> None:
            await self.real.aclose()

    runner = failover([rp_runner(a, "a", transport=FinishFirst()), rp_runner(b, "b")], queue_timeout=0.2)
    try:
        result = await asyncio.wait_for(runner.run(req(timeout=30)), 10)
        assert result.provider == "a" and result.images
        assert b.counters["submitted"] == 0 and sum(a.completions.values()) == 1
    finally:
        await runner.aclose()


async def test_a_cancel_during_the_backoff_is_not_lost(pair):
    """Defect 6: the caller's cancel() arrived during the backoff between two attempts; the next attempt
    was submitted anyway, ran to completion, and wait() returned a result."""
    a, _ = pair
    a.crash_next = 1  # the first attempt fails with a worker crash: retried on the same endpoint

    class Patient:
        def uniform(self, low: float, high: float) -> float:
            return high

        def random(self) -> float:
            return 0.5

    runner = FailoverRunner([rp_runner(a, "a")], ResilienceConfig(
        probe_interval_s=None, backoff_initial_s=30.0, backoff_max_s=30.0, cancel_timeout_s=2.0), rng=Patient())
    try:
        events: list[Any] = []
        retrying = asyncio.Event()

        def on_event(ev: Any) -> None:
            events.append(ev)
            if ev.type is EventType.RETRYING:
                retrying.set()

        run = asyncio.ensure_future(runner.run(req(timeout=60), on_event=on_event))
        await asyncio.wait_for(retrying.wait(), 10)
        job_id = events[0].job_id
        await runner.cancel(job_id)
        with pytest.raises(JobCancelled):
            await asyncio.wait_for(run, 5)
        assert a.counters["submitted"] == 1 and not a.completions
    finally:
        await runner.aclose()


async def test_a_half_open_trial_cancelled_by_the_caller_does_not_close_the_circuit(pair):
    """Defect 8: a half-open circuit's trial, cancelled by the caller, was recorded as a success and
    closed the circuit; the next jobs all went to the broken endpoint and sat IN_QUEUE."""
    a, b = pair
    a.workers = 0
    now = [0.0]
    runner = FailoverRunner([rp_runner(a, "a"), rp_runner(b, "b")], ResilienceConfig(
        probe_interval_s=None, breaker_consecutive_failures=1, breaker_open_for_s=10.0, cancel_timeout_s=5.0),
        clock=lambda: now[0])
    try:
        breaker = runner.breakers["a"]
        breaker.record_failure()
        assert breaker.state is CircuitState.OPEN
        now[0] += 11.0
        assert breaker.state is CircuitState.HALF_OPEN
        handle = await runner.submit(req(timeout=60))
        assert handle.job_id.startswith("a:")  # the trial
        await runner.cancel(handle)
        with pytest.raises(JobCancelled):
            await runner.wait(handle)
        assert breaker.state is CircuitState.HALF_OPEN  # neither closed nor re-opened
        assert breaker.would_allow()  # its trial slot is free again
    finally:
        await runner.aclose()


def test_outcomes_that_say_nothing_leave_a_half_open_circuit_alone():
    now = [0.0]
    breaker = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_for_s=1.0), clock=lambda: now[0])
    breaker.record_failure()
    now[0] = 2.0
    for outcome in (WorkflowInvalid("bad graph"), JobCancelled("by the caller"), asyncio.CancelledError()):
        assert breaker.allow()
        breaker.record(outcome)
        assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow()
    breaker.record(None)
    assert breaker.state is CircuitState.CLOSED


async def test_only_healthy_half_opens_a_circuit():
    """Defect 7 (second half): a degraded endpoint (a growing queue, no worker) counted as ok and half-
    opened an open circuit long before its open period ended."""
    runner = ScriptedRunner("x")
    now = [0.0]
    breaker = CircuitBreaker("x", BreakerConfig(consecutive_failures=1, open_for_s=100.0), clock=lambda: now[0])
    monitor = HealthMonitor({"x": runner}, {"x": breaker}, interval_s=None)
    breaker.record_failure()
    runner.health_state = HealthState.DEGRADED
    await monitor.probe("x")
    assert breaker.state is CircuitState.OPEN
    runner.health_state = HealthState.HEALTHY
    await monitor.probe("x")
    assert breaker.state is CircuitState.HALF_OPEN


async def test_reaper_gives_up_within_its_horizon_and_reports(pair):
    """The reaper keeps cancelling within RunPod's limits until the job is terminal or expired, and
    reports what it could not cancel."""
    a, _ = pair
    a.workers = 0
    inner = rp_runner(a, "a", max_attempts=1)
    runner = failover([inner], reap_for_s=0.2, reap_initial_s=0.02, reap_max_s=0.05)
    try:
        handle = await inner.submit(req(timeout=30))
        a.throttle_routes = {"cancel"}
        a.throttle = 10**6
        assert await runner._cancel_attempt(inner, handle) is None
        await asyncio.wait_for(asyncio.gather(*runner._reaper), 10)
        assert runner.cancel_failures == [("a", handle.job_id)] and not runner.unconfirmed_cancels
        a.throttle = 0
    finally:
        await runner.aclose()
