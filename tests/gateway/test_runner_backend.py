"""RunnerBackend: the gateway's job records over a runner (the local provider in front of the ComfyUI double),
kept in SQLite, so that a gateway that dies mid-job and starts again still answers for the job."""

from __future__ import annotations

import asyncio

import pytest

from gpubridge.errors import (
    JobNotFound,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowInvalid,
)
from gpubridge.models import JobRequest, JobState
from gpubridge.providers.local import LocalRunner
from gpubridge.runner import RunnerWrapper
from gpubridge.server.runner_backend import RunnerBackend, run_key
from gpubridge.server.schema import JobRecord

from .conftest import FakeClock, invert, request


async def _until(backend: RunnerBackend, job_id: str, *states: JobState, wait: float = 30.0):
    env = await backend.get(job_id)
    loop = asyncio.get_running_loop()
    end = loop.time() + wait
    while env.status.state not in states:
        assert loop.time() < end, f"job stayed {env.status.state}"
        env = await backend.get(job_id, wait=end - loop.time(), after=env.version)
    return env


def _crash(backend: RunnerBackend) -> None:
    """Stop following, as a killed process would: nothing is written, nothing is cancelled."""
    backend._closed = True
    if backend._keeper is not None:
        backend._keeper.cancel()
    for task in list(backend._tasks.values()):
        task.cancel()


async def test_a_job_runs_and_its_result_is_served_from_the_store(local, store):
    backend = RunnerBackend(local, store, accept_wait=5.0)
    await backend.start()
    env = await backend.submit(request())
    env = await _until(backend, env.job_id, JobState.SUCCEEDED)
    assert env.result is not None and len(env.result.artifacts) == 2
    assert env.result.job_id == env.job_id
    # Another gateway on the same store (no result cache) serves the same result.
    other = RunnerBackend(local, store)
    again = await other.get(env.job_id)
    assert again.status.state is JobState.SUCCEEDED
    assert [a.filename for a in again.result.artifacts] == [a.filename for a in env.result.artifacts]
    assert await store.get(run_key(env.job_id)) is None  # nothing left to follow
    backend._closed = other._closed = True


async def test_an_invalid_workflow_fails_the_submit_and_leaves_no_job(local, store, comfy):
    backend = RunnerBackend(local, store, accept_wait=5.0)
    bad = JobRequest(workflow=invert().with_values({"Canvas.width": -5}))
    with pytest.raises(WorkflowInvalid) as info:
        await backend.submit(bad)
    assert "width" in str(info.value)
    assert await store.keys("job:") == [] and await store.keys("run:") == []
    assert comfy.stats.prompts_accepted == 0
    await backend.aclose()


async def test_a_gateway_killed_mid_job_and_restarted_delivers_the_result_without_running_it_twice(
    comfy, store
):
    comfy.hold("ImageInvert")
    first = RunnerBackend(LocalRunner(comfy.url), store, owner="gw-same")
    await first.start()
    env = await first.submit(request())
    await _until(first, env.job_id, JobState.RUNNING)
    _crash(first)

    second = RunnerBackend(LocalRunner(comfy.url), store, owner="gw-same")
    await second.start()  # adopts its own job at once (same owner id)
    assert env.job_id in second._tasks
    comfy.release("ImageInvert")
    done = await _until(second, env.job_id, JobState.SUCCEEDED)
    assert done.result is not None and len(done.result.artifacts) == 2
    assert comfy.stats.prompts_accepted == 1  # adopted by its handle, never resubmitted
    await second.aclose()
    await first.runner.aclose()


async def test_another_replica_adopts_a_job_only_when_its_lease_has_run_out(comfy, store):
    clock = FakeClock()
    comfy.hold("ImageInvert")
    first = RunnerBackend(LocalRunner(comfy.url), store, owner="gw-a", lease=15.0, clock=clock)
    await first.start()
    env = await first.submit(request())
    await _until(first, env.job_id, JobState.RUNNING)
    _crash(first)

    second = RunnerBackend(LocalRunner(comfy.url), store, owner="gw-b", lease=15.0, clock=clock)
    await second._adopt()
    assert second._tasks == {}  # gw-a's lease still holds
    clock.advance(16.0)
    await second._adopt()
    assert env.job_id in second._tasks
    assert (await store.get(run_key(env.job_id)))["owner"] == "gw-b"
    comfy.release("ImageInvert")
    await _until(second, env.job_id, JobState.SUCCEEDED)
    assert comfy.stats.prompts_accepted == 1
    await second.aclose()
    await first.runner.aclose()


async def test_a_job_whose_handle_was_never_recorded_is_settled_failed_after_the_grace(local, store):
    clock = FakeClock()
    record = JobRecord(job_id="job-lost", version=1, submitted_at=clock(), deadline=clock() + 600)
    await store.save(record)
    await store.put(run_key("job-lost"), {"owner": "gw-dead", "lease_until": clock() + 15,
                                          "accepted_at": clock(), "handle": None})
    backend = RunnerBackend(local, store, owner="gw-new", orphan_grace=60.0, clock=clock)
    clock.advance(20)
    await backend._adopt()
    assert (await backend.get("job-lost")).status.state is JobState.QUEUED  # within the grace
    clock.advance(60)
    await backend._adopt()
    env = await backend.get("job-lost")
    assert env.status.state is JobState.FAILED
    assert env.status.error["type"] == "ProviderUnavailable"
    assert env.status.error["job_may_be_running"] is True
    assert await store.get(run_key("job-lost")) is None


class _Flaky(RunnerWrapper):
    """The backend answers ``wait`` with transient errors a few times (429s, 5xx) before its result."""

    def __init__(self, inner, errors):
        super().__init__(inner)
        self.errors = list(errors)

    async def wait(self, job, *, timeout=None):
        if self.errors:
            raise self.errors.pop(0)
        return await self.inner.wait(job, timeout=timeout)


async def test_transient_errors_while_following_never_settle_the_job(local, store):
    flaky = _Flaky(local, [RateLimited("slow down", retry_after=0.01), ProviderUnavailable("502 from the edge")])
    backend = RunnerBackend(flaky, store)
    env = await backend.submit(request())
    done = await _until(backend, env.job_id, JobState.SUCCEEDED, JobState.FAILED)
    assert done.status.state is JobState.SUCCEEDED
    assert flaky.errors == []
    await backend.aclose()


async def test_a_running_job_is_cancelled(comfy, local, store):
    comfy.hold("ImageInvert")  # held until ComfyUI has the interrupt, not a delay the cancel must beat
    backend = RunnerBackend(local, store, cancel_wait=30.0)
    env = await backend.submit(request())
    await _until(backend, env.job_id, JobState.RUNNING)
    cancelling = asyncio.create_task(backend.cancel(env.job_id))
    await comfy.wait_until(lambda: comfy.stats.interrupts > 0, timeout=30)
    comfy.release("ImageInvert")  # the node ends; ComfyUI stops the job before its next node
    env = await cancelling
    assert env.status.state is JobState.CANCELLED
    assert env.status.error["type"] == "JobCancelled"
    await backend.aclose()


async def test_a_job_past_its_deadline_ends_timed_out(comfy, local, store):
    comfy.faults.delays = {"ImageInvert": 3.0}
    backend = RunnerBackend(local, store)
    env = await backend.submit(request(timeout=1.0))
    done = await _until(backend, env.job_id, JobState.TIMED_OUT, JobState.SUCCEEDED, JobState.FAILED)
    assert done.status.state is JobState.TIMED_OUT
    await backend.aclose()


async def test_max_active_refuses_with_rate_limited_and_keeps_nothing(comfy, local, store):
    comfy.hold("ImageInvert")
    backend = RunnerBackend(local, store, max_active=1)
    first = await backend.submit(request())
    with pytest.raises(RateLimited) as info:
        await backend.submit(request())
    assert info.value.retry_after and info.value.retry_after > 0
    assert await store.keys("job:") == [f"job:{first.job_id}"]
    comfy.release("ImageInvert")
    await _until(backend, first.job_id, JobState.SUCCEEDED)
    await backend.aclose()


async def test_finished_jobs_expire_after_the_retention(local, store):
    clock = FakeClock()
    backend = RunnerBackend(local, store, retention=60.0, clock=clock)
    env = await backend.submit(request())
    await _until(backend, env.job_id, JobState.SUCCEEDED)
    clock.advance(61)
    with pytest.raises(ResultExpired):
        await backend.get(env.job_id)
    await backend._prune()
    assert await store.keys("result:") == [] and await store.keys("job:") == []
    with pytest.raises(JobNotFound):
        await backend.get(env.job_id)
    await backend.aclose()


async def test_results_are_cached_within_a_byte_bound_and_served_from_the_store_beyond_it(local, store):
    backend = RunnerBackend(local, store, result_cache_bytes=1)  # any real output is over the bound
    env = await backend.submit(request())
    done = await _until(backend, env.job_id, JobState.SUCCEEDED)
    assert backend._results == {} and backend._cached_bytes == 0
    assert done.result is not None and len(done.result.artifacts) == 2
    assert all(a.data for a in done.result.artifacts)
    await backend.aclose()


async def test_the_gateway_uploads_large_outputs_of_a_provider_that_returns_bytes(comfy, local, store,
                                                                                  store_settings):
    """The local provider hands back bytes; with an artifact store the gateway keeps and serves URLs, and the
    RunPod facade lists them as worker-comfyui's ``s3_url`` entries."""
    from gpubridge.server.runpod_shapes import output_of
    from gpubridge.storage import ArtifactStore

    comfy.faults.output_size = 1_500_000  # over the 1 MB threshold
    backend = RunnerBackend(local, store, accept_wait=5.0, artifacts=ArtifactStore(store_settings))
    await backend.start()
    env = await backend.submit(request())
    env = await _until(backend, env.job_id, JobState.SUCCEEDED)
    arts = env.result.artifacts
    assert arts and all(a.holds == "url" and a.size == 1_500_000 for a in arts)
    again = await RunnerBackend(local, store).get(env.job_id)  # from the store: URLs, not bytes
    assert [a.url for a in again.result.artifacts] == [a.url for a in arts]
    entries = output_of(again.result)["images"]
    assert all(e["type"] == "s3_url" and e["data"].startswith(store_settings.endpoint_url) for e in entries)
    assert entries[0]["sha256"] == arts[0].sha256
    backend._closed = True
