"""The RunPod worker under faults (issue 24): a hung node, a caller's timeout above the operator's cap, oversize
outputs, a ComfyUI that fails to start or never answers, and the progress throttle's last node. Each test
failed on main before the fix."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from types import ModuleType
from typing import Any

import httpx
import pytest

from .conftest import WORKFLOWS, free_port
from .test_worker import Harness, job

INVERT = json.loads((WORKFLOWS / "model_free_invert.json").read_text())


@pytest.fixture
async def configure(worker_module: ModuleType):
    """Configure the worker module for a test; its ComfyClient and any managed ComfyUI are closed after."""
    made = []

    def make(**options: Any) -> Any:
        w = worker_module.configure(reconnect_timeout=0.5, **options)
        made.append(w)
        return w

    yield make
    await worker_module.aclose()
    for w in made:
        await asyncio.to_thread(w.stop)


async def test_a_hung_node_ends_at_the_deadline_and_the_worker_asks_to_be_replaced(worker_module, configure, comfy):
    configure(comfy_url=comfy.url, job_timeout=1.0, interrupt_grace=0.5, progress_interval=0.0)
    comfy.hold("ImageInvert")  # a node that ignores interrupts, like a stuck kernel
    try:
        async with Harness(worker_module) as url, httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
            hung = (await http.post("/runsync", json={"input": {"workflow": INVERT}})).json()
            assert hung["status"] == "FAILED", hung
            assert "timed out" in hung["error"] and "asks to be replaced" in hung["error"]
            # The next job on this worker fails at once, asking for replacement again, instead of waiting.
            out = await worker_module.handler(job({"workflow": INVERT}, "job-2"))
            assert out["refresh_worker"] is True and "ignored its interrupt" in out["error"]
    finally:
        comfy.release("ImageInvert")


async def test_a_callers_timeout_never_exceeds_the_operators_cap(worker_module, configure, comfy):
    configure(comfy_url=comfy.url, job_timeout=1.0, progress_interval=0.0)
    comfy.faults.delays = {"ImageInvert": 2.5}
    async with Harness(worker_module) as url, httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        out = (await http.post("/runsync", json={"input": {"workflow": INVERT, "timeout": 3600}})).json()
        assert out["status"] == "FAILED" and "timed out" in out["error"], out
        refused = (await http.post("/runsync", json={"input": {"workflow": INVERT, "timeout": True}})).json()
        assert refused["status"] == "FAILED" and "'timeout' must be a positive number" in refused["error"]


async def test_outputs_over_runpods_result_limit_fail_naming_the_limit_and_the_bucket_setting(
    worker_module, configure, comfy
):
    configure(comfy_url=comfy.url, max_output_bytes=2000, progress_interval=0.0)
    async with Harness(worker_module) as url, httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as http:
        failed = (await http.post("/runsync", json={"input": {"workflow": INVERT}})).json()
    assert failed["status"] == "FAILED" and "GPUBRIDGE_MAX_OUTPUT_MB" in failed["error"], failed
    out = await worker_module.handler(job({"workflow": INVERT}, "job-2"))
    assert out["gpubridge_error"]["exception_type"] == "OutputTooLarge", out
    assert "BUCKET_ENDPOINT_URL" in out["error"] and "GPUBRIDGE_MAX_OUTPUT_MB" in out["error"]
    assert out["gpubridge_error"]["size"] > out["gpubridge_error"]["limit"] == 2000 and out["gpubridge_error"]["files"] == 2
    assert "images" not in out  # nothing half-sent


def test_the_start_bound_has_a_default(worker_module, monkeypatch):
    monkeypatch.delenv("COMFY_START_TIMEOUT", raising=False)
    assert worker_module.WorkerConfig.from_env().start_timeout == 600.0


@pytest.mark.parametrize("script, bound", [
    ("import sys; print('CUDA error: no kernel image'); sys.exit(1)", 30.0),  # exits at once
    ("import time; print('loading custom nodes'); time.sleep(120)", 1.0),      # never answers
])
async def test_a_comfyui_that_cannot_start_leaves_a_worker_that_fails_jobs_and_asks_to_be_replaced(
    worker_module, configure, script, bound
):
    cmd = f"{shlex.quote(sys.executable)} -u -c {shlex.quote(script)}"
    w = configure(comfy_url=f"http://127.0.0.1:{free_port()}", comfy_start_cmd=cmd, start_timeout=bound)
    await asyncio.to_thread(worker_module.init)  # does not raise: the worker comes up
    assert w.process is None and w.start_error is not None
    async with Harness(worker_module) as url, httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as http:
        failed = (await http.post("/runsync", json={"input": {"workflow": INVERT}})).json()
    assert failed["status"] == "FAILED", failed
    assert "ComfyUI did not start" in failed["error"]
    assert ("CUDA error" in failed["error"]) or ("loading custom nodes" in failed["error"])


async def test_the_node_that_starts_last_is_reported_by_a_trailing_update(worker_module, configure, comfy,
                                                                          monkeypatch):
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(worker_module, "send_progress", lambda _job, payload: sent.append(payload["progress"]))
    configure(comfy_url=comfy.url, progress_interval=0.5)
    comfy.faults.delays = {"ImageInvert": 0.05, "SaveImage": 1.5}  # SaveImage starts well within 0.5 s
    out = await worker_module.handler(job({"workflow": INVERT}))
    assert "error" not in out, out
    assert sent and sent[-1]["node_type"] == "SaveImage", sent
    assert len(sent) <= 3  # still throttled


async def test_a_jobs_files_are_removed_once_its_result_is_built(worker_module, configure, comfy):
    from pathlib import Path

    from .test_worker import IMG2IMG, INPUT_PNG

    import base64

    image = base64.b64encode(INPUT_PNG).decode()
    body = {"workflow": IMG2IMG, "images": [{"name": "face.png", "image": image}]}
    out_dir, in_dir = Path(comfy.output_dir), Path(comfy.input_dir)

    def files(root: Path) -> list[Path]:
        return sorted(p for p in root.rglob("*") if p.is_file() and "gpubridge" in p.parts)

    configure(comfy_url=comfy.url, progress_interval=0.0, output_dir=str(out_dir), input_dir=str(in_dir))
    out = await worker_module.handler(job(body))
    assert "error" not in out and len(out["images"]) == 1, out
    assert files(out_dir) == [] and files(in_dir) == []  # both gone: the disk does not fill

    configure(comfy_url=comfy.url, progress_interval=0.0, output_dir=str(out_dir), input_dir=str(in_dir),
              keep_job_files=True)  # kept for debugging when asked
    out = await worker_module.handler(job(body, "job-2"))
    assert len(files(out_dir)) == 1 and len(files(in_dir)) == 1


async def test_a_job_cancelled_by_runpod_on_a_hung_node_makes_the_next_job_ask_for_a_new_worker(
    worker_module, configure, comfy
):
    configure(comfy_url=comfy.url, interrupt_grace=0.5, progress_interval=0.0)
    comfy.hold("ImageInvert")  # ignores the interrupt
    try:
        task = asyncio.create_task(worker_module.handler(job({"workflow": INVERT})))
        await comfy.wait_until(lambda: bool(comfy.queue_running))
        task.cancel()  # what the SDK does on a RunPod cancel or executionTimeout
        with pytest.raises(asyncio.CancelledError):
            await task
        out = await worker_module.handler(job({"workflow": INVERT}, "job-2"))
        assert out["refresh_worker"] is True and "ignored its interrupt" in out["error"]
        assert comfy.stats.prompts_accepted == 1  # the next job was not queued behind the stuck one
    finally:
        comfy.release("ImageInvert")


async def test_a_dead_comfyui_names_the_setting_the_worker_reads(worker_module, configure):
    configure(comfy_url=f"http://127.0.0.1:{free_port()}", progress_interval=0.0)
    out = await worker_module.handler(job({"workflow": INVERT}))
    assert out["refresh_worker"] is True and "point COMFY_URL at a running server" in out["error"]
    assert "GPUBRIDGE_COMFY_URL" not in out["error"]  # the worker does not read that one (issue 25, item 3)


def test_progress_is_not_posted_off_runpod(worker_module, monkeypatch):
    """`handler.py --test_input` printed "Failed to return job results" per progress update: off RunPod the
    SDK has no URL to post it to (issue 25)."""
    import runpod.serverless

    posted = []

    def sdk_progress_update(job, progress):
        posted.append(progress)

    sdk_progress_update.__module__ = "runpod.serverless.modules.rp_progress"  # the SDK's own function
    monkeypatch.setattr(runpod.serverless, "progress_update", sdk_progress_update)
    monkeypatch.delenv("RUNPOD_WEBHOOK_POST_OUTPUT", raising=False)
    worker_module.send_progress({"id": "local_test"}, {"progress": {"node_id": "3"}})
    assert posted == []
    monkeypatch.setenv("RUNPOD_WEBHOOK_POST_OUTPUT", "https://api.runpod.ai/v2/x/job-done/$ID?gpu=1")
    worker_module.send_progress({"id": "job-1"}, {"progress": {"node_id": "3"}})
    assert posted == [{"progress": {"node_id": "3"}}]


def test_the_sdk_logs_at_info_unless_asked(worker_module, configure, monkeypatch):
    """At the SDK's default (DEBUG) every job's whole output, base64 and all, went to the log; its import
    made httpx log every request (issue 25)."""
    import logging

    from runpod.serverless.modules.rp_logger import RunPodLogger

    httpx_logger = logging.getLogger("httpx")
    before = httpx_logger.level
    monkeypatch.delenv("RUNPOD_LOG_LEVEL", raising=False)
    monkeypatch.delenv("RUNPOD_DEBUG_LEVEL", raising=False)
    monkeypatch.setattr(RunPodLogger, "level", "DEBUG")
    httpx_logger.setLevel(logging.NOTSET)
    try:
        configure(comfy_url=f"http://127.0.0.1:{free_port()}")
        assert RunPodLogger.level == "INFO" and httpx_logger.level == logging.WARNING
        monkeypatch.setattr(RunPodLogger, "level", "DEBUG")
        monkeypatch.setenv("RUNPOD_LOG_LEVEL", "DEBUG")  # an operator's choice stands
        configure(comfy_url=f"http://127.0.0.1:{free_port()}")
        assert RunPodLogger.level == "DEBUG"
    finally:
        httpx_logger.setLevel(before)
