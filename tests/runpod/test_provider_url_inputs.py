"""URL inputs on a RunPod endpoint (issue 13, item 4): a stock worker-comfyui base64-decodes every image, so
for it the provider fetches URL inputs itself (through the guarded fetcher) and sends their bytes; an
endpoint configured as running the gpubridge worker gets the URL and downloads it there."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from gpubridge.errors import WorkflowInputError
from gpubridge.models import InputFile, JobRequest

from .conftest import ROOT, make_runner
from .test_worker import IMG2IMG

PNG = (ROOT / "examples" / "inputs" / "input.png").read_bytes()


@pytest.fixture
async def image_url():
    async def face(_request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    app.router.add_get("/face.png", face)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/face.png"
    await runner.cleanup()


def _sent_images(endpoint: Any) -> list[str]:
    (job,) = endpoint._jobs.values()
    return [i["image"] for i in job.input["images"]]


async def test_a_stock_worker_comfyui_gets_url_inputs_as_base64(endpoint, image_url, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")
    runner = make_runner(endpoint)  # worker="worker-comfyui", the default
    try:
        result = await runner.run(JobRequest(workflow=IMG2IMG, inputs={"face.png": InputFile(url=image_url)},
                                             timeout=60))
    finally:
        await runner.aclose()
    assert len(result.images) == 1
    (sent,) = _sent_images(endpoint)
    assert not sent.startswith("http") and sent.startswith("iVBOR")  # the PNG's bytes, base64


async def test_the_gpubridge_worker_gets_the_url(endpoint, image_url, monkeypatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")  # the worker fetches it (same process here)
    runner = make_runner(endpoint, worker="gpubridge")
    try:
        result = await runner.run(JobRequest(workflow=IMG2IMG, inputs={"face.png": InputFile(url=image_url)},
                                             timeout=60))
    finally:
        await runner.aclose()
    assert len(result.images) == 1
    assert _sent_images(endpoint) == [image_url]


async def test_a_url_the_guard_refuses_is_refused_before_runpod_sees_the_job(endpoint, image_url):
    runner = make_runner(endpoint)  # loopback not allowed
    try:
        with pytest.raises(WorkflowInputError, match="loopback"):
            await runner.submit(JobRequest(workflow=IMG2IMG, inputs={"face.png": InputFile(url=image_url)}))
    finally:
        await runner.aclose()
    assert endpoint._jobs == {}
