"""The RunPod provider against the endpoint double, with a scripted handler to steer each outcome.

The handler here is a plain RunPod handler (not a ComfyUI fake): the double wraps it exactly as the runpod
SDK does, so raised exceptions become the SDK's JSON error strings. End-to-end runs through the real
worker and the ComfyUI double are in test_worker.py and test_cli.py.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import respx

from gpubridge.config import Settings
from gpubridge.errors import (
    AuthError,
    ConfigError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowInvalid,
)
from gpubridge.models import EventType, HealthState, JobRequest, JobState
from gpubridge.plugins import get_registry
from gpubridge.providers.runpod import RunPodRunner, RunPodSettings, parse_failure, poll_delays
from gpubridge.testing.runpod import RunPodEndpointDouble

from .conftest import API_KEY, make_runner

WF = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class Script:
    """A RunPod handler whose behaviour the test picks per job through JobRequest.tags["mode"]."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.inputs: list[dict[str, Any]] = []
        self.cancelled = 0

    async def __call__(self, job: dict[str, Any]) -> Any:
        inp = job["input"]
        self.inputs.append(inp)
        mode = inp.get("gpubridge", {}).get("tags", {}).get("mode", "ok")
        if mode == "raise":
            raise ValueError("kaboom in the handler")
        if mode == "node-error":  # what the gpubridge worker returns for a ComfyUI execution_error
            return {
                "error": "Workflow execution error: Node Type: KSampler, Node ID: 3, Message: CUDA error: boom",
                "details": {"node": "3", "node_id": "3", "node_type": "KSampler", "exception_type": "RuntimeError",
                            "exception_message": "CUDA error: boom", "traceback": ["line 1", "line 2"]},
            }
        if mode == "wc-error":  # worker-comfyui 5.x
            return {"error": "Job processing failed", "details": [
                "Workflow execution error: Node Type: VAEDecode, Node ID: 8, Message: out of range"]}
        if mode == "gate":
            import runpod.serverless

            runpod.serverless.progress_update(job, {"progress": {"node_id": "3", "node_type": "KSampler",
                                                                 "value": 2, "max": 4}})
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        return {
            "images": [{"filename": "out.png", "type": "base64", "data": base64.b64encode(PNG_1PX).decode(),
                        "node_id": "9"}],
            "videos": [{"filename": "clip.webm", "type": "base64", "data": base64.b64encode(b"\x1aE\xdf\xa3").decode()}],
            "text": [{"node_id": "12", "text": "a caption"}],
            "timings": {"upload_s": 0.01, "download_s": 0.02},
            "gpubridge": {"outputs": {"9": {"images": [{"filename": "out.png"}]}}},
        }


@pytest.fixture
async def script() -> Script:
    return Script()


@pytest.fixture
async def rp(script: Script) -> AsyncIterator[RunPodEndpointDouble]:
    async with RunPodEndpointDouble(script, api_key=API_KEY) as double:
        yield double


@pytest.fixture
async def runner(rp: RunPodEndpointDouble) -> AsyncIterator[RunPodRunner]:
    r = make_runner(rp, gpu_price_per_s=0.001, gpu_type="L40S")
    yield r
    await r.aclose()


def req(mode: str = "ok", **kw: Any) -> JobRequest:
    return JobRequest(workflow=WF, tags={"mode": mode}, **kw)


# ------------------------------------------------------------------------------------------- success


async def test_run_maps_outputs_timings_and_cost(rp: RunPodEndpointDouble, runner: RunPodRunner, script: Script):
    result = await runner.run(req(), inputs={"face.png": PNG_1PX})
    body = rp.snapshot(result.job_id)
    assert body is not None and body["status"] == "COMPLETED"
    # the request is worker-comfyui's input shape
    sent = script.inputs[0]
    assert sent["workflow"] == WF
    assert sent["images"] == [{"name": "face.png", "image": base64.b64encode(PNG_1PX).decode()}]
    # artifacts
    kinds = {(a.filename, a.kind.value) for a in result.artifacts}
    assert kinds == {("out.png", "image"), ("clip.webm", "video"), (None, "text")}
    image = result.images[0]
    assert image.data == PNG_1PX and image.node_id == "9" and image.mime_type == "image/png"
    assert result.texts == ["a caption"]
    assert result.outputs["9"] == {"images": [{"filename": "out.png"}]}
    # delayTime / executionTime -> timings and cost
    assert result.timings.queued_s == body["delayTime"] / 1000
    assert result.timings.executing_s == body["executionTime"] / 1000
    assert result.timings.upload_s == 0.01 and result.timings.download_s == 0.02
    assert result.cost is not None and result.cost.basis == "estimate" and result.cost.gpu == "L40S"
    assert result.cost.usd == pytest.approx(body["executionTime"] / 1000 * 0.001)
    assert result.tags == {"mode": "ok"}


async def test_policy_carries_the_job_timeout(rp: RunPodEndpointDouble, runner: RunPodRunner):
    body = runner.build_body(req(timeout=42))
    assert body["policy"]["executionTimeout"] == 42000
    assert body["policy"]["ttl"] == (42 + 300) * 1000
    short = runner.build_body(req(timeout=1))
    assert short["policy"]["executionTimeout"] == 5000  # RunPod's minimum


async def test_events_queued_started_progress_terminal(rp: RunPodEndpointDouble, runner: RunPodRunner,
                                                       script: Script):
    handle = await runner.submit(req("gate"))
    seen: asyncio.Queue = asyncio.Queue()

    async def collect() -> None:
        async for ev in runner.events(handle):
            await seen.put(ev)

    task = asyncio.create_task(collect())
    types = []
    while EventType.PROGRESS not in types:
        ev = await asyncio.wait_for(seen.get(), 5)
        types.append(ev.type)
    assert types[:2] == [EventType.QUEUED, EventType.STARTED]
    status = await runner.status(handle)
    assert status.state is JobState.RUNNING
    assert status.progress is not None and (status.progress.node_id, status.progress.value) == ("3", 2)
    script.gate.set()
    await asyncio.wait_for(task, 5)
    ev = seen.get_nowait()
    while not seen.empty():
        ev = seen.get_nowait()
    assert ev.type is EventType.SUCCEEDED
    assert (await runner.wait(handle)).images


async def test_status_running_is_accepted(runner: RunPodRunner):
    st = runner._status_of("x", {"id": "x", "status": "RUNNING"})
    assert st.state is JobState.RUNNING


# ------------------------------------------------------------------------------------------ failures


async def test_worker_exception_json_is_parsed(runner: RunPodRunner):
    with pytest.raises(JobFailed) as info:
        await runner.run(req("raise"))
    exc = info.value
    assert exc.exception_type == "ValueError"
    assert exc.exception_message == "kaboom in the handler"
    assert any("kaboom in the handler" in line for line in exc.traceback)
    assert "Traceback" in exc.traceback[0]
    assert exc.retryable is False
    assert exc.details["runpod"]["runpod_version"]


async def test_node_error_details_kept(runner: RunPodRunner):
    with pytest.raises(JobFailed) as info:
        await runner.run(req("node-error"))
    exc = info.value
    assert (exc.node_id, exc.node_type, exc.exception_type) == ("3", "KSampler", "RuntimeError")
    assert exc.traceback == ["line 1", "line 2"]
    assert "node 3 (KSampler) raised RuntimeError" in str(exc)
    assert exc.retryable is False


async def test_worker_comfyui_details_list(runner: RunPodRunner):
    with pytest.raises(JobFailed) as info:
        await runner.run(req("wc-error"))
    assert (info.value.node_id, info.value.node_type) == ("8", "VAEDecode")
    assert info.value.exception_message == "out of range"


async def test_worker_crash_is_retryable(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.crash_next = 1
    with pytest.raises(JobFailed) as info:
        await runner.run(req())
    assert info.value.retryable is True
    assert info.value.exception_type.endswith("WorkerCrashed")
    assert rp.counters["crashes"] == 1 and rp.counters["cold_starts"] == 1
    # the worker rebooted (a second cold start) and the next job succeeds
    result = await runner.run(req())
    assert result.images and rp.counters["cold_starts"] == 2


def test_parse_failure_shapes():
    plain = parse_failure({"status": "FAILED", "error": "bad input: seed missing"}, job_id="j")
    assert isinstance(plain, JobFailed) and plain.exception_message == "bad input: seed missing"
    assert not plain.retryable
    invalid = parse_failure({"status": "FAILED", "error": "Workflow validation failed:\n• Node 4: bad",
                             "output": {"details": {"exception_type": "WorkflowInvalid",
                                                    "error": {"message": "Prompt outputs failed validation"},
                                                    "node_errors": {"4": {"class_type": "X", "errors": [
                                                        {"type": "value_not_in_list", "message": "bad"}]}}}}})
    assert isinstance(invalid, WorkflowInvalid) and invalid.errors[0].node_id == "4"
    dead = parse_failure({"status": "FAILED", "error": "ComfyUI is not reachable: Cannot reach ComfyUI at x",
                          "output": {"details": {"worker_failure": True}}})
    assert isinstance(dead, JobFailed) and dead.retryable
    oom = parse_failure({"status": "FAILED", "error": json.dumps(
        {"error_type": "<class 'torch.OutOfMemoryError'>", "error_message": "CUDA out of memory"})})
    assert oom.retryable and oom.exception_type == "torch.OutOfMemoryError"
    # A node's out-of-memory is the GPU's fault, not the workflow's: retryable elsewhere, as on the local
    # provider (one classifier, gpubridge.comfy.protocol.is_worker_failure).
    node_oom = parse_failure({"status": "FAILED", "error": "Workflow execution error: Node Type: KSampler, "
                              "Node ID: 3, Message: CUDA out of memory. Tried to allocate 2.00 GiB"})
    assert isinstance(node_oom, JobFailed) and node_oom.node_id == "3" and node_oom.retryable
    nothing = parse_failure({"status": "FAILED"})
    assert "without an error" in str(nothing)


# --------------------------------------------------------------------------------- queue, timeouts, cancel


async def test_no_workers_job_times_out_and_is_dequeued(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.workers = 0
    with pytest.raises(JobTimeout) as info:
        await runner.run(req(timeout=0.3))
    exc = info.value
    assert exc.state == "queued" and exc.cancelled is True and exc.job_may_be_running is False
    assert rp.status_of(exc.job_id) == "CANCELLED"
    assert rp.counters["cancel"] == 1


async def test_wait_timeout_only_stops_waiting(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.workers = 0
    handle = await runner.submit(req())
    with pytest.raises(JobTimeout) as info:
        await runner.wait(handle, timeout=0.05)
    assert info.value.cancelled is False and info.value.job_may_be_running
    assert rp.status_of(handle.job_id) == "IN_QUEUE"
    rp.workers = 1
    assert (await runner.wait(handle)).images


async def test_cancel_running_job(rp: RunPodEndpointDouble, runner: RunPodRunner, script: Script):
    handle = await runner.submit(req("gate"))
    await rp.wait_status(handle.job_id, "IN_PROGRESS")
    await rp.wait_for(lambda d: d.counters["progress_updates"] >= 1)
    status = await runner.cancel(handle)
    assert status.state is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        await runner.wait(handle)
    await rp.wait_for(lambda d: script.cancelled == 1)  # the async handler was interrupted
    again = await runner.cancel(handle)  # idempotent
    assert again.state is JobState.CANCELLED


async def test_cancel_queued_job_and_purge(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.workers = 0
    first = await runner.submit(req())
    second = await runner.submit(req())
    assert (await runner.cancel(first)).state is JobState.CANCELLED
    assert await runner.purge_queue() == 1
    with pytest.raises(ResultExpired):  # purged: RunPod forgets it
        await runner.wait(second)


async def test_timed_out_status_maps_to_job_timeout():
    with respx.mock(base_url="http://rp.test/v2/ep") as mock:
        mock.post("/run").respond(200, json={"id": "j1", "status": "IN_QUEUE"})
        mock.get("/status/j1").respond(200, json={"id": "j1", "status": "TIMED_OUT", "delayTime": 5})
        r = RunPodRunner("ep", api_key=API_KEY, base_url="http://rp.test/v2", poll_initial=0.001,
                         status_sync=False)  # respx mocks /status only
        try:
            with pytest.raises(JobTimeout) as info:
                await r.run(req())
            assert info.value.cancelled is True and info.value.state == "queued"
        finally:
            await r.aclose()


# --------------------------------------------------------------------------------------- HTTP faults


async def test_429_is_retried_honouring_retry_after(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.throttle = 3
    rp.throttle_retry_after = 0
    result = await runner.run(req())
    assert result.images
    assert rp.counters["throttled"] == 3 and runner.stats["retries"] == 3
    assert rp.counters["submitted"] == 1  # POST /run retried on 429, never duplicated


async def test_429_gives_up_after_max_attempts(rp: RunPodEndpointDouble):
    r = make_runner(rp, max_attempts=3)
    rp.throttle = 10
    rp.throttle_retry_after = 0.01
    try:
        with pytest.raises(RateLimited) as info:
            await r.submit(req())
        assert info.value.retry_after == pytest.approx(0.01)
        assert rp.counters["run"] == 3 and rp.counters["submitted"] == 0
    finally:
        await r.aclose()


async def test_5xx_on_run_is_never_resent(rp: RunPodEndpointDouble, runner: RunPodRunner):
    """A 5xx to /run (even 502/503/504, which a proxy may send after RunPod took the request) may hide an
    accepted job: the submit fails at once, saying the job may be running, and /run is not resent."""
    for status in (503, 502, 500):
        rp.http_errors, rp.http_error_status = 1, status
        before = rp.counters["run"]
        with pytest.raises(ProviderUnavailable) as info:
            await runner.submit(req())
        assert rp.counters["run"] == before + 1, status
        assert info.value.job_may_be_running and info.value.retryable and "not resent" in str(info.value)
    assert (await runner.run(req())).images  # the endpoint itself is fine


async def test_an_accepted_job_answered_with_502_is_not_submitted_twice(rp: RunPodEndpointDouble,
                                                                        runner: RunPodRunner):
    rp.lose_run_answers, rp.http_error_status = 1, 502
    with pytest.raises(ProviderUnavailable) as info:
        await runner.submit(req())
    assert info.value.job_may_be_running
    assert rp.counters["run"] == 1 and rp.counters["submitted"] == 1 and rp.counters["lost_run_answers"] == 1


async def test_connection_refused_on_run_is_retried(script: Script):
    async with RunPodEndpointDouble(script, api_key=API_KEY) as double:
        base, endpoint_id = double.base_url, double.endpoint_id
    # nothing listens there any more
    r = RunPodRunner(endpoint_id, api_key=API_KEY, base_url=base, retry_initial=0.0, max_attempts=2)
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await r.submit(req())
        assert not info.value.job_may_be_running  # it never left: safe to send elsewhere, nothing to cancel
    finally:
        await r.aclose()


async def test_status_sync_long_polls_when_the_endpoint_answers_it(script: Script):
    async with RunPodEndpointDouble(script, api_key=API_KEY, status_sync=True) as double:
        r = make_runner(double)
        try:
            assert (await r.run(req())).images and r.status_sync is True
            assert double.counters["status-sync"] >= 1 and double.counters["status"] == 0
        finally:
            await r.aclose()


async def test_status_sync_falls_back_to_polling_where_the_endpoint_lacks_it(rp: RunPodEndpointDouble,
                                                                            runner: RunPodRunner):
    assert (await runner.run(req())).images
    assert runner.status_sync is False and rp.counters["status-sync"] == 1 and rp.counters["status"] >= 1
    assert (await runner.run(req())).images
    assert rp.counters["status-sync"] == 1  # not asked again


async def test_5xx_on_status_is_retried(rp: RunPodEndpointDouble, runner: RunPodRunner):
    handle = await runner.submit(req())
    await rp.wait_status(handle.job_id)
    rp.http_errors, rp.http_error_status = 2, 500
    assert (await runner.wait(handle)).images


async def test_malformed_json_and_connection_reset():
    with respx.mock(base_url="http://rp.test/v2/ep") as mock:
        mock.post("/run").respond(200, text="<html>oops</html>")
        r = RunPodRunner("ep", api_key=API_KEY, base_url="http://rp.test/v2", retry_initial=0,
                         status_sync=False)  # respx mocks /status only
        try:
            with pytest.raises(ProtocolError):
                await r.submit(req())
            route = mock.get("/status/j1")
            route.side_effect = [httpx.RemoteProtocolError("reset"), httpx.Response(
                200, json={"id": "j1", "status": "COMPLETED", "output": {"images": []}})]
            result = await r.wait("j1")
            assert result.artifacts == [] and route.call_count == 2
        finally:
            await r.aclose()


async def test_expired_result(rp: RunPodEndpointDouble, runner: RunPodRunner):
    handle = await runner.submit(req())
    await rp.wait_status(handle.job_id, "COMPLETED")
    rp.expire(handle.job_id)
    await rp.wait_for(lambda d: d.status_of(handle.job_id) is None)
    with pytest.raises(ResultExpired) as info:
        await runner.wait(handle)
    assert "expired" in str(info.value)


async def test_retention_window(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.retention_s = 0  # results are dropped as soon as the job finishes
    handle = await runner.submit(req())
    await rp.wait_for(lambda d: d.counters["completed"] == 1)
    with pytest.raises(ResultExpired):
        await runner.wait(handle)


async def test_unknown_job_is_not_found(runner: RunPodRunner):
    with pytest.raises(JobNotFound) as info:
        await runner.wait("no-such-job")
    assert not isinstance(info.value, ResultExpired)
    with pytest.raises(JobNotFound):
        await runner.status("no-such-job")


async def test_payload_limit_checked_before_sending(rp: RunPodEndpointDouble, runner: RunPodRunner):
    big = PNG_1PX + b"\0" * (8 * 1024 * 1024)  # 8 MiB -> ~10.7 MiB of base64
    with pytest.raises(PayloadTooLarge) as info:
        await runner.submit(req(inputs={"big.png": big}))
    assert info.value.size and info.value.size > info.value.limit
    assert "MiB" in str(info.value) and "10.0 MiB limit" in str(info.value)
    assert rp.counters["run"] == 0


# ------------------------------------------------------------------------------------------ health


async def test_health_maps_jobs_and_workers(rp: RunPodEndpointDouble, runner: RunPodRunner):
    report = await runner.health()
    assert report.state is HealthState.HEALTHY
    assert report.workers is not None and report.workers["idle"] == 1
    assert report.queue_depth == 0 and report.latency_ms is not None


async def test_health_degraded_when_queue_grows_without_workers(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.workers = 0
    await rp.wait_for(lambda d: not d._workers)
    await runner.submit(req())
    first = await runner.health()
    assert first.state is HealthState.HEALTHY and first.queue_depth == 1
    await runner.submit(req())
    second = await runner.health()
    assert second.state is HealthState.DEGRADED and second.queue_depth == 2
    assert "growing queue" in (second.message or "")
    rp.workers = 1
    await rp.wait_for(lambda d: d.in_queue == 0 and d.in_progress == 0)
    assert (await runner.health()).state is HealthState.HEALTHY


async def test_health_unhealthy_on_bad_key(rp: RunPodEndpointDouble):
    r = make_runner(rp, api_key="wrong")
    try:
        report = await r.health()
        assert report.state is HealthState.UNHEALTHY and "API key" in (report.message or "")
    finally:
        await r.aclose()


# ------------------------------------------------------------------------------------------ secrets


async def test_secrets_never_leak(rp: RunPodEndpointDouble, caplog: pytest.LogCaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("RUNPOD_API_KEY", API_KEY)
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_ENDPOINT_ID", rp.endpoint_id)
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_BASE_URL", rp.base_url)
    settings = RunPodSettings.from_settings(Settings.load(), api_key=API_KEY)
    assert API_KEY not in repr(settings) and API_KEY not in str(settings.model_dump())
    r = RunPodRunner.from_settings(Settings.load())  # key from RUNPOD_API_KEY
    try:
        assert API_KEY not in repr(r)
        assert (await r.run(req())).images
        rp.throttle, rp.throttle_retry_after = 1, 0
        with pytest.raises(JobFailed) as failed:
            await r.run(req("raise"))
        bad = make_runner(rp, api_key="wrong-" + API_KEY)
        with pytest.raises(AuthError) as auth:
            await bad.submit(req())
        await bad.aclose()
        for exc in (failed.value, auth.value):
            assert API_KEY not in str(exc) and API_KEY not in json.dumps(exc.to_dict(), default=str)
        assert API_KEY not in caplog.text
    finally:
        await r.aclose()


def test_config_errors(monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ConfigError, match="endpoint id"):
        RunPodRunner.from_settings(Settings.load(), base_url="http://127.0.0.1:9/v2")
    monkeypatch.setenv("GPUBRIDGE_RUNPOD_ENDPOINT_ID", "ep")
    with pytest.raises(ConfigError, match="API key"):
        RunPodRunner.from_settings(Settings.load())


def test_registered_as_plugin():
    spec = get_registry().get_provider("runpod")
    assert spec.settings is RunPodSettings


def test_poll_delays_back_off_and_cap():
    gen = poll_delays(0.1, 1.0, 2.0)
    assert [round(next(gen), 3) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_sync_wait_uses_runsync(rp: RunPodEndpointDouble):
    r = make_runner(rp, sync_wait=30)
    try:
        result = await r.run(req())
        assert result.images and result.timings.executing_s is not None
        assert rp.counters["runsync"] == 1 and rp.counters["status"] == 0 and rp.counters["run"] == 0
        with pytest.raises(JobFailed) as info:  # FAILED through /runsync keeps its error too
            await r.run(req("raise"))
        assert info.value.exception_type == "ValueError"
        # with an event callback, run() goes through /run so progress can flow
        events = []
        await r.run(req(), on_event=events.append)
        assert rp.counters["run"] == 1
        assert [e.type for e in events][:2] == [EventType.QUEUED, EventType.STARTED]
    finally:
        await r.aclose()


async def test_sync_wait_falls_back_to_polling(rp: RunPodEndpointDouble, script: Script):
    r = make_runner(rp, sync_wait=1)  # RunPod's minimum ?wait is 1 s
    try:
        task = asyncio.create_task(r.run(req("gate")))
        await rp.wait_for(lambda d: d.counters["status"] >= 1, timeout=10)  # runsync answered IN_PROGRESS
        script.gate.set()
        result = await task
        assert result.images and rp.counters["runsync"] == 1
    finally:
        await r.aclose()


async def test_cold_start_shows_in_delay_time(rp: RunPodEndpointDouble, runner: RunPodRunner):
    rp.cold_start_s = 0.05  # the worker boots before its first job: the job waits IN_QUEUE meanwhile
    handle = await runner.submit(req())
    result = await runner.wait(handle)
    body = rp.snapshot(handle.job_id)
    assert body is not None and body["delayTime"] >= 50
    assert result.timings.queued_s == body["delayTime"] / 1000
    assert rp.counters["cold_starts"] == 1


async def test_polling_learns_a_workflows_length_and_polls_fast_near_its_end(endpoint, comfy):
    """After one job of a workflow, the next is polled at its expected end rather than on the growing
    schedule: fewer polls for the wait, and the result seen within the fast interval."""
    from gpubridge.models import JobRequest, Workflow

    from .conftest import WORKFLOWS

    comfy.faults.node_delay = 0.1  # ~0.3 s per job
    runner = make_runner(endpoint, poll_initial=0.05, poll_max=1.0, poll_backoff=2.0, poll_fast=0.01)
    try:
        wf = Workflow.load(WORKFLOWS / "model_free_invert.json")
        first = await runner.run(JobRequest(workflow=wf))
        key = next(iter(runner._exec_estimate))
        assert runner._exec_estimate[key] == pytest.approx(first.timings.executing_s, rel=0.01)
        handle = await runner.submit(JobRequest(workflow=wf.with_values({"Canvas.color": 5})))
        await runner.wait(handle)
        out = runner._jobs[handle.job_id]
        assert out.expected_done is not None
    finally:
        await runner.aclose()


def test_rate_limiter_spreads_polls():
    from gpubridge.providers.runpod import _RateLimiter

    async def main():
        limiter = _RateLimiter(rate=500.0)
        loop = asyncio.get_running_loop()

        async def one():
            await limiter.acquire()
            return loop.time()

        return sorted(await asyncio.gather(*(one() for _ in range(20))))

    times = asyncio.run(main())
    # the i-th poll never goes out before its slot: at most rate x elapsed polls, however they arrive
    assert all(t - times[0] >= i * 0.002 * 0.999 for i, t in enumerate(times))


async def test_a_job_done_between_two_polls_still_reports_started():
    """A job that went from IN_QUEUE to COMPLETED between two polls, in under a millisecond
    (executionTime 0), still shows STARTED before SUCCEEDED."""
    base = "http://127.0.0.1:9/v2"
    with respx.mock(assert_all_called=False) as mock:
        mock.post(f"{base}/ep/run").respond(200, json={"id": "j1", "status": "IN_QUEUE"})
        mock.get(f"{base}/ep/status/j1").respond(200, json={
            "id": "j1", "status": "COMPLETED", "delayTime": 3, "executionTime": 0,
            "output": {"images": []}})
        r = RunPodRunner("ep", api_key="k", base_url=base, poll_initial=0.001, status_sync=False)
        try:
            events = []
            await r.run(req(), on_event=events.append)
            assert [e.type for e in events] == [EventType.QUEUED, EventType.STARTED, EventType.SUCCEEDED]
        finally:
            await r.aclose()


async def test_concurrent_first_polls_on_an_endpoint_without_status_sync_lose_no_job():
    """Two jobs' first polls probe /status-sync at the same moment and both get the endpoint's 404: that
    says the route is missing, not that the jobs are gone, so neither may be settled as expired."""
    arrived, both = [], asyncio.Event()

    async def no_status_sync(request: httpx.Request) -> httpx.Response:
        arrived.append(request.url.path)
        if len(arrived) >= 2:
            both.set()
        await both.wait()  # answer only once both probes are in flight
        return httpx.Response(404, json={"error": "not found"})

    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * 32).decode()
    done = {"status": "COMPLETED", "output": {"images": [{"filename": "a.png", "type": "base64", "data": png}]}}
    with respx.mock(base_url="http://rp.test/v2/ep") as mock:
        mock.post("/run").mock(side_effect=[httpx.Response(200, json={"id": "j1", "status": "IN_QUEUE"}),
                                            httpx.Response(200, json={"id": "j2", "status": "IN_QUEUE"})])
        mock.route(method="GET", url__regex=r".*/status-sync/.*").mock(side_effect=no_status_sync)
        mock.get("/status/j1").respond(200, json={"id": "j1", **done})
        mock.get("/status/j2").respond(200, json={"id": "j2", **done})
        r = RunPodRunner("ep", api_key=API_KEY, base_url="http://rp.test/v2", retry_initial=0)
        try:
            handles = [await r.submit(req()), await r.submit(req())]
            results = await asyncio.gather(*(r.wait(h) for h in handles), return_exceptions=True)
        finally:
            await r.aclose()
    assert len(arrived) == 2
    assert all(not isinstance(x, BaseException) and x.images for x in results), results
    assert r.status_sync is False
