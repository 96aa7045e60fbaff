"""The Modal job backend against fakes of spawn, FunctionCall and Dict with modal 1.x semantics; then the same
backend running a real ComfyWorker (the GPU method's code) against the ComfyUI double."""

from __future__ import annotations

import asyncio
import time

import modal.exception
import pytest
from modal_app.backends import ModalBackend
from gpubridge.server.schema import HEALTH_KEY, JobRecord
from modal_app.worker import ComfyWorker, ModalDictStore

from gpubridge.comfy import ComfyClient
from gpubridge.errors import JobNotFound, PayloadTooLarge, ProviderUnavailable, RateLimited, ResultExpired
from gpubridge.models import HealthReport, HealthState, JobRequest, JobState, Progress, Workflow

from .conftest import WORKFLOWS
from .fakes import FakeDict, FakeModal


def invert() -> Workflow:
    return Workflow.load(WORKFLOWS / "model_free_invert.json")


def backend_for(fake: FakeModal, d: FakeDict | None = None, **kw) -> ModalBackend:
    return ModalBackend(
        spawn=fake.spawn,
        from_id=fake.from_id,
        store=ModalDictStore(d or FakeDict()),
        poll_interval=0.05,
        **kw,
    )


async def test_submit_spawns_and_records_queued():
    fake, d = FakeModal(), FakeDict()
    backend = backend_for(fake, d, default_timeout=123)
    before = time.time()
    env = await backend.submit(JobRequest(workflow=invert(), tags={"a": "b"}))
    assert env.job_id == "fc-000001" and env.status.state is JobState.QUEUED and env.version == 0
    [(payload, submitted_at)] = fake.spawned
    assert payload["timeout"] == 123 and payload["tags"] == {"a": "b"} and submitted_at >= before
    assert env.deadline == pytest.approx(submitted_at + 123)
    assert d.data["job:fc-000001"]["state"] == "queued"
    # Pending: get(timeout=0) raises the builtin TimeoutError, so the record answers.
    assert (await backend.get(env.job_id)).status.state is JobState.QUEUED


async def test_submit_keeps_the_record_a_fast_worker_wrote():
    fake, d = FakeModal(), FakeDict()
    original = fake.spawn

    async def spawn_and_start(payload, submitted_at):
        call = await original(payload, submitted_at)
        d.data[f"job:{call.object_id}"] = JobRecord(
            job_id=call.object_id, state=JobState.RUNNING, version=1
        ).dump()
        return call

    fake.spawn = spawn_and_start
    env = await backend_for(fake, d).submit(JobRequest(workflow=invert()))
    assert env.status.state is JobState.RUNNING and env.version == 1


async def test_running_with_progress_then_result_through_a_long_poll():
    fake, d = FakeModal(), FakeDict()
    backend = backend_for(fake, d)
    env = await backend.submit(JobRequest(workflow=invert()))
    key = f"job:{env.job_id}"
    rec = JobRecord.model_validate(d.data[key]).bump(
        state=JobState.RUNNING, started_at=time.time(), progress=Progress(node_id="2", value=3, max=10)
    )
    d.data[key] = rec.dump()
    running = await backend.get(env.job_id, wait=30, after=env.version)  # answers: the version passed
    assert running.status.state is JobState.RUNNING and running.status.progress.value == 3

    poll = asyncio.create_task(backend.get(env.job_id, wait=30))  # waits for the end
    result = {"job_id": env.job_id, "provider": "modal", "artifacts": [], "outputs": {"3": {}}}
    fake.calls[env.job_id].finish(
        {"job_id": env.job_id, "state": "succeeded", "result": result, "error": None}
    )
    done = await poll
    assert done.status.state is JobState.SUCCEEDED and done.result.outputs == {"3": {}}
    assert done.version > running.version


async def test_expired_and_unknown_calls():
    fake, d = FakeModal(), FakeDict()
    backend = backend_for(fake, d)
    env = await backend.submit(JobRequest(workflow=invert()))
    fake.calls[env.job_id].expired = True  # OutputExpiredError: not a builtin TimeoutError
    assert not issubclass(modal.exception.OutputExpiredError, TimeoutError)
    with pytest.raises(ResultExpired) as info:
        await backend.get(env.job_id)
    assert info.value.job_id == env.job_id
    with pytest.raises(JobNotFound) as unknown:
        await backend.get("fc-never-spawned")
    assert type(unknown.value) is JobNotFound
    with pytest.raises(JobNotFound):
        await backend.get("not-a-modal-id")


async def test_cancel_a_pending_call_is_recorded_and_idempotent():
    fake, d = FakeModal(), FakeDict()
    backend = backend_for(fake, d)
    env = await backend.submit(JobRequest(workflow=invert()))
    cancelled = await backend.cancel(env.job_id)
    assert cancelled.status.state is JobState.CANCELLED and cancelled.error["type"] == "JobCancelled"
    assert fake.calls[env.job_id].cancels == 1
    again = await backend.cancel(env.job_id)
    assert again.status.state is JobState.CANCELLED and fake.calls[env.job_id].cancels == 1
    assert (await backend.get(env.job_id)).status.state is JobState.CANCELLED


@pytest.mark.parametrize(
    ("exc", "state", "error_type", "retryable"),
    [
        (modal.exception.FunctionTimeoutError("Function timed out"), JobState.TIMED_OUT, "JobTimeout", True),
        (modal.exception.RemoteError("container crashed"), JobState.FAILED, "JobFailed", True),
        (modal.exception.InternalFailure("worker lost"), JobState.FAILED, "JobFailed", True),
    ],
)
async def test_remote_failures_become_typed_outcomes(exc, state, error_type, retryable):
    fake = FakeModal()
    backend = backend_for(fake)
    env = await backend.submit(JobRequest(workflow=invert()))
    fake.calls[env.job_id].finish(exc=exc)
    out = await backend.get(env.job_id)
    assert out.status.state is state
    assert out.error["type"] == error_type and out.error["retryable"] is retryable
    assert out.error["job_id"] == env.job_id


async def test_queued_past_its_deadline_is_cancelled_as_timed_out():
    fake, d = FakeModal(), FakeDict()
    backend = backend_for(fake, d)
    env = await backend.submit(JobRequest(workflow=invert(), timeout=30))
    key = f"job:{env.job_id}"
    d.data[key] = {**d.data[key], "deadline": time.time() - 1}  # no container took it in time
    out = await backend.get(env.job_id)
    assert out.status.state is JobState.TIMED_OUT
    assert out.error["type"] == "JobTimeout" and out.error["state"] == "queued" and out.error["cancelled"]
    assert fake.calls[env.job_id].cancels == 1


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (modal.exception.ResourceExhaustedError("too many inputs"), RateLimited),
        (modal.exception.RequestSizeError("too big"), PayloadTooLarge),
        (modal.exception.AuthError("token missing"), ProviderUnavailable),
        (modal.exception.ConnectionError("no route"), ProviderUnavailable),
    ],
)
async def test_spawn_failures_are_typed(exc, expected):
    fake = FakeModal()
    fake.spawn_error = exc
    with pytest.raises(expected) as info:
        await backend_for(fake).submit(JobRequest(workflow=invert()))
    assert info.value.retryable is (expected is not PayloadTooLarge)


async def test_health_from_heartbeat_or_a_gpu_container():
    d = FakeDict()
    calls = []

    async def remote_health():
        calls.append(1)
        return HealthReport(provider="modal", state=HealthState.HEALTHY, version="0.3.75").model_dump(
            mode="json"
        )

    backend = backend_for(FakeModal(), d, remote_health=remote_health)
    cold = await backend.health()
    assert cold.state is HealthState.HEALTHY and "No GPU container" in cold.message and not calls
    d.data[HEALTH_KEY] = HealthReport(
        provider="modal", state=HealthState.UNHEALTHY, message="dead"
    ).model_dump(mode="json")
    assert (await backend.health()).state is HealthState.UNHEALTHY
    deep = await backend.health(deep=True)
    assert deep.state is HealthState.HEALTHY and deep.version == "0.3.75" and calls == [1]


# ------------------------------------------------------------------ the GPU method's code, on the double


@pytest.fixture
async def modal_stack(comfy):
    d = FakeDict()
    dead = []

    async def stop_fetching_inputs():
        dead.append(True)

    client = ComfyClient(comfy.url, provider="modal")
    worker = ComfyWorker(
        client,
        ModalDictStore(d),
        gpu="A100-80GB",
        prices={"A100-80GB": 0.000694},
        on_dead=stop_fetching_inputs,
    )
    fake = FakeModal(worker)
    backend = backend_for(fake, d)
    yield backend, fake, d, dead
    for call in fake.calls.values():
        if call.task is not None and not call.task.done():
            call.task.cancel()
    await client.aclose()


async def test_worker_runs_the_job_and_prices_it(modal_stack, comfy):
    backend, _, d, _ = modal_stack
    env = await backend.submit(JobRequest(workflow=invert(), timeout=60))
    done = await backend.get(env.job_id, wait=30)
    assert done.status.state is JobState.SUCCEEDED
    result = done.result
    assert result.job_id == env.job_id and len(result.images) == 2
    assert result.cost.gpu == "A100-80GB" and result.cost.rate_usd_per_s == 0.000694
    assert result.timings.queued_s is not None and result.timings.executing_s is not None
    record = d.data[f"job:{env.job_id}"]
    assert record["state"] == "succeeded" and record["prompt_id"] in comfy.jobs


async def test_cancel_reaches_the_worker_and_interrupts_comfyui(modal_stack, comfy):
    backend, fake, d, _ = modal_stack
    comfy.faults.step_delay = 0.2
    wf = Workflow.load(WORKFLOWS / "flux_schnell_t2i.json").with_values({"KSampler.steps": 10_000})
    env = await backend.submit(JobRequest(workflow=wf, timeout=120))
    running = await backend.get(env.job_id, wait=30, after=env.version)
    while running.status.state is not JobState.RUNNING:
        running = await backend.get(env.job_id, wait=30, after=running.version)
    out = await backend.cancel(env.job_id)
    assert out.status.state is JobState.CANCELLED
    call = fake.calls[env.job_id]
    await asyncio.wait({call.task})  # Modal cancels the input: the worker interrupts ComfyUI
    prompt_id = d.data[f"job:{env.job_id}"]["prompt_id"]
    await comfy.wait_for_state(prompt_id, "interrupted")
    assert comfy.stats.interrupts >= 1
    assert d.data[f"job:{env.job_id}"]["state"] == "cancelled"


async def test_dead_comfyui_stops_fetching_inputs_and_fails_retryably(modal_stack, comfy):
    backend, _, d, dead = modal_stack
    await comfy.crash()
    env = await backend.submit(JobRequest(workflow=invert(), timeout=60))
    out = await backend.get(env.job_id, wait=30)
    assert out.status.state is JobState.FAILED
    assert out.error["type"] == "ProviderUnavailable" and out.error["retryable"] is True
    assert dead == [True]
    assert d.data[HEALTH_KEY]["state"] == "unhealthy"
    second = await backend.submit(JobRequest(workflow=invert(), timeout=60))
    assert (await backend.get(second.job_id, wait=30)).error["type"] == "ProviderUnavailable"
    assert dead == [True]  # stop_fetching_inputs once per container


async def test_unknown_gpu_gives_no_cost_and_says_so(comfy):
    client = ComfyClient(comfy.url, provider="modal")
    worker = ComfyWorker(client, ModalDictStore(FakeDict()), prices={"L40S": 0.000542})
    try:
        assert await worker.gpu_type() is None  # the double reports a CPU device
        out = await worker.run("fc-1", JobRequest(workflow=invert(), timeout=60))
    finally:
        await client.aclose()
    assert out["state"] == "succeeded"
    assert out["result"]["cost"] is None
    assert any("No cost estimate" in w for w in out["result"]["warnings"])
