"""Lifecycle defects of the ComfyUI client and the local provider (issues 21 and 10), over real sockets:
the ComfyUI double, a loopback TCP proxy that breaks websockets, and hostile fake servers."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import httpx
import pytest
from aiohttp import web

from gpubridge.comfy import protocol
from gpubridge.errors import JobError, JobFailed, JobTimeout, PayloadTooLarge, ProviderUnavailable
from gpubridge.models import EventType, JobRequest, JobState, Workflow
from gpubridge.providers.local import LocalRunner
from gpubridge.testing import DropFault, ErrorFault

from ..conftest import EXAMPLES
from .proxy import TcpProxy

INVERT = Workflow.load(EXAMPLES / "model_free_invert.json")
GUARD = 5.0  # a hang guard, never a synchronisation: the fixed code ends well before it


def ws_images_workflow(batch: int = 2) -> dict:
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": batch, "color": 1}},
        "2": {"class_type": "SaveImageWebsocket", "inputs": {"images": ["1", 0]}},
    }


@pytest.fixture
async def proxy(comfy):
    async with TcpProxy(urlsplit(comfy.url).port) as p:
        yield p


def runner_for(url: str, **options) -> LocalRunner:
    options.setdefault("reconnect_timeout", 10.0)
    options.setdefault("cancel_wait", 10.0)
    options.setdefault("ping_interval", None)
    return LocalRunner(url, **options)


# ------------------------------------------------------------------------------------ 21.1 deaf socket


async def _reset_client_first(runner: LocalRunner, comfy, proxy: TcpProxy) -> None:
    """The network resets the client's side; ComfyUI notices only after the client has reconnected."""
    (old,) = proxy.ws_pairs
    proxy.reset_client_side(old)
    await proxy.wait_for(lambda: len(proxy.ws_pairs) == 2)  # the client reconnected
    await comfy.wait_until(lambda: comfy.open_sockets == 2)
    proxy.close_server_side(old)  # now ComfyUI cleans up the old socket (and pops its client id)
    await comfy.wait_until(lambda: comfy.open_sockets == 1)


async def test_a_reset_the_client_notices_first_does_not_leave_the_socket_deaf(comfy, proxy):
    runner = runner_for(proxy.url, watch_interval=None)  # the fresh client id alone must fix it
    try:
        await runner.client.start()
        await _reset_client_first(runner, comfy, proxy)
        assert comfy.client_ids == [runner.client.client_id]  # still registered: ComfyUI will talk to us
        result = await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=GUARD)), GUARD)
        assert result.state is JobState.SUCCEEDED and len(result.images) == 2
    finally:
        await runner.aclose()


async def test_a_job_queued_under_the_old_client_id_still_finishes(comfy, proxy):
    runner = runner_for(proxy.url, watch_interval=0.02)
    try:
        comfy.hold("SaveImage")
        handle = await runner.submit(JobRequest(workflow=INVERT, timeout=GUARD))
        await comfy.wait_until(lambda: comfy.jobs[handle.job_id].node == "3")
        reads = comfy.stats.queue_reads
        await _reset_client_first(runner, comfy, proxy)
        await comfy.wait_until(lambda: comfy.stats.queue_reads > reads)  # reconciled: ComfyUI says it runs
        comfy.release("SaveImage")  # its frames go to the old client id: nobody hears them
        result = await asyncio.wait_for(runner.wait(handle), GUARD)
        assert result.state is JobState.SUCCEEDED and len(result.images) == 2
    finally:
        await runner.aclose()


async def test_an_open_but_silent_socket_is_detected_and_replaced(comfy, proxy):
    runner = runner_for(proxy.url, watch_interval=0.02, silence_timeout=0.1)
    try:
        await runner.client.start()
        (pair,) = proxy.ws_pairs
        proxy.blackhole(pair)  # open both ways, but ComfyUI's frames never arrive
        result = await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=GUARD)), GUARD)
        assert result.state is JobState.SUCCEEDED and len(result.images) == 2
        await proxy.wait_for(lambda: len(proxy.ws_pairs) == 2)  # the deaf socket was replaced
        result = await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=GUARD)), GUARD)
        assert len(result.images) == 2
    finally:
        await runner.aclose()


# ------------------------------------------------------------------- 21.2 / 21.3 websocket-only images


async def test_websocket_images_lost_in_a_drop_are_a_retryable_failure_not_an_empty_success(local, comfy):
    comfy.faults.drop_ws = DropFault(after="execution_start")  # the images go out after the drop
    with pytest.raises(ProviderUnavailable) as info:
        await asyncio.wait_for(local.run(JobRequest(workflow=ws_images_workflow(), timeout=GUARD)), GUARD)
    assert info.value.retryable and "SaveImageWebsocket" in str(info.value)
    assert comfy.stats.ws_dropped == 1


async def test_websocket_images_of_a_job_that_started_while_the_socket_was_down_reach_it(comfy, proxy):
    runner = runner_for(proxy.url, watch_interval=None)
    try:
        await runner.client.start()
        comfy.hold("SaveImageWebsocket")
        proxy.refuse_ws = True
        proxy.reset(proxy.ws_pairs[0])
        await proxy.wait_for(lambda: proxy.refused >= 1)  # the client is reconnecting, in vain
        handle = await runner.submit(JobRequest(workflow=ws_images_workflow(), timeout=GUARD))
        await comfy.wait_until(lambda: comfy.jobs[handle.job_id].node == "2")  # started while down
        events = runner.events(handle)
        proxy.refuse_ws = False
        async with asyncio.timeout(GUARD):
            async for event in events:
                if event.type is EventType.STARTED:  # reconciled: ComfyUI says it runs
                    break
        comfy.release("SaveImageWebsocket")  # now its images go out, over the new socket
        result = await asyncio.wait_for(runner.wait(handle), GUARD)
        assert [(a.node_id, a.type, a.width) for a in result.artifacts] == [("2", "websocket", 8)] * 2
    finally:
        await runner.aclose()


# ----------------------------------------------------------------------------------------- 21.4 aclose


async def test_aclose_ends_waiters_and_event_streams_with_a_typed_error(comfy):
    runner = LocalRunner(comfy.url)
    comfy.hold("SaveImage")
    handle = await runner.submit(JobRequest(workflow=INVERT, timeout=GUARD))
    await comfy.wait_for_state(handle.job_id, "running")
    waiter = asyncio.create_task(runner.wait(handle))
    events = asyncio.create_task(_collect(runner.events(handle)))
    await runner.aclose()
    with pytest.raises(JobError) as info:
        await asyncio.wait_for(waiter, GUARD)
    assert info.value.job_may_be_running and "closed" in str(info.value)
    seen = await asyncio.wait_for(events, GUARD)
    assert seen[-1] is not EventType.SUCCEEDED
    # Not cancelled: the job is the caller's and runs on (documented).
    assert comfy.jobs[handle.job_id].state == "running"
    comfy.release("SaveImage")


async def _collect(stream) -> list[EventType]:
    return [e.type async for e in stream]


# -------------------------------------------------------------------------------------- 21.5 OOM


async def test_out_of_memory_is_a_retryable_job_failure(local, comfy):
    comfy.faults.error = ErrorFault(
        class_type="ImageInvert",
        exception_type="torch.OutOfMemoryError",
        exception_message="Allocation on device",
    )
    with pytest.raises(JobFailed) as info:
        await local.run(JobRequest(workflow=INVERT))
    assert info.value.retryable and info.value.exception_type == "torch.OutOfMemoryError"


async def test_a_workflow_error_stays_not_retryable(local, comfy):
    comfy.faults.error = ErrorFault(class_type="ImageInvert", exception_type="ValueError")
    with pytest.raises(JobFailed) as info:
        await local.run(JobRequest(workflow=INVERT))
    assert not info.value.retryable


# --------------------------------------------------------------------- 21.6 status/cancel after wait()


async def test_status_and_cancel_after_a_timeout_while_queued_say_timed_out(local, comfy):
    comfy.faults.paused = True
    handle = await local.submit(JobRequest(workflow=INVERT, timeout=0.2))
    with pytest.raises(JobTimeout):
        await local.wait(handle)
    assert (await local.status(handle)).state is JobState.TIMED_OUT
    assert (await local.cancel(handle)).state is JobState.TIMED_OUT


async def test_status_after_a_timeout_while_running_says_timed_out(local, comfy):
    comfy.faults.step_delay = 0.02
    handle = await local.submit(JobRequest(workflow=_sampler(), timeout=0.3))
    with pytest.raises(JobTimeout):
        await local.wait(handle)
    assert (await local.status(handle)).state is JobState.TIMED_OUT
    assert (await local.cancel(handle)).state is JobState.TIMED_OUT


def _sampler() -> dict:
    import json

    wf = json.loads((EXAMPLES / "flux_schnell_t2i.json").read_text())
    wf["7"]["inputs"]["steps"] = 5000
    wf["6"]["inputs"].update(width=64, height=64)
    return wf


# ------------------------------------------------------------- 10.3 the deadline holds, unconfirmed


async def test_the_deadline_holds_when_comfyui_never_confirms_the_interrupt(comfy):
    runner = LocalRunner(comfy.url, deadline_grace=0.2, reap_interval=0.02)
    try:
        comfy.hold("ImageInvert")  # a node that ignores interrupts
        with pytest.raises(JobTimeout) as info:
            await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=0.3)), GUARD)
        assert info.value.state == "running" and not info.value.cancelled  # not confirmed: may still run
        assert "not confirmed" in str(info.value)
        # The reaper keeps interrupting until ComfyUI gives in.
        await comfy.wait_until(lambda: comfy.stats.interrupts >= 3)
        comfy.release("ImageInvert")
        await comfy.wait_for_idle()
        (job,) = comfy.jobs.values()
        assert job.state == "interrupted"
    finally:
        await runner.aclose()


async def test_the_deadline_holds_when_comfyui_stops_answering_the_cancel(comfy):
    """/interrupt and /queue go to a server that accepts and never answers."""
    conns: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = httpx.AsyncClient(base_url=comfy.url, transport=_Rerouted(port, {"/interrupt", "/queue"}))
    runner = LocalRunner(comfy.url, http=http, deadline_grace=0.2, reap_interval=0.05)
    try:
        comfy.faults.step_delay = 0.02
        with pytest.raises(JobTimeout) as info:
            await asyncio.wait_for(runner.run(JobRequest(workflow=_sampler(), timeout=0.3)), GUARD)
        assert info.value.state == "running" and info.value.job_may_be_running
    finally:
        await runner.aclose()
        await http.aclose()
        server.close()
        for writer in conns:
            writer.transport.abort()
        comfy.interrupt()


# ------------------------------------------------------------- 10.4 /view: bounded size and time


class _Rerouted(httpx.AsyncBaseTransport):
    """Send some paths to a hostile server, everything else to the double (both on 127.0.0.1)."""

    def __init__(self, hostile_port: int, paths: set[str]):
        self.inner = httpx.AsyncHTTPTransport()
        self.hostile_port = hostile_port
        self.paths = paths

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path in self.paths:
            request.url = request.url.copy_with(port=self.hostile_port)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


@contextlib.asynccontextmanager
async def hostile_view(handler):
    app = web.Application()
    app.router.add_get("/view", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


async def _trickle(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "image/png"})
    await resp.prepare(request)
    while True:  # one byte every half second, for ever
        await resp.write(b"\x89")
        await asyncio.sleep(0.5)


async def _oversize(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "image/png"})  # chunked: no length to check first
    await resp.prepare(request)
    for _ in range(64):
        await resp.write(b"\0" * 65536)
    return resp


async def test_a_trickling_view_cannot_keep_a_run_past_its_deadline(comfy):
    async with hostile_view(_trickle) as port:
        http = httpx.AsyncClient(base_url=comfy.url, transport=_Rerouted(port, {"/view"}))
        runner = LocalRunner(comfy.url, http=http, deadline_grace=0.1)
        try:
            with pytest.raises(JobTimeout) as info:
                await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=1.0)), GUARD)
            assert info.value.state == "downloading"
        finally:
            await runner.aclose()
            await http.aclose()


async def test_an_oversize_view_is_refused_while_streaming(comfy):
    async with hostile_view(_oversize) as port:
        http = httpx.AsyncClient(base_url=comfy.url, transport=_Rerouted(port, {"/view"}))
        runner = LocalRunner(comfy.url, http=http, max_output_bytes=100_000)
        try:
            with pytest.raises(PayloadTooLarge) as info:
                await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=GUARD)), GUARD)
            assert "max_output_bytes" in str(info.value)
        finally:
            await runner.aclose()
            await http.aclose()


# ----------------------------------------------------- 21.9 run() cancelled while its submit is in flight


async def test_run_cancelled_during_submit_leaves_no_orphan(local, comfy):
    comfy.faults.paused = True  # whatever gets queued stays pending: an orphan would be visible
    comfy.faults.hold_prompts = True  # ComfyUI is still validating the POST
    await local.client.start()
    task = asyncio.create_task(local.run(JobRequest(workflow=INVERT)))
    await comfy.wait_until(lambda: comfy.stats.prompts_arrived == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.gather(*list(local.client._background))  # whatever cleanup the client started is done
    comfy.faults.hold_prompts = False  # the prompt the caller never saw is queued now
    await comfy.wait_until(lambda: comfy.jobs and all(j.state == "deleted" for j in comfy.jobs.values()))
    assert comfy.queue_remaining == 0


@pytest.mark.parametrize(
    ("exception_type", "message", "retryable"),
    [
        ("torch.OutOfMemoryError", "Allocation on device", True),
        ("torch.cuda.OutOfMemoryError", "", True),
        ("RuntimeError", "CUDA error: out of memory", True),
        ("RuntimeError", "mat1 and mat2 shapes cannot be multiplied", False),
        ("ValueError", "", False),
    ],
)
def test_worker_failures_are_told_from_workflow_failures_in_one_place(exception_type, message, retryable):
    err = protocol.execution_error(
        {"node_id": "3", "exception_type": exception_type, "exception_message": message},
        job_id="j",
        provider="local",
    )
    assert err.retryable is retryable is protocol.is_worker_failure(exception_type, message)
