"""The RunPod worker's ``images[].image`` URLs go through the guarded fetcher (gpubridge.fetch)."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from ..test_fetch import IMG2IMG, Server, ok


def job(inp: dict[str, Any]) -> dict[str, Any]:
    return {"id": "job-url", "input": inp}


@pytest.mark.parametrize("url", ["{base}/face.png", "http://2130706433:{port}/face.png",
                                 "http://[::ffff:127.0.0.1]:{port}/face.png"])
async def test_worker_refuses_a_loopback_image_url_before_connecting(worker: ModuleType, comfy: Any, url: str):
    async with Server(ok()) as server:
        image = url.format(base=server.url, port=server.port)
        out = await worker.handler(job({"workflow": IMG2IMG, "images": [{"name": "face.png", "image": image}]}))
    assert out["gpubridge_error"]["exception_type"] == "WorkflowInputError", out
    assert "loopback" in out["error"] and "face.png" in out["error"]
    assert "refresh_worker" not in out  # the caller's mistake, not a dead worker
    assert server.accepted == 0 and comfy.stats.uploads == 0


async def test_worker_fetches_an_allowed_image_url(worker: ModuleType, comfy: Any, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")
    await worker.aclose()  # the next job's client reads the fetch settings afresh
    async with Server(ok()) as server:
        out = await worker.handler(job({"workflow": IMG2IMG, "images": [{"name": "face.png",
                                                                          "image": f"{server.url}/face.png"}]}))
    assert "error" not in out, out
    assert server.accepted == 1 and comfy.stats.uploads == 1


async def test_worker_image_url_with_a_control_character_is_an_input_error(worker: ModuleType):
    out = await worker.handler(job({"workflow": IMG2IMG, "images": [{"name": "face.png", "image": "http://x\n/a"}]}))
    assert out["error"] == "Failed to upload one or more input images"
    assert out["gpubridge_error"]["exception_type"] == "WorkflowInputError"
    assert "invalid URL" in out["gpubridge_error"]["errors"][0]


async def test_worker_upstream_5xx_is_not_a_dead_worker(worker: ModuleType, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")
    await worker.aclose()

    async def unavailable(head: bytes, w: Any, s: Server) -> None:
        w.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async with Server(unavailable) as server:
        out = await worker.handler(job({"workflow": IMG2IMG, "images": [{"name": "face.png",
                                                                          "image": f"{server.url}/face.png"}]}))
    assert out["gpubridge_error"]["exception_type"] == "InputUnavailable"
    assert "refresh_worker" not in out and "503" in out["error"]
