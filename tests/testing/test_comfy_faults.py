"""Each fault knob of the ComfyUI double, from Python and over HTTP. No sleeps, no timings."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import aiohttp
import pytest

from gpubridge.testing import ComfyDouble, CrashFault, DropFault, ErrorFault

from .conftest import assert_shape, recording

TINY = {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "tiny"}},
}


def sampler_prompt(steps: int = 4, seed: int = 1) -> dict[str, Any]:
    """An SD 1.5 text-to-image graph (model files from the double's defaults)."""
    return {
        "4": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        },
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd"}},
    }


async def submit(
    http: aiohttp.ClientSession, prompt: dict[str, Any], client_id: str | None = "faults", **extra: Any
) -> str:
    body: dict[str, Any] = {"prompt": copy.deepcopy(prompt), **extra}
    if client_id is not None:
        body["client_id"] = client_id
    response = await http.post("/prompt", json=body)
    assert response.status == 200, await response.text()
    return (await response.json())["prompt_id"]


def _types(frames: list[tuple[str, Any]]) -> list[str]:
    return [f[1]["type"] for f in frames if f[0] == "text"]


# ------------------------------------------------------------------------------------------ delays


async def test_node_delay_keeps_the_node_running_until_lowered(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    comfy.faults.delays = {"SaveImage": 3600.0}
    prompt_id = await submit(http, TINY)
    await comfy.wait_until(lambda: comfy.jobs[prompt_id].node == "2")
    queue = await (await http.get("/queue")).json()
    assert [item[1] for item in queue["queue_running"]] == [prompt_id]
    assert await (await http.get(f"/history/{prompt_id}")).json() == {}
    comfy.faults.delays = {}  # delays are re-read while they run
    assert (await comfy.wait_for_state(prompt_id)).state == "success"


async def test_interrupt_lands_at_the_next_node_boundary(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.node_delay = 3600.0
    prompt_id = await submit(http, TINY)
    await comfy.wait_until(lambda: comfy.jobs[prompt_id].node == "1")
    assert (await http.post("/interrupt")).status == 200
    comfy.faults.node_delay = 0.0  # node 1 finishes (not interruptible); node 2 is where it lands
    frames = await ws.until_done(prompt_id)
    interrupted = next(
        f[1]["data"] for f in frames if f[0] == "text" and f[1]["type"] == "execution_interrupted"
    )
    assert interrupted["node_id"] == "2" and interrupted["executed"] == ["1"]
    assert _types(frames)[-3:] == ["execution_interrupted", "status", "executing"]
    assert comfy.jobs[prompt_id].state == "interrupted"


async def test_step_delay_and_interrupt_at_the_next_step(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.step_delays = {"KSampler": 3600.0}
    prompt_id = await submit(http, sampler_prompt(steps=6))
    await comfy.wait_until(lambda: comfy.jobs[prompt_id].node == "3")
    await http.post("/interrupt", json={"prompt_id": prompt_id})
    comfy.faults.step_delays = {}
    frames = await ws.until_done(prompt_id)
    interrupted = next(
        f[1]["data"] for f in frames if f[0] == "text" and f[1]["type"] == "execution_interrupted"
    )
    assert interrupted["node_id"] == "3" and interrupted["node_type"] == "KSampler"
    assert "3" not in interrupted["executed"]
    assert "progress" not in _types(frames)
    entry = (await (await http.get(f"/history/{prompt_id}")).json())[prompt_id]
    (recorded,) = recording("queue_control.json")["history"]["A"].values()  # an interrupted job
    assert_shape(entry["status"], recorded["status"])
    assert (entry["outputs"], entry["meta"]) == (recorded["outputs"], recorded["meta"]) == ({}, {})


async def test_sampler_reports_progress_per_step(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    prompt_id = await submit(http, sampler_prompt(steps=5))
    frames = await ws.until_done(prompt_id)
    progress = [f[1]["data"] for f in frames if f[0] == "text" and f[1]["type"] == "progress"]
    assert [(p["value"], p["max"], p["node"]) for p in progress] == [(i, 5, "3") for i in range(1, 6)]
    recorded = next(
        m["json"]
        for m in recording("ws_binary_legacy.json")["messages"]
        if m.get("kind") == "text" and m["json"]["type"] == "progress"
    )
    for item in progress:
        assert_shape({"type": "progress", "data": item}, recorded)
    # each progress frame follows a progress_state with the same value
    for index, frame in enumerate(frames):
        if frame[0] == "text" and frame[1]["type"] == "progress":
            state = frames[index - 1][1]
            assert state["type"] == "progress_state"
            assert state["data"]["nodes"]["3"]["value"] == frame[1]["data"]["value"]


# ------------------------------------------------------------------------------------------ errors


async def test_error_on_a_node_class(comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any) -> None:
    recorded = next(
        m["json"]
        for m in recording("ws_error.json")["messages"]
        if m.get("kind") == "text" and m["json"]["type"] == "execution_error"
    )
    ws = await connect("faults")
    comfy.faults.error = ErrorFault(
        class_type="KSampler",
        exception_type="torch.OutOfMemoryError",
        exception_message="CUDA out of memory.",
        times=1,
    )
    prompt_id = await submit(http, sampler_prompt())
    frames = await ws.until_done(prompt_id)
    assert _types(frames)[-3:] == ["execution_error", "status", "executing"]
    error = next(f[1] for f in frames if f[0] == "text" and f[1]["type"] == "execution_error")
    data = error["data"]
    assert_shape({**error, "data": {**data, "current_inputs": {}}}, recorded)  # inputs differ per node
    assert all(isinstance(v, list) and len(v) == 1 for v in data["current_inputs"].values())
    assert (data["node_id"], data["node_type"], data["exception_type"]) == (
        "3",
        "KSampler",
        "torch.OutOfMemoryError",
    )
    assert (
        data["exception_message"].startswith("CUDA out of memory.\n") and "TIPS:" in data["exception_message"]
    )
    assert data["current_inputs"]["steps"] == [4] and data["current_inputs"]["sampler_name"] == ["euler"]
    assert sorted(data["current_outputs"]) == sorted(sampler_prompt())
    entry = (await (await http.get(f"/history/{prompt_id}")).json())[prompt_id]
    assert (
        entry["status"]["status_str"] == "error" and entry["status"]["messages"][-1][0] == "execution_error"
    )
    assert comfy.faults.error is None  # times=1: disarmed
    again = await submit(http, sampler_prompt())
    assert (await comfy.wait_for_state(again)).state == "success"  # disarmed after one failure


async def test_error_at_a_step_and_by_node_id(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.error = ErrorFault(
        node_id="3",
        at_step=3,
        exception_type="RuntimeError",
        exception_message="boom",
        traceback=['  File "x", line 1, in y\n'],
    )
    prompt_id = await submit(http, sampler_prompt(steps=5))
    frames = await ws.until_done(prompt_id)
    assert [f[1]["data"]["value"] for f in frames if f[0] == "text" and f[1]["type"] == "progress"] == [1, 2]
    error = next(f[1]["data"] for f in frames if f[0] == "text" and f[1]["type"] == "execution_error")
    assert error["exception_message"] == "boom\n" and error["traceback"] == ['  File "x", line 1, in y\n']
    assert comfy.faults.error is not None  # times=None: stays armed


async def test_error_fault_over_http(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    response = await http.post(
        "/gpubridge/faults", json={"error": {"class_type": "SaveImage", "exception_type": "OSError"}}
    )
    assert response.status == 200
    assert (await response.json())["error"]["class_type"] == "SaveImage"
    prompt_id = await submit(http, TINY, client_id=None)
    job = await comfy.wait_for_state(prompt_id)
    assert job.state == "error" and job.error is not None and job.error["exception_type"] == "OSError"
    assert (await http.post("/gpubridge/faults", json={"error": None})).status == 200
    assert comfy.faults.error is None
    bad = await http.post("/gpubridge/faults", json={"no_such_knob": 1})
    assert bad.status == 400 and "no_such_knob" in (await bad.json())["error"]


# ------------------------------------------------------------------------------------------ crash


async def test_crash_mid_job_and_restart(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.crash = CrashFault(class_type="SaveImage")
    prompt_id = await submit(http, TINY)
    frames = await ws.until(lambda f: f[0] == "closed")
    assert (
        "text",
        {"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": prompt_id}},
    ) in frames
    job = await comfy.wait_for_state(prompt_id)
    assert job.state == "lost" and comfy.crashed
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as fresh:
            await fresh.get(comfy.url + "/system_stats")
    port = comfy.port
    await comfy.restart()
    assert comfy.port == port and not comfy.crashed
    async with aiohttp.ClientSession(base_url=comfy.url) as fresh:
        assert (await fresh.get("/system_stats")).status == 200
        assert await (await fresh.get("/queue")).json() == {"queue_running": [], "queue_pending": []}
        assert await (await fresh.get("/history")).json() == {}
        again = await submit(fresh, TINY)
        assert (await comfy.wait_for_state(again)).state == "success"


async def test_crash_over_http_answers_then_dies(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    response = await http.post("/gpubridge/crash")
    assert response.status == 200
    await comfy.wait_until(lambda: comfy.crashed)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as fresh:
            await fresh.get(comfy.url + "/prompt")


# ------------------------------------------------------------------------------------------ websocket drops


async def test_dropped_websocket_job_still_finishes(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.drop_ws = DropFault(after="executing", count=2, client_id="faults")
    prompt_id = await submit(http, TINY)
    frames = await ws.until(lambda f: f[0] == "closed")
    texts = [f[1] for f in frames if f[0] == "text"]
    assert [t["type"] for t in texts].count("executing") == 2 and texts[-1]["type"] == "executing"
    assert ws.ws.closed and ws.ws.close_code != 1000
    job = await comfy.wait_for_state(prompt_id)
    assert job.state == "success"
    assert prompt_id in await (await http.get(f"/history/{prompt_id}")).json()
    assert comfy.stats.ws_dropped == 1 and comfy.faults.drop_ws is None  # times=1: disarmed


async def test_drop_sockets_now_and_over_http(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    a = await connect("a")
    b = await connect("b")
    assert await comfy.drop_sockets("a") == 1
    await a.until(lambda f: f[0] == "closed")
    response = await http.post("/gpubridge/drop_ws", json={})
    assert (await response.json())["dropped"] == 1
    await b.until(lambda f: f[0] == "closed")


# ------------------------------------------------------------------------------------------ stuck queue


async def test_paused_queue_keeps_jobs_pending(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    comfy.pause()
    first = await submit(http, TINY)
    second_prompt = copy.deepcopy(TINY)
    second_prompt["1"]["inputs"]["color"] = 1
    second = await submit(http, second_prompt)
    queue = await (await http.get("/queue")).json()
    assert queue["queue_running"] == [] and sorted(i[1] for i in queue["queue_pending"]) == sorted(
        [first, second]
    )
    assert await (await http.get("/prompt")).json() == {"exec_info": {"queue_remaining": 2}}
    assert comfy.stats.jobs_started == 0
    assert (await http.post("/gpubridge/resume")).status == 200
    for prompt_id in (first, second):
        assert (await comfy.wait_for_state(prompt_id)).state == "success"
    await http.post("/gpubridge/faults", json={"paused": True})
    third = await submit(http, TINY)
    assert comfy.jobs[third].state == "pending"
    comfy.resume()
    await comfy.wait_for_state(third)


# ------------------------------------------------------------------------------------------ history race


async def test_history_is_written_after_execution_success(
    comfy: ComfyDouble, http: aiohttp.ClientSession, connect: Any
) -> None:
    ws = await connect("faults")
    comfy.faults.hold_history = True
    prompt_id = await submit(http, TINY)
    await ws.until_type("execution_success")
    assert await (await http.get(f"/history/{prompt_id}")).json() == {}  # ComfyUI's race window
    comfy.faults.hold_history = False
    frames = await ws.until_done(prompt_id)
    assert _types(frames) == ["status", "executing"]
    assert prompt_id in await (await http.get(f"/history/{prompt_id}")).json()


async def test_history_delay_is_a_knob(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    response = await http.post("/gpubridge/faults", json={"history_delay": 0.001, "node_delay": 0})
    assert (await response.json())["history_delay"] == 0.001
    prompt_id = await submit(http, TINY, client_id=None)
    assert (await comfy.wait_for_state(prompt_id)).history is not None


# ------------------------------------------------------------------------------------------ HTTP steering


async def test_fault_routes(comfy: ComfyDouble, http: aiohttp.ClientSession) -> None:
    faults = await (await http.get("/gpubridge/faults")).json()
    assert faults["node_delay"] == 0.0 and faults["error"] is None and faults["hold"] == []
    await http.post("/gpubridge/faults", json={"hold": ["SaveImage"], "delays": {"1": 0}})
    assert comfy.faults.hold == {"SaveImage"}
    prompt_id = await submit(http, TINY)
    waiter = asyncio.ensure_future(
        http.get("/gpubridge/wait", params={"prompt_id": prompt_id, "state": "success"})
    )
    await comfy.wait_until(lambda: comfy.jobs[prompt_id].node == "2")
    job = await (await http.get(f"/gpubridge/jobs/{prompt_id}")).json()
    assert job["state"] == "running" and job["node"] == "2"
    await http.post("/gpubridge/faults/reset")
    assert (await (await waiter).json())["state"] == "success"
    stats = await (await http.get("/gpubridge/stats")).json()
    assert stats["stats"]["prompts_accepted"] == 1 and stats["jobs"] == {prompt_id: "success"}
    timeout = await http.get("/gpubridge/wait", params={"prompt_id": "nope", "timeout": "0"})
    assert timeout.status == 408
    assert (await http.get("/gpubridge/wait", params={"prompts": "1"})).status == 200
    assert (await http.get("/gpubridge/jobs/nope")).status == 404


# ------------------------------------------------------------------------------------ held prompts


async def test_hold_prompts_keeps_a_post_unanswered_until_unset(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    await http.post("/gpubridge/faults", json={"hold_prompts": True})
    post = asyncio.ensure_future(submit(http, TINY))
    await comfy.wait_until(lambda: comfy.stats.prompts_arrived == 1)
    assert not post.done() and comfy.stats.prompts_received == 0 and comfy.jobs == {}
    comfy.faults.hold_prompts = False
    prompt_id = await post
    assert (await comfy.wait_for_state(prompt_id)).state == "success"


async def test_the_cleanup_of_an_old_socket_unregisters_its_client_id_even_when_reused(
    comfy: ComfyDouble, http: aiohttp.ClientSession
) -> None:
    """ComfyUI's websocket handler pops its sid in ``finally``: a newer socket under the same id is lost."""
    old = await http.ws_connect("/ws?clientId=same")
    await old.receive()
    new = await http.ws_connect("/ws?clientId=same")
    await new.receive()
    assert comfy.client_ids == ["same"] and comfy.open_sockets == 2
    await old.close()
    await comfy.wait_until(lambda: comfy.open_sockets == 1)
    assert comfy.client_ids == []  # the new socket is open but unregistered: deaf
    await new.close()
