"""Provider ``comfy`` against the REAL comfy-api-proxy (PyPI) in front of the ComfyUI double: images, a video,
an input image (uploaded once by hash), progress events, cancel of a queued and of a running job, an invalid
workflow, a deadline, and an Idempotency-Key resubmit after a lost answer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from gpubridge.errors import InvalidRequest, JobCancelled, JobTimeout, WorkflowInvalid
from gpubridge.models import ArtifactKind, EventType, JobRequest, Workflow
from gpubridge.providers.comfy_api import ComfyApiRunner

from ..conftest import EXAMPLES, ROOT
from .conftest import faults

INVERT = json.loads((EXAMPLES / "model_free_invert.json").read_text())
MEDIA = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 255}},
    "2": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "clip", "codec": "vp9",
                                               "fps": 24.0, "crf": 32.0}},
}
LOAD = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}
PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()


def colored(color: int) -> dict[str, Any]:
    wf = json.loads(json.dumps(INVERT))
    for node in wf.values():
        if node["class_type"] == "EmptyImage":
            node["inputs"]["color"] = color
    return wf


async def test_images_video_and_an_input_uploaded_once(proxy, comfy):
    runner = ComfyApiRunner(proxy)
    try:
        images = await runner.run(INVERT, timeout=60)
        assert images.images and images.images[0].data.startswith(b"\x89PNG")
        assert images.images[0].mime_type == "image/png" and images.provider == "comfy"
        video = await runner.run(MEDIA, timeout=60)
        assert [a.kind for a in video.artifacts] == [ArtifactKind.VIDEO]
        assert video.artifacts[0].mime_type == "video/webm" and video.artifacts[0].data
        first = await runner.run(JobRequest(workflow=Workflow.model_validate(LOAD), inputs={"face.png": PNG},
                                            timeout=60))
        again = await runner.run(JobRequest(workflow=Workflow.model_validate(LOAD), inputs={"face.png": PNG},
                                            timeout=60))
        assert first.images and again.images
        assert runner.stats["uploads"] == 1 and runner.stats["asset_hits"] == 1  # identical input: one upload
    finally:
        await runner.aclose()


async def test_progress_events_arrive_from_the_stream(proxy, comfy):
    faults(comfy, node_delay=0.3)
    runner = ComfyApiRunner(proxy)
    events: list = []
    try:
        result = await runner.run(colored(3), timeout=60, on_event=events.append)
    finally:
        await runner.aclose()
    types = [e.type for e in events]
    assert result.images and EventType.PROGRESS in types and EventType.STARTED in types
    assert types[-1] is EventType.SUCCEEDED


async def test_cancel_a_queued_and_a_running_job(proxy, comfy):
    faults(comfy, node_delay=2.0)  # interruptible at node boundaries
    runner = ComfyApiRunner(proxy)
    try:
        running = await runner.submit(JobRequest(workflow=Workflow.model_validate(colored(11)), timeout=60))
        queued = await runner.submit(JobRequest(workflow=Workflow.model_validate(colored(12)), timeout=60))
        await asyncio.to_thread(comfy.wait_until, lambda: bool(comfy.queue_running), 20)
        await runner.cancel(queued)
        with pytest.raises(JobCancelled):
            await runner.wait(queued)
        await runner.cancel(running)
        faults(comfy, node_delay=0.0)
        with pytest.raises(JobCancelled):
            await asyncio.wait_for(runner.wait(running), 30)
    finally:
        await runner.aclose()
    assert comfy.stats.interrupts >= 1


async def test_an_invalid_workflow_names_its_node(proxy):
    runner = ComfyApiRunner(proxy)
    bad = {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "x"}},
           "2": {"class_type": "NoSuchNode", "inputs": {}}}
    try:
        with pytest.raises(WorkflowInvalid) as info:
            await runner.submit(JobRequest(workflow=Workflow.model_validate(bad), timeout=60))
    finally:
        await runner.aclose()
    assert "NoSuchNode" in str(info.value) or info.value.node_errors


async def test_a_deadline_cancels_the_job(proxy, comfy):
    faults(comfy, node_delay=1.0)
    runner = ComfyApiRunner(proxy)
    try:
        with pytest.raises(JobTimeout) as info:
            await runner.run(colored(21), timeout=1.5)
    finally:
        await runner.aclose()
    assert info.value.cancelled
    await asyncio.to_thread(comfy.wait_for_idle, 20)


class LoseFirstSubmitAnswer(httpx.AsyncBaseTransport):
    """Sends every request; the answer to the first POST /jobs is lost on the way back (a read timeout)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/api/v2/jobs") and not self.lost:
            self.lost += 1
            await response.aread()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_lost_submit_answer_is_resent_with_its_key_and_runs_once(proxy, comfy):
    transport = LoseFirstSubmitAnswer()
    runner = ComfyApiRunner(proxy, transport=transport)
    try:
        result = await runner.run(colored(31), timeout=60)
        with pytest.raises(InvalidRequest, match="idempotency_key_reuse"):  # a caller's key is single-use
            await runner.submit(JobRequest(workflow=Workflow.model_validate(colored(32)), idempotency_key="k-1",
                                           timeout=60))
            await runner.submit(JobRequest(workflow=Workflow.model_validate(colored(33)), idempotency_key="k-1",
                                           timeout=60))
    finally:
        await runner.aclose()
    assert result.images and transport.lost == 1
    assert runner.stats["resubmits"] == 1 and runner.stats["found_after_lost_answer"] == 1
    assert comfy.stats.prompts_accepted == 2  # colored(31) once (not twice), and colored(32)
