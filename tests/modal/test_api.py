"""The job API (gpubridge.server) served by uvicorn on 127.0.0.1 with the in-process backend in front of the
ComfyUI double, driven by the modal provider (gpubridge.providers.modal.ModalRunner) and plain httpx."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import pytest

from gpubridge.errors import (
    AuthError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowInvalid,
)
from gpubridge.models import EventType, HealthState, JobRequest, JobState, Workflow
from gpubridge.providers.modal import ModalRunner
from gpubridge.testing import ErrorFault

from .conftest import INPUTS, TOKEN, WORKFLOWS, serve_api


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def invert() -> Workflow:
    return Workflow.load(WORKFLOWS / "model_free_invert.json")


def flux(steps: int = 4) -> Workflow:
    return Workflow.load(WORKFLOWS / "flux_schnell_t2i.json").with_values({"KSampler.steps": steps})


@pytest.fixture
def api(threaded_comfy):
    with serve_api(threaded_comfy.url) as (url, backend):
        yield url, backend


@pytest.fixture
async def runner(api):
    url, _ = api
    async with ModalRunner(url, token=TOKEN, long_poll=5.0) as r:
        yield r


async def test_job_end_to_end_with_timings_and_cost(runner):
    handle = await runner.submit(JobRequest(workflow=invert(), timeout=60, tags={"team": "ryla"}))
    assert handle.job_id.startswith("job-") and handle.deadline is not None
    result = await runner.wait(handle)
    assert result.state is JobState.SUCCEEDED
    assert result.provider == "modal" and result.job_id == handle.job_id
    assert result.tags == {"team": "ryla"}
    assert [a.width for a in result.images] == [256, 256]
    assert all(a.data and a.data.startswith(b"\x89PNG") and a.url is None for a in result.images)
    t = result.timings
    assert t.submitted_at <= t.started_at <= t.finished_at and t.executing_s is not None and t.total_s >= 0
    assert result.cost is not None and result.cost.gpu == "L40S" and result.cost.basis == "estimate"
    assert result.cost.rate_usd_per_s == pytest.approx(0.000542)
    assert result.cost.usd == pytest.approx(0.000542 * result.cost.seconds, rel=1e-3, abs=1e-9)
    # A finished job stays readable, by id, from a runner that did not submit it.
    assert (await runner.status(handle.job_id)).state is JobState.SUCCEEDED


async def test_input_image_upload_reaches_comfyui(runner, threaded_comfy):
    png = (INPUTS / "input.png").read_bytes()
    wf = Workflow.load(WORKFLOWS / "sdxl_img2img.json")
    result = await runner.run(JobRequest(workflow=wf, inputs={"input.png": png}, timeout=60))
    assert result.images
    assert threaded_comfy.stats.uploads == 1
    [job] = threaded_comfy.jobs.values()
    loaded = job.prompt["2"]["inputs"]["image"]
    assert loaded != "input.png" and loaded.startswith("gpubridge/")  # content-addressed upload


async def test_events_follow_queue_start_progress_and_end(runner, threaded_comfy):
    threaded_comfy.pause()  # stuck queue: the job waits in ComfyUI's queue
    handle = await runner.submit(JobRequest(workflow=flux(steps=3), timeout=60))
    assert (await runner.status(handle)).state is JobState.QUEUED
    seen = []
    queued, started = asyncio.Event(), asyncio.Event()

    async def collect():
        async for ev in runner.events(handle):
            seen.append(ev)
            if ev.type is EventType.QUEUED:
                queued.set()
            if ev.type is EventType.STARTED:
                started.set()

    task = asyncio.create_task(collect())
    await asyncio.to_thread(threaded_comfy.wait_for_prompts, 1)
    await asyncio.wait_for(queued.wait(), 30)  # the stream saw the job queued before the queue moves on
    threaded_comfy.faults.hold_history = True  # the job runs its nodes, then holds before it completes
    threaded_comfy.resume()
    await asyncio.wait_for(started.wait(), 30)
    status = await runner.status(handle)
    assert status.state is JobState.RUNNING and status.progress is not None
    threaded_comfy.faults.hold_history = False
    result = await runner.wait(handle)
    await asyncio.wait_for(task, 30)
    types = [e.type for e in seen]
    assert types[0] is EventType.QUEUED and types[-1] is EventType.SUCCEEDED
    assert types.index(EventType.QUEUED) < types.index(EventType.STARTED) < types.index(EventType.SUCCEEDED)
    assert result.images


async def test_long_poll_waits_for_a_change(runner, threaded_comfy):
    threaded_comfy.pause()
    handle = await runner.submit(JobRequest(workflow=invert(), timeout=60))
    first = await runner._get(handle.job_id)
    # Nothing changes while the queue is stuck: the poll runs out and reports the same version.
    held = await runner._get(handle.job_id, wait=0.3, after=first.version)
    assert held.version == first.version and held.status.state is JobState.QUEUED
    poll = asyncio.create_task(runner._get(handle.job_id, wait=30, after=first.version))
    threaded_comfy.resume()
    changed = await poll
    assert changed.version > first.version
    assert changed.status.state in (JobState.RUNNING, JobState.SUCCEEDED)
    # Without `after`, a long-poll answers once the job ended.
    done = await runner._get(handle.job_id, wait=30)
    assert done.status.state is JobState.SUCCEEDED and done.result is not None


async def test_cancel_interrupts_the_running_prompt(runner, threaded_comfy):
    threaded_comfy.faults.step_delay = 0.2
    handle = await runner.submit(JobRequest(workflow=flux(steps=10_000), timeout=120))
    await asyncio.to_thread(threaded_comfy.wait_until, lambda: bool(threaded_comfy.queue_running))
    status = await runner.cancel(handle)
    assert status.state is JobState.CANCELLED
    assert threaded_comfy.stats.interrupts >= 1
    [job] = threaded_comfy.jobs.values()
    await asyncio.to_thread(threaded_comfy.wait_for_state, job.prompt_id, "interrupted")
    with pytest.raises(JobCancelled) as info:
        await runner.wait(handle)
    assert info.value.job_id == handle.job_id and not info.value.retryable
    assert (await runner.cancel(handle)).state is JobState.CANCELLED  # idempotent


async def test_cancel_dequeues_a_queued_prompt(runner, threaded_comfy):
    threaded_comfy.pause()
    handle = await runner.submit(JobRequest(workflow=invert(), timeout=60))
    await asyncio.to_thread(threaded_comfy.wait_for_prompts, 1)
    assert (await runner.cancel(handle)).state is JobState.CANCELLED
    assert threaded_comfy.stats.deletes == 1 and threaded_comfy.queue_pending == []


async def test_deadline_interrupts_and_times_out(runner, threaded_comfy):
    threaded_comfy.faults.step_delay = 0.2
    handle = await runner.submit(JobRequest(workflow=flux(steps=10_000), timeout=1.0))
    with pytest.raises(JobTimeout) as info:
        await runner.wait(handle)
    assert info.value.cancelled and info.value.retryable and info.value.state == "running"
    assert threaded_comfy.stats.interrupts >= 1


async def test_wait_timeout_only_stops_waiting(runner, threaded_comfy):
    threaded_comfy.pause()
    handle = await runner.submit(JobRequest(workflow=invert(), timeout=60))
    with pytest.raises(JobTimeout) as info:
        await runner.wait(handle, timeout=0.2)
    assert not info.value.cancelled and info.value.state == "queued"
    threaded_comfy.resume()
    assert (await runner.wait(handle)).images


async def test_workflow_errors_come_back_typed(runner, threaded_comfy):
    bad = invert().with_values({"Invert.image": ["99", 0]})
    with pytest.raises(WorkflowInvalid) as info:
        await runner.submit(JobRequest(workflow=bad))
    assert not info.value.retryable and info.value.provider == "modal"
    assert threaded_comfy.stats.prompts_accepted == 0

    threaded_comfy.faults.error = ErrorFault(
        class_type="ImageInvert",
        exception_type="torch.OutOfMemoryError",
        exception_message="CUDA out of memory",
    )
    handle = await runner.submit(JobRequest(workflow=invert(), timeout=60))
    with pytest.raises(JobFailed) as failed:
        await runner.wait(handle)
    assert failed.value.node_id == "2" and failed.value.node_type == "ImageInvert"
    assert failed.value.exception_type == "torch.OutOfMemoryError" and failed.value.job_id == handle.job_id


async def test_unknown_and_expired_jobs_are_404(threaded_comfy):
    clock = FakeClock()
    with serve_api(threaded_comfy.url, retention=60.0, clock=clock) as (url, _):
        async with ModalRunner(url, token=TOKEN) as runner:
            with pytest.raises(JobNotFound) as info:
                await runner.status("job-nope")
            assert info.value.job_id == "job-nope" and type(info.value) is JobNotFound
            handle = await runner.submit(JobRequest(workflow=invert(), timeout=60))
            assert (await runner.wait(handle)).images
            assert (await runner.status(handle)).state is JobState.SUCCEEDED
            clock.now += 61  # past the retention window
            with pytest.raises(ResultExpired) as expired:
                await runner.status(handle)
            assert isinstance(expired.value, JobNotFound) and expired.value.job_id == handle.job_id


async def test_auth_failures(api, threaded_comfy):
    url, _ = api
    request = JobRequest(workflow=invert())
    for token in (None, "wrong-token"):
        async with ModalRunner(url, token=token) as runner:
            with pytest.raises(AuthError) as info:
                await runner.submit(request)
            assert not info.value.retryable
            assert "wrong-token" not in str(info.value) and TOKEN not in str(info.value)
            with pytest.raises(AuthError):
                await runner.health()
    async with httpx.AsyncClient(base_url=url) as http:
        resp = await http.get("/v1/health", headers={"Authorization": f"Basic {TOKEN}"})
        assert resp.status_code == 401 and resp.headers["www-authenticate"].startswith("Bearer")
        assert resp.json()["error"]["type"] == "AuthError"
        # The schema and the docs follow the API's auth (issue 10 item 10; public only when configured).
        assert (await http.get("/openapi.json")).status_code == 401
        assert (await http.get("/docs")).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await http.get("/openapi.json", headers=auth)).status_code == 200
    assert threaded_comfy.stats.prompts_received == 0


async def test_server_without_tokens_fails_closed(threaded_comfy):
    with serve_api(threaded_comfy.url, tokens=None) as (url, _):
        async with ModalRunner(url, token="anything") as runner:
            with pytest.raises(AuthError, match="no API token configured"):
                await runner.submit(JobRequest(workflow=invert()))


async def test_payload_too_large(threaded_comfy):
    with serve_api(threaded_comfy.url, api={"max_body_bytes": 4096}) as (url, _):
        async with ModalRunner(url, token=TOKEN) as runner:
            big = JobRequest(workflow=invert(), inputs={"big.png": (INPUTS / "input.png").read_bytes() * 40})
            with pytest.raises(PayloadTooLarge) as info:
                await runner.submit(big)
            assert not info.value.retryable
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:

            async def chunks():
                yield b"{" + b" " * 5000

            resp = await http.post("/v1/jobs", content=chunks())  # no Content-Length: counted while read
            assert resp.status_code == 413 and resp.json()["error"]["limit"] == 4096
    assert threaded_comfy.stats.uploads == 0


async def test_rate_limited_with_retry_after(threaded_comfy):
    threaded_comfy.pause()
    with serve_api(threaded_comfy.url, max_active=1) as (url, _):
        async with ModalRunner(url, token=TOKEN) as runner:
            await runner.submit(JobRequest(workflow=invert(), timeout=60))
            with pytest.raises(RateLimited) as info:
                await runner.submit(JobRequest(workflow=invert(), timeout=60))
            assert info.value.retryable and info.value.retry_after == 5.0


async def test_comfyui_dead_health_red_and_jobs_refused(threaded_comfy):
    dead_calls = []

    async def on_dead():
        dead_calls.append(True)

    with serve_api(threaded_comfy.url, worker={"on_dead": on_dead}) as (url, backend):
        async with ModalRunner(url, token=TOKEN) as runner:
            assert (await runner.health()).state is HealthState.HEALTHY
            threaded_comfy.crash()
            report = await runner.health()
            assert report.state is HealthState.UNHEALTHY and not report.ok
            with pytest.raises(ProviderUnavailable) as info:
                await runner.submit(JobRequest(workflow=invert()))
            assert info.value.retryable and info.value.provider == "modal"
            assert dead_calls == [True] and backend.worker.dead
            async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                assert (await http.get("/v1/health")).status_code == 503


async def test_health_reports_comfyui_gpu_version_and_models(threaded_comfy, tmp_path):
    from gpubridge.manifest import Manifest

    manifest = Manifest.parse(
        '[[models]]\nname = "a.safetensors"\nfolder = "checkpoints"\nurl = "https://example.com/a"\n'
        '[[models]]\nname = "b.safetensors"\nfolder = "loras"\nurl = "https://example.com/b"\n'
    )
    models = tmp_path / "models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "checkpoints" / "a.safetensors").write_bytes(b"x")
    with serve_api(threaded_comfy.url, worker={"manifest": manifest, "models_dir": models}) as (url, _):
        async with ModalRunner(url, token=TOKEN) as runner:
            report = await runner.health()
    assert report.state is HealthState.DEGRADED and report.ok
    assert report.details["comfyui"] == "reachable" and report.details["gpu"] == "L40S"
    assert report.version and report.queue_depth == 0
    assert report.details["models"] == {
        "expected": 2,
        "present": ["checkpoints/a.safetensors"],
        "missing": ["loras/b.safetensors"],
    }


async def test_sync_run_endpoint(api, threaded_comfy):
    url, _ = api
    body = JobRequest(workflow=invert(), timeout=60).model_dump_json()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        resp = await http.post("/v1/run", content=body)
        assert resp.status_code == 200
        env = resp.json()
        assert env["status"]["state"] == "succeeded" and env["error"] is None
        art = env["result"]["artifacts"][0]
        assert base64.urlsafe_b64decode(art["data"]).startswith(b"\x89PNG")  # pydantic writes URL-safe
        threaded_comfy.pause()
        resp = await http.post("/v1/run", params={"timeout": 0.2}, content=body)
        assert resp.status_code == 202 and resp.headers["location"] == f"/v1/jobs/{resp.json()['job_id']}"
        assert resp.json()["status"]["state"] == "queued"


async def test_malformed_requests_are_422(api):
    url, _ = api
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers) as http:
        ui_export = {"workflow": {"nodes": [], "links": []}}
        resp = await http.post("/v1/jobs", content=json.dumps(ui_export))
        assert resp.status_code == 422 and resp.json()["error"]["type"] == "WorkflowFormatError"
        resp = await http.post("/v1/jobs", content=json.dumps({"timeout": 5}))
        assert resp.status_code == 422 and "workflow" in resp.json()["error"]["message"]


async def test_openapi_describes_the_job_api(api):
    url, _ = api
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        spec = (await http.get("/openapi.json")).json()
    paths = spec["paths"]
    assert set(paths) >= {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/run", "/v1/health"}
    assert set(paths["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert {"JobEnvelope", "RemoteJobRequest", "ErrorBody"} <= set(spec["components"]["schemas"])
    params = {p["name"] for p in paths["/v1/jobs/{job_id}"]["get"]["parameters"]}
    assert {"wait", "after"} <= params
