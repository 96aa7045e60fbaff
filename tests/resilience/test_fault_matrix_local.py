"""Fault injection on loopback: two ComfyUI doubles behind two local providers, wrapped in FailoverRunner.

Each fault ends in a result (through retry or failover) or in the right typed error, before the
deadline; no remote job is left running (orphans) and no result is delivered twice.
"""

from __future__ import annotations

import pytest

from gpubridge.errors import AuthError, JobFailed, WorkflowInvalid
from gpubridge.models import EventType, JobRequest, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.resilience import FailoverRunner, JobOutcome, ResilienceConfig
from gpubridge.testing import ComfyDouble, CrashFault, DropFault, ErrorFault

from ..conftest import EXAMPLES

INVERT = Workflow.load(EXAMPLES / "model_free_invert.json")


@pytest.fixture
async def doubles(tmp_path):
    async with ComfyDouble(root=tmp_path / "a") as a, ComfyDouble(root=tmp_path / "b") as b:
        yield a, b


@pytest.fixture
async def failover(doubles):
    a, b = doubles
    outcomes: list[JobOutcome] = []
    runner = FailoverRunner(
        [LocalRunner(a.url, name="primary", reconnect_timeout=0.5), LocalRunner(b.url, name="fallback")],
        ResilienceConfig(probe_interval_s=None, queue_timeout=0.3, backoff_initial_s=0.01),
        on_outcome=outcomes.append,
    )
    runner.outcomes = outcomes
    yield runner
    await runner.aclose()


async def no_orphans(*doubles: ComfyDouble) -> None:
    for d in doubles:
        if not d.crashed:
            await d.wait_for_idle()
            assert d.queue_remaining == 0
            assert all(j.state != "running" for j in d.jobs.values())


async def test_primary_crash_mid_job_fails_over(failover, doubles):
    a, b = doubles
    a.faults.crash = CrashFault(class_type="ImageInvert")
    events: list = []
    result = await failover.run(JobRequest(workflow=INVERT), on_event=events.append)
    assert result.provider == "fallback" and len(result.images) == 2
    assert [x.provider for x in result.attempts] == ["primary", "fallback"]
    assert any(e.type is EventType.FAILOVER for e in events)
    assert len(failover.outcomes) == 1
    await no_orphans(b)


async def test_stuck_queue_is_rerouted_and_the_original_dequeued(failover, doubles):
    a, b = doubles
    a.faults.paused = True
    result = await failover.run(JobRequest(workflow=INVERT))
    assert result.provider == "fallback" and result.attempts[0].outcome == "stuck"
    assert a.stats.deletes == 1 and a.queue_remaining == 0  # never left queued at the primary
    a.faults.paused = False
    await no_orphans(a, b)


async def test_websocket_drop_is_absorbed_without_failover(failover, doubles):
    a, b = doubles
    a.faults.drop_ws = DropFault(after="execution_start")
    result = await failover.run(JobRequest(workflow=INVERT))
    assert result.provider == "primary" and len(result.attempts) == 1
    assert b.stats.prompts_received == 0
    await no_orphans(a, b)


async def test_execution_error_in_the_workflow_is_not_failed_over(failover, doubles):
    a, b = doubles
    a.faults.error = ErrorFault(class_type="ImageInvert")
    with pytest.raises(JobFailed) as info:
        await failover.run(JobRequest(workflow=INVERT))
    assert info.value.node_type == "ImageInvert"
    assert b.stats.prompts_received == 0
    await no_orphans(a, b)


async def test_out_of_memory_worker_error_is_failed_over_when_marked_retryable(doubles, tmp_path):
    # A provider may classify a worker fault as retryable; the failover layer then reroutes it.
    a, b = doubles

    class OomAsRetryable(LocalRunner):
        async def wait(self, job, *, timeout=None):
            try:
                return await super().wait(job, timeout=timeout)
            except JobFailed as exc:
                if "OutOfMemory" in (exc.exception_type or ""):
                    exc.retryable = True
                raise

    runner = FailoverRunner([OomAsRetryable(a.url, name="primary"), LocalRunner(b.url, name="fallback")],
                            ResilienceConfig(probe_interval_s=None))
    try:
        a.faults.error = ErrorFault(class_type="ImageInvert", exception_type="torch.OutOfMemoryError")
        result = await runner.run(JobRequest(workflow=INVERT))
        assert result.provider == "fallback"
    finally:
        await runner.aclose()


async def test_invalid_workflow_never_reaches_either_provider(failover, doubles):
    a, b = doubles
    with pytest.raises(WorkflowInvalid):
        await failover.run(JobRequest(workflow=INVERT.with_values({"Canvas.width": 0})))
    assert a.stats.prompts_received == 0 and b.stats.prompts_received == 0


async def test_both_down_ends_in_a_typed_error_before_the_deadline(failover, doubles):
    a, b = doubles
    await a.crash()
    await b.crash()
    from gpubridge.errors import ProviderUnavailable

    with pytest.raises(ProviderUnavailable):
        await failover.run(JobRequest(workflow=INVERT, timeout=30))
    assert failover.outcomes[-1].state.value == "failed"


async def test_bad_auth_is_not_failed_over(failover, doubles):
    a, b = doubles

    class Rejecting(LocalRunner):
        async def submit(self, request):
            raise AuthError("ComfyUI proxy answered 401", provider=self.name)

    runner = FailoverRunner([Rejecting(a.url, name="primary"), LocalRunner(b.url, name="fallback")],
                            ResilienceConfig(probe_interval_s=None))
    try:
        with pytest.raises(AuthError):
            await runner.run(JobRequest(workflow=INVERT))
        assert b.stats.prompts_received == 0
    finally:
        await runner.aclose()
