"""The RunPod worker (contrib/runpod_worker/handler.py) against the ComfyUI double: called directly, under
the real runpod harness (WorkerAPI + uvicorn on loopback), and behind the endpoint double with gpubridge's
RunPod provider."""

from __future__ import annotations

import asyncio
import base64
import json
import shlex
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from gpubridge.errors import JobCancelled, JobFailed, WorkflowInvalid
from gpubridge.models import ArtifactKind, EventType, JobRequest, Workflow
from gpubridge.testing import CrashFault, ErrorFault
from gpubridge.testing.runpod import RunPodEndpointDouble

from .conftest import API_KEY, ROOT, WORKFLOWS, free_port, make_runner

INPUT_PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()
INVERT = json.loads((WORKFLOWS / "model_free_invert.json").read_text())
IMG2IMG = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
    "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
    "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "inv"}},
}
MEDIA = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 3, "color": 255}},
    "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0,
                                                       "lossless": True, "quality": 80, "method": "default"}},
    "3": {"class_type": "SaveWEBM", "inputs": {"images": ["1", 0], "filename_prefix": "clip", "codec": "vp9",
                                               "fps": 24.0, "crf": 32.0}},
    "4": {"class_type": "PreviewAny", "inputs": {"source": "hello from node 4"}},
}


def flux(steps: int = 4) -> dict[str, Any]:
    wf = Workflow.load(WORKFLOWS / "flux_schnell_t2i.json")
    wf.set("KSampler.steps", steps)
    wf.set("Size.width", 64)
    wf.set("Size.height", 64)
    return wf.to_api()


def job(inp: dict[str, Any], job_id: str = "job-1") -> dict[str, Any]:
    return {"id": job_id, "input": inp}


# --------------------------------------------------------------------------------------- the handler


async def test_worker_comfyui_input_and_output_shape(worker: ModuleType, comfy: Any):
    data_uri = "data:image/png;base64," + base64.b64encode(INPUT_PNG).decode()
    out = await worker.handler(job({"workflow": IMG2IMG, "images": [{"name": "face.png", "image": data_uri}]}))
    assert "error" not in out, out
    assert [set(i) >= {"filename", "type", "data"} for i in out["images"]] == [True]
    image = out["images"][0]
    assert image["type"] == "base64" and image["filename"].startswith("inv_")
    png = base64.b64decode(image["data"])
    assert png.startswith(b"\x89PNG")
    assert comfy.stats.uploads == 1
    assert set(out["timings"]) >= {"queued_s", "executing_s", "upload_s", "download_s", "total_s"}
    assert out["gpubridge"]["prompt_id"] in comfy.jobs
    # a second job reuses the worker's one ComfyClient (one websocket)
    again = await worker.handler(job({"workflow": INVERT}, "job-2"))
    assert len(again["images"]) == 2
    assert len(worker.get_worker()._clients) == 1


async def test_video_gif_and_text_outputs(worker: ModuleType):
    out = await worker.handler(job({"workflow": MEDIA}))
    assert "error" not in out, out
    # worker-comfyui's clients read output.images: the animated WebP and the video are there, as ComfyUI
    # listed them under "images"
    assert [i["mime_type"] for i in out["images"]] == ["image/webp", "video/webm"]
    assert all(i["animated"] for i in out["images"])
    assert base64.b64decode(out["images"][1]["data"]).startswith(b"\x1aE\xdf\xa3")  # EBML header
    assert out["text"] == [{"node_id": "4", "text": "hello from node 4"}]
    assert "gifs" not in out and "videos" not in out
    assert "status" not in out  # worker-comfyui's "success_no_images" only when nothing came out


@pytest.mark.parametrize(
    ("inp", "message", "exc_type"),
    [
        (None, "Please provide input", "WorkflowInputError"),
        ("{not json", "Invalid JSON format in input", "WorkflowInputError"),
        ({"images": []}, "Missing 'workflow' parameter", "WorkflowFormatError"),
        ({"workflow": {"nodes": [], "links": []}}, "UI-format workflow", "WorkflowFormatError"),
        ({"workflow": INVERT, "images": [{"name": "x.png"}]}, "'images' must be a list", "WorkflowInputError"),
        ({"workflow": INVERT, "images": [{"name": "x.png", "image": "not base64!"}]},
         "Failed to upload one or more input images", "WorkflowInputError"),
    ],
)
async def test_bad_input(worker: ModuleType, inp: Any, message: str, exc_type: str):
    out = await worker.handler(job(inp))
    assert message in out["error"]
    assert out["gpubridge_error"]["exception_type"] == exc_type
    assert "refresh_worker" not in out


async def test_execution_error_has_node_details(worker: ModuleType, comfy: Any):
    comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_type="RuntimeError",
                                    exception_message="injected")
    out = await worker.handler(job({"workflow": INVERT}))
    assert out["error"].startswith("Workflow execution error: Node Type: ImageInvert, Node ID: 2, Message: injected")
    d = out["gpubridge_error"]
    assert (d["node"], d["node_type"], d["exception_type"]) == ("2", "ImageInvert", "RuntimeError")
    assert d["traceback"] and "refresh_worker" not in out


async def test_validation_error(worker: ModuleType, comfy: Any):
    wf = json.loads(json.dumps(INVERT))
    wf["1"]["inputs"]["width"] = "wide"
    out = await worker.handler(job({"workflow": wf}))
    assert out["error"].startswith("Workflow validation failed")
    assert out["gpubridge_error"]["exception_type"] == "WorkflowInvalid" and "1" in out["gpubridge_error"]["node_errors"]
    assert comfy.stats.prompts_received == 0  # refused before it was queued


async def test_dead_comfyui_fails_fast_and_refreshes(worker_module: ModuleType):
    worker_module.configure(comfy_url=f"http://127.0.0.1:{free_port()}")
    try:
        out = await worker_module.handler(job({"workflow": INVERT}))
    finally:
        await worker_module.aclose()
    assert out["refresh_worker"] is True
    assert out["error"].startswith("ComfyUI is not reachable")
    assert out["gpubridge_error"]["worker_failure"] is True


async def test_comfyui_crash_during_job_refreshes_worker(worker: ModuleType, comfy: Any):
    comfy.faults.crash = CrashFault(class_type="ImageInvert")
    out = await worker.handler(job({"workflow": INVERT}))
    assert out["refresh_worker"] is True and "ComfyUI" in out["error"]


async def test_managed_comfyui_started_once_and_death_detected(worker_module: ModuleType, tmp_path: Path):
    port = free_port()
    cmd = f"{shlex.quote(sys.executable)} -m gpubridge.testing.comfy --host {{host}} --port {{port}} --root {tmp_path}"
    w = worker_module.configure(comfy_url=f"http://127.0.0.1:{port}", comfy_start_cmd=cmd, start_timeout=30.0)
    try:
        await asyncio.to_thread(worker_module.init)
        proc = w.process
        assert proc is not None and proc.alive()
        first = await worker_module.handler(job({"workflow": INVERT}))
        assert "error" not in first, first
        assert w.process is proc  # not restarted per job
        await asyncio.to_thread(proc.kill)
        dead = await worker_module.handler(job({"workflow": INVERT}, "job-2"))
        assert dead["refresh_worker"] is True and "exited" in dead["error"]
    finally:
        await worker_module.aclose()
        await asyncio.to_thread(w.stop)


async def test_cancelled_handler_interrupts_comfyui(worker: ModuleType, comfy: Any):
    comfy.faults.step_delays = {"KSampler": 0.5}
    task = asyncio.create_task(worker.handler(job({"workflow": flux(steps=50)})))
    await comfy.wait_until(lambda: any(j.state == "running" for j in comfy.jobs.values()))
    prompt_id = next(iter(comfy.jobs))
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    finished = await comfy.wait_for_state(prompt_id)
    assert finished.state == "interrupted"


# ------------------------------------------------------------------------------------ runpod harness


class Harness:
    """runpod's own local API (``WorkerAPI(...).rp_app``) under uvicorn on a loopback port, in a thread."""

    def __init__(self, worker: ModuleType):
        import uvicorn
        from runpod.serverless.modules.rp_fastapi import WorkerAPI

        self.worker = worker
        self.port = free_port()
        api = WorkerAPI({"handler": worker.handler})
        self.server = uvicorn.Server(uvicorn.Config(api.rp_app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="off"))
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve())
            loop.run_until_complete(self.worker.aclose())  # the worker's ComfyClient for this loop
        finally:
            loop.close()

    async def _serve(self) -> None:
        task = asyncio.create_task(self.server.serve())
        while not self.server.started and not task.done():
            await asyncio.sleep(0.01)  # uvicorn has no readiness hook
        self.started.set()
        await task

    async def __aenter__(self) -> str:
        self.thread.start()
        await asyncio.to_thread(self.started.wait, 10)
        return f"http://127.0.0.1:{self.port}"

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        await asyncio.to_thread(self.thread.join, 10)


async def test_runpod_harness_runsync_run_and_failure(worker: ModuleType, comfy: Any):
    async with Harness(worker) as url, httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        data_uri = "data:image/png;base64," + base64.b64encode(INPUT_PNG).decode()
        resp = await http.post("/runsync", json={"input": {
            "workflow": IMG2IMG, "images": [{"name": "face.png", "image": data_uri}]}})
        body = resp.json()
        assert resp.status_code == 200 and body["status"] == "COMPLETED", body
        assert body["output"]["images"][0]["type"] == "base64"

        run = (await http.post("/run", json={"input": {"workflow": MEDIA}})).json()
        status = (await http.post(f"/status/{run['id']}")).json()  # the harness runs /run jobs here
        assert status["status"] == "COMPLETED" and [i["mime_type"] for i in status["output"]["images"]] == [
            "image/webp", "video/webm"]

        comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_message="boom")
        failed = (await http.post("/runsync", json={"input": {"workflow": INVERT}})).json()
        assert failed["status"] == "FAILED"
        assert "Node Type: ImageInvert, Node ID: 2, Message: boom" in failed["error"]


# ------------------------------------------------------------------- endpoint double + provider


async def test_provider_end_to_end_with_progress(endpoint: RunPodEndpointDouble, comfy: Any):
    runner = make_runner(endpoint, gpu_type="ADA_24")
    comfy.faults.step_delay = 0.02
    events = []
    try:
        result = await runner.run(JobRequest(workflow=flux(steps=6), timeout=60), on_event=events.append)
    finally:
        await runner.aclose()
    assert [a.kind for a in result.artifacts] == [ArtifactKind.IMAGE]
    assert result.images[0].width == 64 and result.images[0].data.startswith(b"\x89PNG")
    assert result.outputs and result.timings.executing_s is not None
    assert result.cost is not None and result.cost.rate_usd_per_s == 0.00031
    types = [e.type for e in events]
    assert types[0] is EventType.QUEUED and types[-1] is EventType.SUCCEEDED
    assert EventType.STARTED in types and EventType.EXECUTING in types
    steps = [(e.node_id, e.value, e.max) for e in events if e.type is EventType.PROGRESS]
    assert steps and all(node == "7" and maximum == 6 for node, _, maximum in steps)
    assert endpoint.counters["progress_updates"] >= len(steps)


async def test_provider_failure_and_cancel_end_to_end(endpoint: RunPodEndpointDouble, comfy: Any):
    runner = make_runner(endpoint)
    try:
        comfy.faults.error = ErrorFault(class_type="KSampler", exception_type="torch.OutOfMemoryError",
                                        exception_message="Allocation on device", times=1)
        with pytest.raises(JobFailed) as info:
            await runner.run(JobRequest(workflow=flux()))
        exc = info.value
        assert (exc.node_id, exc.node_type) == ("7", "KSampler")
        assert exc.exception_type == "torch.OutOfMemoryError" and exc.retryable is True

        comfy.faults.step_delays = {"KSampler": 0.5}
        handle = await runner.submit(JobRequest(workflow=flux(steps=50)))
        await comfy.wait_until(lambda: any(j.state == "running" for j in comfy.jobs.values()
                                           if j.prompt_id != exc.details.get("prompt_id")))
        await runner.cancel(handle)
        with pytest.raises(JobCancelled):
            await runner.wait(handle)
        await comfy.wait_until(lambda: any(j.state == "interrupted" for j in comfy.jobs.values()))

        comfy.faults.step_delays = {}
        wf = json.loads(json.dumps(INVERT))
        wf["1"]["inputs"]["width"] = "wide"
        with pytest.raises(WorkflowInvalid):
            await runner.run(JobRequest(workflow=wf))
    finally:
        await runner.aclose()


async def test_dead_comfyui_behind_endpoint_is_retryable_and_refreshes(endpoint: RunPodEndpointDouble,
                                                                        worker: ModuleType, comfy: Any):
    runner = make_runner(endpoint)
    try:
        await comfy.crash()
        with pytest.raises(JobFailed) as info:
            await runner.run(JobRequest(workflow=INVERT))
        assert info.value.retryable is True and "ComfyUI" in str(info.value)
        assert endpoint.counters["refreshes"] == 1  # refresh_worker reached RunPod: the worker reboots
    finally:
        await runner.aclose()


async def test_sdk_endpoint_against_the_double(endpoint: RunPodEndpointDouble):
    """runpod.Endpoint works against the double; it loses a FAILED job's error, which we keep."""
    import runpod

    saved = runpod.endpoint_url_base
    runpod.endpoint_url_base = endpoint.base_url
    try:
        sdk = runpod.Endpoint(endpoint.endpoint_id, api_key=API_KEY)
        out = await asyncio.to_thread(sdk.run_sync, {"input": {"workflow": INVERT}}, 30)
        assert len(out["images"]) == 2
        failed = await asyncio.to_thread(sdk.run_sync, {"input": {"images": []}}, 30)
        assert failed == {"details": ["Missing 'workflow' parameter"],  # the error text is dropped by the SDK
                          "gpubridge_error": {"exception_type": "WorkflowFormatError",
                                              "exception_message": "Missing 'workflow' parameter"}}
        health = await asyncio.to_thread(sdk.health)
        assert health["jobs"]["completed"] == 1 and health["jobs"]["failed"] == 1
    finally:
        runpod.endpoint_url_base = saved


async def test_handler_script_with_test_input(comfy: Any):
    """`python handler.py --test_input ...`: the container's entry point, run by runpod's local test mode."""
    test_input = (ROOT / "contrib" / "runpod_worker" / "test_input.json").read_text()
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RUNPOD_")}
    env.update(COMFY_URL=comfy.url, RUNPOD_LOG_LEVEL="INFO")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "contrib" / "runpod_worker" / "handler.py"), "--test_input", test_input,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert proc.returncode == 0, text
    assert "Job result" in text and "model_free_00001_.png" in text
