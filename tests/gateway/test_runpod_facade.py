"""The gateway's RunPod facade: a caller written for RunPod changes only its base URL. Behind it, the runner
fails over from a RunPod endpoint whose queue never moves to the local provider."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpubridge.testing import ComfyDouble, RunPodEndpointDouble

from .helpers import AUTH, TOKEN, Gateway, workflow

ENDPOINT = "ryla-comfy"
RUNPOD_KEY = "rp-key-never-shown-3b1d"


def _never_called(job: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("no worker should run a job")


@pytest.fixture
def comfy(tmp_path: Path) -> Iterator[Any]:
    with ComfyDouble(root=tmp_path / "comfy", cache=False).run_in_thread() as double:
        yield double


@pytest.fixture
def stuck_runpod() -> Iterator[RunPodEndpointDouble]:
    """A RunPod endpoint with no workers: every job sits IN_QUEUE for ever."""
    double = RunPodEndpointDouble(_never_called, endpoint_id="ep-stuck", api_key=RUNPOD_KEY, workers=0)
    double.start_in_thread()
    yield double
    double.stop_thread()


@pytest.fixture
def gateway(comfy, stuck_runpod, tmp_path: Path) -> Iterator[Gateway]:
    gw = Gateway(comfy.url, tmp_path / "data", "--runpod-endpoint", ENDPOINT, "--max-body-mb", "1", env={
        "GPUBRIDGE_PROVIDER": "runpod",
        "GPUBRIDGE_FALLBACKS": "local",
        "GPUBRIDGE_QUEUE_TIMEOUT": "1",
        "GPUBRIDGE_RUNPOD_ENDPOINT_ID": stuck_runpod.endpoint_id,
        "GPUBRIDGE_RUNPOD_API_KEY": RUNPOD_KEY,
        "GPUBRIDGE_RUNPOD_BASE_URL": stuck_runpod.base_url,
    })
    gw.start()
    yield gw
    gw.stop()


def status(gw: Gateway, job_id: str, *, until_done: bool = True) -> dict[str, Any]:
    import time

    deadline = time.monotonic() + 60
    while True:
        body = httpx.get(f"{gw.url}/v2/{ENDPOINT}/status/{job_id}", headers={"Authorization": TOKEN},
                         timeout=10).json()
        if not until_done or body["status"] not in ("IN_QUEUE", "IN_PROGRESS") or time.monotonic() > deadline:
            return body
        time.sleep(0.1)  # RunPod callers poll /status; this one does too (with a deadline)


def test_a_runpod_shaped_job_completes_on_the_fallback_and_leaves_runpod_empty(comfy, stuck_runpod, gateway):
    # Exactly what the TypeScript service sends to RunPod today, with the gateway's URL and token.
    image = base64.b64encode((Path(__file__).parents[2] / "examples" / "inputs" / "input.png").read_bytes()).decode()
    wf = workflow()
    submitted = httpx.post(
        f"{gateway.url}/v2/{ENDPOINT}/run",
        json={"input": {"workflow": wf, "images": [{"name": "face.png", "image": image}]},
              "policy": {"executionTimeout": 120_000}},
        headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30,
    )
    assert submitted.status_code == 200, submitted.text
    job = submitted.json()
    assert job["status"] in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED") and job["id"]

    body = status(gateway, job["id"])
    assert body["status"] == "COMPLETED", body
    assert isinstance(body["delayTime"], int) and isinstance(body["executionTime"], int)
    images = body["output"]["images"]
    assert len(images) == 2
    assert all(i["type"] == "base64" and base64.b64decode(i["data"])[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert images[0]["filename"].endswith(".png") and images[0]["node_id"] == "3"
    assert comfy.stats.prompts_accepted == 1  # served by the fallback, once
    # RunPod got the job, it sat in the queue, the failover cancelled it: nothing is left queued there.
    health = httpx.get(f"{stuck_runpod.endpoint_url}/health", headers={"Authorization": RUNPOD_KEY}).json()
    assert health["jobs"]["inQueue"] == 0
    assert ("POST", f"/v2/{stuck_runpod.endpoint_id}/run") in stuck_runpod.requests
    assert any(m == "POST" and "/cancel/" in p for m, p in stuck_runpod.requests)
    assert RUNPOD_KEY not in gateway.log.read_text()


def test_the_runpod_sdk_runs_a_job_against_the_gateway_unchanged(comfy, gateway, monkeypatch):
    import runpod

    monkeypatch.setattr(runpod, "api_key", TOKEN)
    monkeypatch.setattr(runpod, "endpoint_url_base", f"{gateway.url}/v2")
    output = runpod.Endpoint(ENDPOINT).run_sync({"workflow": workflow()}, timeout=120)
    assert len(output["images"]) == 2
    assert output["images"][0]["type"] == "base64"

    job = runpod.Endpoint(ENDPOINT).run({"workflow": workflow()})
    assert job.output(timeout=120)["images"][0]["mime_type"] == "image/png"
    assert job.status() == "COMPLETED"


def test_runpod_shaped_bad_input_gets_typed_4xx_and_runs_nothing(comfy, gateway):
    url = f"{gateway.url}/v2/{ENDPOINT}"
    key = {"Authorization": TOKEN}
    ui = {"nodes": [{"id": 1, "type": "EmptyImage"}], "links": []}
    cases = {
        "malformed json": httpx.post(f"{url}/run", content=b'{"input": ', headers={**key, "content-type": "application/json"}),
        "no input": httpx.post(f"{url}/run", json={}, headers=key),
        "missing workflow": httpx.post(f"{url}/run", json={"input": {"images": []}}, headers=key),
        "ui workflow": httpx.post(f"{url}/run", json={"input": {"workflow": ui}}, headers=key),
        "bad image": httpx.post(f"{url}/run", json={"input": {"workflow": workflow(),
                                                              "images": [{"name": "a.png", "image": "%%%"}]}}, headers=key),
        "unknown endpoint": httpx.post(f"{gateway.url}/v2/other-endpoint/run", json={"input": {"workflow": workflow()}},
                                       headers=key),
        "unknown job": httpx.get(f"{url}/status/nope", headers=key),
        "bad key": httpx.post(f"{url}/run", json={"input": {"workflow": workflow()}}, headers={"Authorization": "x"}),
        "no key": httpx.post(f"{url}/run", json={"input": {"workflow": workflow()}}),
        "oversize": httpx.post(f"{url}/run", json={"input": {"workflow": workflow(), "pad": "x" * 2_000_000}},
                               headers=key),
        "webhook without config": httpx.post(f"{url}/run", json={"input": {"workflow": workflow()},
                                                                 "webhook": "https://example.com/hook"}, headers=key),
    }
    statuses = {name: r.status_code for name, r in cases.items()}
    assert statuses == {
        "malformed json": 422, "no input": 422, "missing workflow": 422, "ui workflow": 422,
        "bad image": 422, "unknown endpoint": 404, "unknown job": 404, "bad key": 401,
        "no key": 401, "oversize": 413, "webhook without config": 422,
    }, statuses
    types = {name: r.json()["error"]["type"] for name, r in cases.items()}
    assert types["missing workflow"] == "WorkflowFormatError"
    assert types["ui workflow"] == "WorkflowFormatError"
    assert types["bad image"] == "WorkflowInputError"
    assert comfy.stats.prompts_accepted == 0


def test_cancel_health_and_purge_queue(comfy, gateway):
    comfy.hold("ImageInvert")  # held until ComfyUI has the interrupt, not a delay the cancel must beat
    url, key = f"{gateway.url}/v2/{ENDPOINT}", {"Authorization": f"Bearer {TOKEN}"}
    running = httpx.post(f"{url}/run", json={"input": {"workflow": workflow()}}, headers=key, timeout=30).json()
    comfy.wait_until(lambda: bool(comfy.queue_running), timeout=30)  # after the 1 s queue timeout, on local
    comfy.pause()  # the next jobs stay queued in ComfyUI
    queued = [httpx.post(f"{url}/run", json={"input": {"workflow": workflow(), "timeout": 300}}, headers=key,
                         timeout=30).json()["id"] for _ in range(2)]
    health = httpx.get(f"{url}/health", headers=key).json()
    assert health["jobs"]["inProgress"] + health["jobs"]["inQueue"] == 3
    purged = httpx.post(f"{url}/purge-queue", headers=key, timeout=60).json()
    assert purged["status"] == "completed"
    answer: list[dict[str, Any]] = []
    cancel = threading.Thread(target=lambda: answer.append(
        httpx.post(f"{url}/cancel/{running['id']}", headers=key, timeout=60).json()))
    cancel.start()
    comfy.wait_until(lambda: comfy.stats.interrupts > 0, timeout=30)
    comfy.release("ImageInvert")
    cancel.join(60)
    cancelled = answer[0]
    comfy.resume()
    final = {job_id: status(gateway, job_id)["status"] for job_id in [running["id"], *queued]}
    assert cancelled["id"] == running["id"]
    assert final[running["id"]] == "CANCELLED"
    assert purged["removed"] == sum(final[j] == "CANCELLED" for j in queued)
    assert json.dumps(final).count("COMPLETED") == 2 - purged["removed"]


def test_a_workflow_only_a_comfyui_can_judge_fails_naming_the_node(comfy, gateway):
    # RunPod (the primary) cannot check node inputs before it runs; the ComfyUI that takes the job refuses
    # it before executing anything, and the failure names the node and the input.
    bad = {**workflow(), "1": {"class_type": "EmptyImage", "inputs": {"width": -1}}}
    job = httpx.post(f"{gateway.url}/v2/{ENDPOINT}/run", json={"input": {"workflow": bad}},
                     headers={"Authorization": TOKEN}, timeout=30).json()
    body = status(gateway, job["id"])
    assert body["status"] == "FAILED", body
    assert body["error"].startswith("Workflow validation failed") and "width" in body["error"]
    assert body["output"]["gpubridge_error"]["exception_type"] == "WorkflowInvalid"
    assert comfy.stats.prompts_accepted == 0
