"""Faults the real proxy cannot produce, with respx, answering with the v2 shapes recorded from the real
comfy-api-proxy (tests/fixtures/comfy_v2/): 429 with Retry-After, deployment_stopped, a dropped SSE stream, a
5xx. Plus the error mapping of every recorded envelope, and failover when the proxy's ComfyUI is dead."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import respx

from gpubridge.config import Settings
from gpubridge.connect import connect
from gpubridge.errors import InvalidRequest, JobFailed, JobNotFound, ProviderUnavailable, RateLimited, WorkflowInvalid
from gpubridge.models import JobRequest, Workflow
from gpubridge.plugins import get_registry
from gpubridge.providers.comfy_api import ComfyApiRunner, error_of
from gpubridge.testing import ComfyDouble

from ..conftest import EXAMPLES, ROOT
from .conftest import FIXTURES, free_port, proxy_for

BASE = "http://comfy.test"
INVERT = json.loads((EXAMPLES / "model_free_invert.json").read_text())
PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()


def recorded(name: str) -> dict:
    text = (FIXTURES / name).read_text().replace("http://localhost:18189", BASE)
    return json.loads(text)


def envelope(code: str, message: str = "x") -> dict:
    return {"error": {"code": code, "message": message, "details": None}}  # the recorded envelope's shape


def req() -> JobRequest:
    return JobRequest(workflow=Workflow.model_validate(INVERT), timeout=30)


def mock_success(mock: respx.MockRouter, job: dict) -> None:
    done = recorded("job_succeeded.json") | {"id": job["id"]}
    mock.get(f"/api/v2/jobs/{job['id']}").respond(200, json=done)
    for out in done["outputs"]:
        mock.get(out["url"].removeprefix(BASE)).respond(200, content=PNG, headers={"content-type": "image/png"})


@pytest.mark.parametrize(
    ("name", "status", "kind"),
    [("error_idempotency_key_reuse.json", 422, InvalidRequest), ("error_invalid_workflow.json", 422, WorkflowInvalid),
     ("error_not_found.json", 404, JobNotFound)],
)
def test_recorded_envelopes_map_to_typed_errors(name, status, kind):
    resp = httpx.Response(status, json=json.loads((FIXTURES / name).read_text()),
                          request=httpx.Request("GET", BASE))
    assert isinstance(error_of(resp, provider="comfy", what="x"), kind)


async def test_queue_full_429_honours_retry_after_then_runs():
    job = recorded("job_submitted.json")
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        submit = mock.post("/api/v2/jobs").mock(side_effect=[
            httpx.Response(429, json=envelope("queue_full"), headers={"Retry-After": "0.05"}),
            httpx.Response(201, json=job)])
        mock.get(f"/api/v2/jobs/{job['id']}/events").mock(side_effect=httpx.ReadError("stream dropped"))
        mock_success(mock, job)
        runner = ComfyApiRunner(BASE, poll_initial=0.01)
        try:
            result = await runner.run(req())
        finally:
            await runner.aclose()
    assert submit.call_count == 2 and result.images[0].data == PNG
    keys = [c.request.headers["Idempotency-Key"] for c in submit.calls]
    assert keys[0] == keys[1]  # the resend cannot make a second job


async def test_429_past_the_attempts_is_a_rate_limit_with_its_retry_after():
    with respx.mock(base_url=BASE) as mock:
        mock.post("/api/v2/jobs").respond(429, json=envelope("deployment_not_ready"), headers={"Retry-After": "0"})
        runner = ComfyApiRunner(BASE, max_attempts=2)
        try:
            with pytest.raises(RateLimited) as info:
                await runner.submit(req())
        finally:
            await runner.aclose()
    assert info.value.retry_after == 0 and not info.value.job_may_be_running


async def test_deployment_stopped_is_not_retried_and_fails_over():
    with respx.mock(base_url=BASE) as mock:
        submit = mock.post("/api/v2/jobs").respond(503, json=envelope("deployment_stopped", "stopped"))
        runner = ComfyApiRunner(BASE)
        try:
            with pytest.raises(ProviderUnavailable, match="deployment is stopped") as info:
                await runner.submit(req())
        finally:
            await runner.aclose()
    assert submit.call_count == 1 and info.value.retryable  # retryable elsewhere: failover moves on


async def test_a_dropped_event_stream_falls_back_to_polling_and_5xx_is_asked_again():
    job = recorded("job_submitted.json")
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        mock.post("/api/v2/jobs").respond(201, json=job)
        mock.get(f"/api/v2/jobs/{job['id']}/events").respond(
            200, content=b"event: status\ndata: {\"status\":\"running\"}\n\n",
            headers={"content-type": "text/event-stream"})  # then the stream ends without an end
        done = recorded("job_succeeded.json") | {"id": job["id"]}
        status = mock.get(f"/api/v2/jobs/{job['id']}").mock(side_effect=[
            httpx.Response(200, json=job | {"status": "running"}),
            httpx.Response(502, text="bad gateway"),
            httpx.Response(200, json=done)])
        for out in done["outputs"]:
            mock.get(out["url"].removeprefix(BASE)).respond(200, content=PNG, headers={"content-type": "image/png"})
        runner = ComfyApiRunner(BASE, poll_initial=0.01)
        try:
            result = await runner.run(req())
        finally:
            await runner.aclose()
    assert result.images and status.call_count == 3


async def test_a_failed_job_names_its_node():
    job = recorded("job_submitted.json")
    failed = recorded("job_failed.json") | {"id": job["id"]}
    with respx.mock(base_url=BASE, assert_all_called=False) as mock:
        mock.post("/api/v2/jobs").respond(201, json=job)
        mock.get(f"/api/v2/jobs/{job['id']}/events").respond(
            200, content=b"event: status\ndata: {\"status\":\"failed\"}\n\n",
            headers={"content-type": "text/event-stream"})
        mock.get(f"/api/v2/jobs/{job['id']}").respond(200, json=failed)
        runner = ComfyApiRunner(BASE)
        try:
            with pytest.raises(JobFailed) as info:
                await runner.run(req())
        finally:
            await runner.aclose()
    assert (info.value.node_id, info.value.node_type, info.value.exception_message) == ("2", "ImageInvert", "boom")


async def test_the_api_key_goes_to_the_api_and_never_to_an_output_host():
    job = recorded("job_submitted.json")
    done = recorded("job_succeeded.json") | {"id": job["id"]}
    done["outputs"][0]["url"] = "http://cdn.test/signed/p.png?sig=1"
    with respx.mock(assert_all_called=False) as mock:
        submit = mock.post(f"{BASE}/api/v2/jobs").respond(201, json=job)
        mock.get(f"{BASE}/api/v2/jobs/{job['id']}/events").mock(side_effect=httpx.ReadError("x"))
        mock.get(f"{BASE}/api/v2/jobs/{job['id']}").respond(200, json=done)
        cdn = mock.get("http://cdn.test/signed/p.png").respond(200, content=PNG,
                                                                headers={"content-type": "image/png"})
        runner = ComfyApiRunner(BASE, api_key="sk-secret-77")
        try:
            assert (await runner.run(req())).images
        finally:
            await runner.aclose()
    assert submit.calls[0].request.headers["Authorization"] == "Bearer sk-secret-77"
    assert "authorization" not in cdn.calls[0].request.headers
    assert "sk-secret-77" not in repr(runner)


async def test_a_proxy_whose_comfyui_is_dead_fails_over_to_local(tmp_path: Path, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: the proxy answers upstream_unreachable
    async with ComfyDouble(root=tmp_path / "local") as local:
        with proxy_for(dead) as url:
            monkeypatch.setenv("GPUBRIDGE_PROVIDER", "comfy")
            monkeypatch.setenv("GPUBRIDGE_FALLBACKS", "local")
            monkeypatch.setenv("GPUBRIDGE_COMFY_API_URL", url)
            monkeypatch.setenv("GPUBRIDGE_COMFY_URL", local.url)
            monkeypatch.setenv("GPUBRIDGE_COMFY_API_MAX_ATTEMPTS", "1")
            runner = connect(settings=Settings.load())
            try:
                result = await runner.run(INVERT, timeout=60)
            finally:
                await runner.aclose()
    assert result.provider == "local" and result.images
    assert [a.provider for a in result.attempts][:2] == ["comfy", "local"]


def test_the_provider_is_registered_and_configured_from_the_environment(monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_COMFY_API_URL", "https://my-deployment.run.comfy.app")
    monkeypatch.setenv("GPUBRIDGE_COMFY_API_KEY", "sk-abc")
    monkeypatch.setenv("GPUBRIDGE_COMFY_URL", "http://127.0.0.1:8188")  # the local provider's, left alone
    registry = get_registry()
    assert "comfy" in registry.providers()
    runner = registry.create_runner("comfy", Settings.load())
    assert runner.url == "https://my-deployment.run.comfy.app" and "sk-abc" not in repr(runner)
