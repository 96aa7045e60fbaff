"""How the ComfyUI client reads websocket frames it does not decode at once: status broadcasts and
execution_success are skipped, progress_state is kept and decoded only when the job's progress is read, and
a frame written another way (other separators, other key order) is decoded as before."""

from __future__ import annotations

import json

import pytest

from gpubridge.comfy import ComfyClient
from gpubridge.comfy.client import ComfyJob

PROMPT = {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}},
          "3": {"class_type": "SaveImage", "inputs": {}}}


def progress_state(prompt_id: str, finished: int, **dumps: object) -> str:
    nodes = {str(i): {"state": "finished" if i <= finished else "running"} for i in range(1, 4)}
    return json.dumps({"type": "progress_state", "data": {"prompt_id": prompt_id, "nodes": nodes}}, **dumps)


@pytest.mark.parametrize("dumps", [{}, {"separators": (",", ":")}], ids=["comfyui", "compact"])
async def test_progress_state_is_read_when_the_progress_is(dumps):
    client = ComfyClient("http://127.0.0.1:1")
    try:
        job = ComfyJob(client, "p-1", PROMPT, None)
        client._jobs["p-1"] = job
        client._on_text(progress_state("p-1", 1, **dumps))
        client._on_text(progress_state("p-1", 2, **dumps))  # only the last one counts
        client._on_text(progress_state("other", 3, **dumps))  # another client's prompt
        assert job.nodes_done == 2 and job.progress().nodes_done == 2
        assert job.nodes_done == 2  # read once, kept
        client._on_text(json.dumps({"data": {"prompt_id": "p-1", "nodes": {"1": {"state": "finished"}}},
                                    "type": "progress_state"}))  # keys the other way round: decoded at once
        assert job.nodes_done == 1
    finally:
        await client.aclose()


async def test_status_and_execution_success_frames_change_nothing_and_other_frames_still_count():
    client = ComfyClient("http://127.0.0.1:1")
    try:
        job = ComfyJob(client, "p-2", PROMPT, None)
        client._jobs["p-2"] = job
        client._on_text(json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}))
        client._on_text(json.dumps({"type": "execution_start", "data": {"prompt_id": "p-2"}}))
        client._on_text(json.dumps({"type": "execution_success", "data": {"prompt_id": "p-2"}}))
        assert job.state.value == "running" and not job.finished  # success is not the completion signal
        client._on_text(json.dumps({"type": "executing", "data": {"node": None, "prompt_id": "p-2"}},
                                   separators=(",", ":")))
        assert job.finished and job.state.value == "succeeded"
        client._on_text('{"type": "status", "data": ')  # malformed: ignored without decoding
        client._on_text("not json")  # ignored, as before
    finally:
        await client.aclose()
