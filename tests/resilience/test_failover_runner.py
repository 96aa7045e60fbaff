"""FailoverRunner over scripted in-memory runners: every branch of the attempt loop, deterministically."""

from __future__ import annotations

import asyncio

import pytest

from gpubridge.errors import (
    AuthError,
    JobCancelled,
    JobFailed,
    JobTimeout,
    ProviderUnavailable,
    RateLimited,
    WorkflowInvalid,
)
from gpubridge.models import EventType, JobRequest, JobState
from gpubridge.resilience import CircuitState, FailoverRunner, JobOutcome, ResilienceConfig

from ..fakes import ScriptedRunner

WF = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}}


def req(**kw) -> JobRequest:
    return JobRequest(workflow=WF, **kw)


def make(*names: str, **cfg) -> tuple[FailoverRunner, list[ScriptedRunner], list[JobOutcome]]:
    runners = [ScriptedRunner(n) for n in names]
    outcomes: list[JobOutcome] = []
    config = ResilienceConfig(probe_interval_s=None, backoff_initial_s=0, **cfg)
    return FailoverRunner(runners, config, on_outcome=outcomes.append), runners, outcomes


async def test_primary_serves_when_healthy():
    fo, (modal, runpod), outcomes = make("modal", "runpod")
    task = asyncio.create_task(fo.run(req()))
    job = await modal.next_job()
    modal.start(job)
    modal.succeed(job)
    result = await task
    assert result.provider == "modal" and result.job_id == f"modal:{job}"
    assert [(a.provider, a.outcome) for a in result.attempts] == [("modal", "succeeded")]
    assert runpod.jobs == {}
    assert [o.state for o in outcomes] == [JobState.SUCCEEDED]


async def test_submit_error_fails_over_to_the_next_provider():
    fo, (modal, runpod), outcomes = make("modal", "runpod")
    modal.submit_errors.append(ProviderUnavailable("modal 503"))
    runpod.auto = "succeed"
    events: list = []
    result = await fo.run(req(), on_event=events.append)
    assert result.provider == "runpod"
    assert [(a.provider, a.outcome) for a in result.attempts] == [("modal", "failed"), ("runpod", "succeeded")]
    assert result.attempts[0].error["type"] == "ProviderUnavailable"
    assert outcomes[0].provider == "runpod" and len(outcomes) == 1


async def test_worker_crash_mid_run_fails_over_and_failover_is_visible_in_events():
    fo, (modal, runpod), _ = make("modal", "runpod")
    handle = await fo.submit(req())
    stream = fo.events(handle)
    job = await modal.next_job()
    modal.start(job)
    modal.fail(job, JobFailed("worker lost", retryable=True, job_id=job))
    job2 = await runpod.next_job()
    runpod.start(job2)
    runpod.succeed(job2)
    result = await fo.wait(handle)
    types = [e.type async for e in stream]
    assert result.provider == "runpod"
    assert EventType.FAILOVER in types and types[-1] is EventType.SUCCEEDED
    assert types.count(EventType.SUCCEEDED) == 1


@pytest.mark.parametrize("error", [WorkflowInvalid(error={"message": "bad"}), AuthError("401")])
async def test_invalid_workflow_and_auth_never_fail_over(error):
    fo, (modal, runpod), outcomes = make("modal", "runpod")
    modal.submit_errors.append(error)
    with pytest.raises(type(error)):
        await fo.run(req())
    assert runpod.jobs == {}
    assert outcomes[0].state is JobState.FAILED and outcomes[0].error == type(error).__name__


async def test_node_error_inside_the_workflow_is_not_retried():
    fo, (modal, runpod), _ = make("modal", "runpod")
    task = asyncio.create_task(fo.run(req()))
    job = await modal.next_job()
    modal.fail(job, JobFailed("node 3 raised", node_id="3", job_id=job))
    with pytest.raises(JobFailed, match="node 3"):
        await task
    assert runpod.jobs == {}


async def test_stuck_in_queue_is_cancelled_then_rerouted():
    fo, (runpod, modal), _ = make("runpod", "modal", queue_timeout=0.05)
    modal.auto = "succeed"
    result = await fo.run(req())  # runpod's job never leaves its queue
    (stuck,) = runpod.jobs
    assert runpod.cancelled == [stuck]
    assert result.provider == "modal"
    assert [(a.provider, a.outcome) for a in result.attempts] == [("runpod", "stuck"), ("modal", "succeeded")]
    assert fo.counters["stuck"] == 1


async def test_running_job_is_not_rerouted_by_queue_timeout():
    fo, (runpod, modal), _ = make("runpod", "modal", queue_timeout=0.05)
    task = asyncio.create_task(fo.run(req()))
    job = await runpod.next_job()
    runpod.start(job)  # it left the queue before the trigger
    await asyncio.sleep(0.1)  # past queue_timeout: a running job must be left alone
    assert not task.done() and runpod.cancelled == []
    runpod.succeed(job)
    assert (await task).provider == "runpod"


async def test_a_job_that_may_still_run_is_cancelled_before_resubmission():
    fo, (modal, runpod), _ = make("modal", "runpod")
    order: list[str] = []
    real_cancel, real_submit = modal.cancel, runpod.submit

    async def cancel(job):
        order.append("cancel modal")
        return await real_cancel(job)

    async def submit(request):
        order.append("submit runpod")
        return await real_submit(request)

    modal.cancel, runpod.submit = cancel, submit
    runpod.auto = "succeed"
    task = asyncio.create_task(fo.run(req()))
    job = await modal.next_job()
    modal.start(job)
    # the wait broke off while the job may still be running (e.g. a dropped connection)
    modal.fail(job, JobTimeout("lost track", state="running", cancelled=False, job_id=job))
    result = await task
    assert order == ["cancel modal", "submit runpod"]
    assert result.provider == "runpod"


async def test_late_result_of_a_cancelled_attempt_is_not_delivered():
    fo, (runpod, modal), outcomes = make("runpod", "modal", queue_timeout=0.05)
    modal.auto = "succeed"
    result = await fo.run(req())
    (stuck,) = runpod.jobs
    runpod.succeed(stuck)  # too late: already cancelled
    assert result.provider == "modal" and len(outcomes) == 1
    assert runpod.jobs[stuck].state is JobState.CANCELLED


async def test_every_circuit_open_still_tries_in_panic_mode():
    fo, (modal, runpod), _ = make("modal", "runpod", breaker_consecutive_failures=1, max_attempts=1)
    for b in fo.breakers.values():
        b.record_failure()
    assert all(b.state is CircuitState.OPEN for b in fo.breakers.values())
    modal.auto = "succeed"
    result = await fo.run(req())
    assert result.provider == "modal" and fo.counters["panic"] == 1


async def test_open_circuit_is_skipped():
    fo, (modal, runpod), _ = make("modal", "runpod", breaker_consecutive_failures=2)
    modal.submit_errors += [ProviderUnavailable("a"), ProviderUnavailable("b")]
    runpod.auto = "succeed"
    await fo.run(req())
    await fo.run(req())
    assert fo.breakers["modal"].state is CircuitState.OPEN
    result = await fo.run(req())
    assert [a.provider for a in result.attempts] == ["runpod"]


async def test_single_provider_retries_after_backoff_honouring_retry_after():
    fo, (only,), _ = make("only", max_attempts=3)
    only.submit_errors.append(RateLimited("429", retry_after=0.01))
    only.auto = "succeed"
    result = await fo.run(req())
    assert [(a.provider, a.outcome) for a in result.attempts] == [("only", "failed"), ("only", "succeeded")]


async def test_attempts_are_bounded():
    fo, (modal, runpod), outcomes = make("modal", "runpod", max_attempts=2)
    modal.submit_errors.append(ProviderUnavailable("m"))
    runpod.submit_errors.append(ProviderUnavailable("r"))
    with pytest.raises(ProviderUnavailable, match="r"):
        await fo.run(req())
    assert len(outcomes[0].attempts) == 2


async def test_nothing_is_retried_past_the_deadline():
    fo, (only,), _ = make("only", max_attempts=10)
    only.submit_errors += [ProviderUnavailable("x")] * 10
    with pytest.raises(ProviderUnavailable):
        await fo.run(req(timeout=0.05))
    assert len(only.jobs) == 0


async def test_retry_budget_stops_retry_storms():
    fo, (modal, runpod), _ = make("modal", "runpod", retry_budget_ratio=0.0, retry_budget_min_per_s=0.0)
    modal.submit_errors.append(ProviderUnavailable("m"))
    with pytest.raises(ProviderUnavailable):
        await fo.run(req())
    assert runpod.jobs == {} and fo.budget.refused == 1


async def test_cancel_reaches_the_underlying_job():
    fo, (modal, runpod), outcomes = make("modal", "runpod")
    handle = await fo.submit(req())
    (job,) = modal.jobs
    status = await fo.cancel(handle)
    assert modal.cancelled == [job] and status.state is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        await fo.wait(handle)
    assert runpod.jobs == {} and outcomes[0].state is JobState.CANCELLED


async def test_ids_from_another_process_route_to_their_provider():
    fo, (modal, runpod), _ = make("modal", "runpod")
    inner = await runpod.submit(req())
    runpod.start(inner.job_id)
    st = await fo.status(f"runpod:{inner.job_id}")
    assert st.state is JobState.RUNNING and st.job_id == f"runpod:{inner.job_id}"


async def test_health_aggregates_components():
    fo, (modal, runpod), _ = make("modal", "runpod")
    assert (await fo.health()).state.value == "healthy"
    modal.health_state = modal.health_state.__class__.UNHEALTHY
    report = await fo.health()
    assert report.state.value == "degraded" and "serving from runpod" in report.message
    assert [c["provider"] for c in report.details["components"]] == ["modal", "runpod"]
