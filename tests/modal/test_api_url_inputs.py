"""URL inputs through the job API under uvicorn: the guarded fetcher refuses loopback and bad URLs with a
422 naming the input (issue 10 item 2, issue 20 item 1), before connecting."""

from __future__ import annotations

import httpx
import pytest

from ..test_fetch import IMG2IMG, Server, ok
from .conftest import TOKEN, serve_api

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def api(threaded_comfy):
    with serve_api(threaded_comfy.url) as (url, backend):
        yield url


@pytest.mark.parametrize("url", ["{base}/face.png", "http://2130706433:{port}/face.png",
                                 "http://[::ffff:127.0.0.1]:{port}/face.png",
                                 "ht\ntp://x", "ftp://127.0.0.1/x"])
async def test_url_input_refused_with_422_before_connecting(api: str, threaded_comfy, url: str):
    async with Server(ok()) as server, httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as http:
        target = url.format(base=server.url, port=server.port)
        resp = await http.post("/v1/run", json={"workflow": IMG2IMG, "inputs": {"face.png": {"url": target}}})
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["type"] == "WorkflowInputError" and error["retryable"] is False
    assert "face.png" in error["message"]
    assert server.accepted == 0 and threaded_comfy.double.stats.uploads == 0


async def test_url_input_server_error_is_a_retryable_424(api: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GPUBRIDGE_FETCH_ALLOW", "127.0.0.1")

    async def unavailable(head, w, s) -> None:
        w.write(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    async with Server(unavailable) as server, httpx.AsyncClient(base_url=api, headers=AUTH, timeout=30) as http:
        resp = await http.post("/v1/run", json={"workflow": IMG2IMG,
                                                "inputs": {"face.png": {"url": f"{server.url}/face.png"}}})
    assert resp.status_code == 424, resp.text  # the caller's URL failed, not this server (never a 5xx)
    assert resp.json()["error"]["type"] == "InputUnavailable" and resp.json()["error"]["retryable"] is True
