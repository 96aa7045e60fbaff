"""Issue 10 item 5, Modal side: error bodies of the wrong shape from a hostile job API on loopback become
ProtocolError (retryable: the backend's fault), never a raw TypeError/ValueError."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from gpubridge.errors import JobFailed, ProtocolError
from gpubridge.models import JobRequest
from gpubridge.providers.modal import ModalRunner

WF = {"1": {"class_type": "EmptyImage", "inputs": {}}}


class Hostile:
    def __init__(self) -> None:
        self.submit_error: dict[str, Any] | None = None
        self.job_error: dict[str, Any] = {}
        self.throttle = 0

    def envelope(self, state: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"job_id": "j1", "version": 1, "deadline": time.time() + 30,
                "status": {"job_id": "j1", "provider": "modal", "state": state}, "error": error}

    async def submit(self, request: web.Request) -> web.Response:
        if self.submit_error is not None:
            return web.json_response({"error": self.submit_error}, status=500)
        return web.json_response(self.envelope("queued"), status=202)

    async def job(self, request: web.Request) -> web.Response:
        if self.throttle > 0:
            self.throttle -= 1
            return web.json_response({"error": "slow down"}, status=429, headers={"Retry-After": "0"})
        return web.json_response(self.envelope("failed", self.job_error))


@pytest.fixture
async def hostile() -> AsyncIterator[tuple[Hostile, str]]:
    h = Hostile()
    app = web.Application()
    app.router.add_post("/v1/jobs", h.submit)
    app.router.add_get("/v1/jobs/{job_id}", h.job)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield h, f"http://127.0.0.1:{port}"
    await runner.cleanup()


@pytest.mark.parametrize("error", [
    {"type": "WorkflowInvalid", "error": "x"},
    {"type": "JobFailed", "message": "m", "traceback": 5},
    {"type": "RateLimited", "retry_after": "soon"},
])
async def test_a_submit_error_of_the_wrong_shape_is_a_protocol_error(hostile, error):
    h, url = hostile
    h.submit_error = error
    runner = ModalRunner(url, token="t")
    try:
        with pytest.raises(ProtocolError) as info:
            await runner.submit(JobRequest(workflow=WF, timeout=10))
        assert info.value.retryable
    finally:
        await runner.aclose()


async def test_a_job_error_of_the_wrong_shape_is_a_protocol_error(hostile):
    h, url = hostile
    runner = ModalRunner(url, token="t")
    try:
        h.job_error = {"type": "JobFailed", "message": "m", "traceback": 5}
        with pytest.raises(ProtocolError):
            await runner.wait("j1", timeout=5)
        h.job_error = {"type": "JobFailed", "message": "m", "node_id": 3, "traceback": ["line 1"]}
        with pytest.raises(JobFailed) as info:  # the right shape still reads
            await runner.wait("j1", timeout=5)
        assert info.value.node_id == "3"
    finally:
        await runner.aclose()


async def test_a_429_while_following_a_job_is_asked_again(hostile):
    """Issue 23 on the Modal side: one 429 on the job's long-poll ended the attempt with RateLimited, and
    failover ran the job a second time while the first one was finishing."""
    h, url = hostile
    h.throttle = 1
    h.job_error = {"type": "JobFailed", "message": "node 3 raised", "node_id": "3"}
    runner = ModalRunner(url, token="t")
    try:
        with pytest.raises(JobFailed):  # the job's own end, not the 429
            await runner.wait("j1", timeout=5)
        assert h.throttle == 0
    finally:
        await runner.aclose()


async def test_a_submit_that_may_have_created_the_job_is_asked_again_after_a_refusal(hostile):
    """Soak finding: an answer lost (or unreadable) after the job was created, then a refused connection
    on the resend,
    ended the submit (job_may_be_running=False) and failover ran the job a second time elsewhere."""
    import httpx

    h, url = hostile
    keys: list[str] = []

    class LostThenRefused(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.real = httpx.AsyncHTTPTransport()
            self.calls = 0
            self.first = "lost"

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.calls += 1
            keys.append(request.headers.get("Idempotency-Key", ""))
            if self.calls == 1:
                response = await self.real.handle_async_request(request)
                await response.aread()
                if self.first == "unreadable":
                    return httpx.Response(202, content=b"{not json", request=request)
                raise httpx.ReadTimeout("the answer was lost", request=request)
            if self.calls == 2:
                raise httpx.ConnectError("connection refused", request=request)
            return await self.real.handle_async_request(request)

        async def aclose(self) -> None:
            await self.real.aclose()

    for first in ("lost", "unreadable"):
        keys.clear()
        transport = LostThenRefused()
        transport.first = first
        runner = ModalRunner(url, token="t", transport=transport)
        try:
            handle = await runner.submit(JobRequest(workflow=WF, timeout=10))
            assert handle.job_id == "j1" and len(keys) == 3 and len(set(keys)) == 1
        finally:
            await runner.aclose()
