"""The local provider against the ComfyUI double over a real loopback socket."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket

import pytest
from PIL import Image

from gpubridge.errors import JobCancelled, JobFailed, JobTimeout, ProviderUnavailable, WorkflowInvalid
from gpubridge.models import EventType, JobRequest, JobState, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.testing import CrashFault, DropFault, ErrorFault

from ..conftest import EXAMPLES

INVERT = Workflow.load(EXAMPLES / "model_free_invert.json")


def sampler_workflow(steps: int = 20) -> dict:
    wf = json.loads((EXAMPLES / "flux_schnell_t2i.json").read_text())
    wf["7"]["inputs"]["steps"] = steps
    wf["6"]["inputs"].update(width=64, height=64)
    return wf


def png(width: int, height: int, colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


async def test_runs_a_workflow_and_returns_images(local):
    result = await local.run(JobRequest(workflow=INVERT))
    assert result.provider == "local" and result.state is JobState.SUCCEEDED
    assert [(a.kind.value, a.width, a.height, a.mime_type) for a in result.artifacts] == [
        ("image", 256, 256, "image/png")
    ] * 2
    assert all(a.data and a.data.startswith(b"\x89PNG") and a.size == len(a.data) for a in result.artifacts)
    assert result.artifacts[0].subfolder.startswith("gpubridge/")  # per-job output folder
    t = result.timings
    assert t.total_s is not None and t.queued_s is not None and t.executing_s is not None


async def test_progress_events_in_order(local, comfy):
    comfy.faults.step_delay = 0.001
    handle = await local.submit(JobRequest(workflow=sampler_workflow(steps=4)))
    events = [e async for e in local.events(handle)]
    types = [e.type for e in events]
    assert types[0] is EventType.QUEUED and types[1] is EventType.STARTED and types[-1] is EventType.SUCCEEDED
    steps = [(e.node_id, e.node_type, e.value, e.max) for e in events if e.type is EventType.PROGRESS]
    assert steps == [("7", "KSampler", float(i), 4.0) for i in range(1, 5)]
    executing = [e.node_type for e in events if e.type is EventType.EXECUTING]
    assert "KSampler" in executing and "SaveImage" in executing
    result = await local.wait(handle)
    assert len(result.images) == 1 and result.images[0].width == 64


async def test_websocket_drop_is_recovered_through_history(local, comfy):
    comfy.faults.node_delay = 0.01
    comfy.faults.drop_ws = DropFault(after="execution_start")
    result = await local.run(JobRequest(workflow=INVERT))
    assert comfy.stats.ws_dropped == 1
    assert len(result.images) == 2 and all(a.data for a in result.images)


async def test_execution_error_is_job_failed_naming_the_node(local, comfy):
    comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_type="RuntimeError",
                                    exception_message="CUDA error: device-side assert")
    with pytest.raises(JobFailed) as info:
        await local.run(JobRequest(workflow=INVERT))
    err = info.value
    assert err.node_id == "2" and err.node_type == "ImageInvert" and err.exception_type == "RuntimeError"
    assert "device-side assert" in str(err) and err.traceback and not err.retryable


async def test_invalid_workflow_fails_before_queueing(local, comfy):
    bad = INVERT.with_values({"Canvas.width": 0, "Save.filename_prefix": "x"})
    with pytest.raises(WorkflowInvalid) as info:
        await local.run(JobRequest(workflow=bad))
    err = info.value
    assert err.node_errors["1"]["class_type"] == "EmptyImage"
    assert [(e.node_id, e.input_name, e.type) for e in err.errors] == [("1", "width", "value_smaller_than_min")]
    assert "node 1 (EmptyImage) input 'width'" in str(err)
    assert comfy.stats.prompts_received == 0  # never reached ComfyUI's queue


async def test_server_side_validation_is_mapped_too(comfy):
    runner = LocalRunner(comfy.url, validate=False)
    try:
        bad = INVERT.with_values({"Canvas.width": 0})
        with pytest.raises(WorkflowInvalid) as info:
            await runner.run(JobRequest(workflow=bad))
        assert info.value.errors[0].input_name == "width"
        assert comfy.stats.prompts_rejected == 1 and comfy.queue_remaining == 0
    finally:
        await runner.aclose()


async def test_partly_valid_prompt_is_refused_not_silently_trimmed(local, comfy):
    wf = INVERT.copy().to_api()
    wf["4"] = {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}}
    wf["5"] = {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "b"}}
    with pytest.raises(WorkflowInvalid, match="node 4"):
        await local.run(JobRequest(workflow=wf))
    assert comfy.stats.prompts_received == 0


async def test_deadline_interrupts_a_running_job(local, comfy):
    comfy.faults.step_delay = 0.02
    with pytest.raises(JobTimeout) as info:
        await local.run(JobRequest(workflow=sampler_workflow(steps=5000), timeout=0.3))
    assert info.value.cancelled and info.value.state == "running"
    assert comfy.stats.interrupts >= 1
    await comfy.wait_for_idle()
    (job,) = comfy.jobs.values()
    assert job.state == "interrupted"


async def test_deadline_dequeues_a_stuck_job(local, comfy):
    comfy.faults.paused = True
    with pytest.raises(JobTimeout) as info:
        await local.run(JobRequest(workflow=INVERT, timeout=0.2))
    assert info.value.cancelled and info.value.state == "queued"
    assert comfy.stats.deletes == 1 and comfy.queue_remaining == 0


async def test_cancel_a_queued_job(local, comfy):
    comfy.faults.paused = True
    handle = await local.submit(JobRequest(workflow=INVERT))
    status = await local.status(handle)
    assert status.state is JobState.QUEUED and status.queue_position == 0
    status = await local.cancel(handle)
    assert status.state is JobState.CANCELLED
    with pytest.raises(JobCancelled):
        await local.wait(handle)
    assert comfy.stats.deletes == 1 and comfy.queue_remaining == 0


async def test_cancel_a_running_job(local, comfy):
    comfy.faults.step_delay = 0.02
    handle = await local.submit(JobRequest(workflow=sampler_workflow(steps=5000)))
    await comfy.wait_for_state(handle.job_id, "running")
    status = await local.cancel(handle)
    assert status.state is JobState.CANCELLED
    assert comfy.jobs[handle.job_id].state == "interrupted"
    with pytest.raises(JobCancelled):
        await local.wait(handle)


async def test_input_images_are_uploaded_and_never_collide(local, comfy):
    wf = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "in"}},
    }
    a, b = png(96, 64), png(40, 30, (200, 0, 0))
    ra, rb = await asyncio.gather(
        local.run(JobRequest(workflow=wf, inputs={"face.png": a})),
        local.run(JobRequest(workflow=wf, inputs={"face.png": "data:image/png;base64," + base64.b64encode(b).decode()})),
    )
    assert (ra.images[0].width, ra.images[0].height) == (96, 64)
    assert (rb.images[0].width, rb.images[0].height) == (40, 30)
    assert comfy.stats.uploads == 2


async def test_concurrent_jobs_get_their_own_outputs(local):
    results = await asyncio.gather(*(local.run(JobRequest(workflow=INVERT)) for _ in range(20)))
    paths = {(a.subfolder, a.filename) for r in results for a in r.artifacts}
    assert len(paths) == 40
    assert len({r.job_id for r in results}) == 20


async def test_unreachable_comfyui_fails_fast_naming_url_and_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    runner = LocalRunner(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await runner.run(JobRequest(workflow=INVERT))
        msg = str(info.value)
        assert f"127.0.0.1:{port}" in msg and "connection refused" in msg and "gpubridge testing comfy" in msg
        assert info.value.retryable
        assert not (await runner.health()).ok
    finally:
        await runner.aclose()


async def test_crash_mid_job_fails_with_retryable_error(local, comfy):
    comfy.faults.crash = CrashFault(class_type="ImageInvert")
    with pytest.raises(ProviderUnavailable) as info:
        await local.run(JobRequest(workflow=INVERT))
    assert info.value.retryable and "went away" in str(info.value)


async def test_a_job_nobody_follows_builds_no_event_objects_and_still_replays_them(local):
    handle = await local.submit(JobRequest(workflow=INVERT))
    job = local.client.job(handle.job_id)
    await job.wait()
    assert job.stream._events and all(type(item) is tuple for item in job.stream._events)  # recorded only
    events = [e async for e in local.events(handle)]  # a late subscriber still gets every event, built now
    types = [e.type for e in events]
    assert types[0] is EventType.QUEUED and types[1] is EventType.STARTED and types[-1] is EventType.SUCCEEDED
    assert all(e.job_id == handle.job_id and e.provider == "local" for e in events)
    assert [e.at for e in events] == sorted(e.at for e in events)
    await local.wait(handle)


async def test_status_after_wait_of_a_success_is_answered_from_the_compact_record(local, comfy):
    handle = await local.submit(JobRequest(workflow=INVERT))
    result = await local.wait(handle)
    assert local.client.job(handle.job_id) is None  # the record was dropped with the result delivered
    comfy.history.clear()  # so ComfyUI cannot be what answers
    status = await local.status(handle)
    assert status.state is JobState.SUCCEEDED and status.error is None and status.job_id == handle.job_id
    assert status.updated_at == result.timings.finished_at


async def test_status_and_result_from_another_client(local, comfy):
    handle = await local.submit(JobRequest(workflow=INVERT))
    await local.wait(handle)
    other = LocalRunner(comfy.url)
    try:
        assert (await other.status(handle.job_id)).state is JobState.SUCCEEDED
        again = await other.wait(handle.job_id)
        assert len(again.images) == 2
    finally:
        await other.aclose()


async def test_health_reports_version_and_queue(local):
    report = await local.health()
    assert report.ok and report.version and report.queue_depth == 0


def test_sync_facade_against_the_double(tmp_path):
    from gpubridge.testing import ComfyDouble

    with ComfyDouble(root=tmp_path).run_in_thread() as comfy, LocalRunner(comfy.url).sync() as runner:
        result = runner.run(INVERT, timeout=30)
        assert len(result.images) == 2
        paths = result.save(tmp_path / "out")
        assert all(p.read_bytes().startswith(b"\x89PNG") for p in paths)


async def test_a_submit_cancelled_in_flight_leaves_nothing_queued(local, comfy):
    comfy.faults.paused = True
    await local.client.start()
    task = asyncio.create_task(local.submit(JobRequest(workflow=INVERT)))
    await comfy.wait_for_prompts(1)  # the POST reached ComfyUI; cancel before we see its answer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await comfy.wait_until(lambda: comfy.stats.deletes == 1)
    assert comfy.queue_remaining == 0


async def test_requests_to_comfyui_are_gated_and_a_cancelled_wait_gives_its_slot_back(comfy):
    """At most max_connections requests go to the wire at once (the rest wait in order), and a waiter that
    is cancelled does not leak its slot."""
    from gpubridge.comfy import ComfyClient

    client = ComfyClient(comfy.url, max_connections=2)
    try:
        real = client._h1.exchange
        in_flight, peak, gate = 0, 0, asyncio.Event()

        async def counting(*args, **kwargs):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await gate.wait()
                return await real(*args, **kwargs)
            finally:
                in_flight -= 1

        client._h1.exchange = counting
        calls = [asyncio.create_task(client.system_stats()) for _ in range(6)]
        doomed = asyncio.create_task(client.queue())
        for _ in range(5):
            await asyncio.sleep(0)
        assert peak == 2  # two in httpx, five waiting at the gate
        doomed.cancel()
        gate.set()
        results = await asyncio.gather(*calls)
        assert all(r["system"]["comfyui_version"] for r in results)
        assert peak == 2
        assert client._gate._slots._value == 2  # the cancelled waiter's slot came back
    finally:
        await client.aclose()


async def test_uncollected_finished_jobs_are_bounded(comfy):
    from gpubridge.comfy import ComfyClient

    client = ComfyClient(comfy.url, max_retained=3)
    try:
        jobs = []
        for i in range(6):
            job = await client.submit(INVERT.with_values({"Canvas.color": i}).to_api())
            await job.wait()
            jobs.append(job.prompt_id)
        assert len(client._jobs) <= 4 and jobs[-1] in client._jobs and jobs[0] not in client._jobs
        assert (await client.remote_status(jobs[0])).state is JobState.SUCCEEDED  # still in ComfyUI's history
    finally:
        await client.aclose()


async def test_a_result_fetched_by_another_process_has_honest_timings(comfy):
    """`gpubridge result JOB` for a job another process submitted: when it was submitted is unknown there,
    so queued and total times are None, never negative (issue 25, item 1); it ran for what ComfyUI says."""
    import time

    submitter, reader = LocalRunner(comfy.url), LocalRunner(comfy.url)
    comfy.faults.node_delay = 0.05
    try:
        handle = await submitter.submit(JobRequest(workflow=INVERT))
        result = await reader.wait(handle.job_id)
    finally:
        await submitter.aclose()
        await reader.aclose()
    t = result.timings
    assert result.images and t.submitted_at is None and t.queued_s is None and t.total_s is None
    messages = dict((kind, data) for kind, data in comfy.history[handle.job_id]["status"]["messages"])
    assert t.started_at == messages["execution_start"]["timestamp"] / 1000  # ComfyUI's own timestamps,
    assert t.finished_at == messages["execution_success"]["timestamp"] / 1000  # not when we asked
    assert t.executing_s == round(t.finished_at - t.started_at, 6) and t.finished_at <= time.time()


async def test_an_output_over_the_cap_is_refused_on_the_hot_path_without_reading_it(comfy):
    """The lean transport reads a short body with its head, but never one over max_output_bytes: the declared
    length refuses it first."""
    from gpubridge.errors import PayloadTooLarge

    runner = LocalRunner(comfy.url, max_output_bytes=64)
    try:
        assert runner.client._h1 is not None  # the hot path, not httpx
        with pytest.raises(PayloadTooLarge, match="max_output_bytes"):
            await runner.run(JobRequest(workflow=INVERT))
        assert not runner.client._h1._idle or all(c.usable() for c in runner.client._h1._idle)
    finally:
        await runner.aclose()
