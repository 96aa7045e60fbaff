"""The request gate every provider puts in front of its httpx pool (gpubridge.gate)."""

from __future__ import annotations

import asyncio

import pytest

from gpubridge.errors import ProviderUnavailable
from gpubridge.gate import RequestGate


async def test_at_most_limit_requests_pass_and_the_rest_wait_in_order():
    gate = RequestGate(2, timeout=5)
    release = asyncio.Event()
    inside, peak, order = 0, 0, []

    async def request(i: int) -> None:
        nonlocal inside, peak
        async with gate.slot(provider="p", what="GET /x"):
            inside += 1
            peak = max(peak, inside)
            order.append(i)
            await release.wait()
            inside -= 1

    tasks = [asyncio.create_task(request(i)) for i in range(6)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert peak == 2 and order == [0, 1]
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2 and order == list(range(6))  # FIFO


async def test_a_wait_past_the_timeout_is_a_pool_timeout_and_a_cancelled_waiter_gives_nothing_back():
    gate = RequestGate(1, timeout=0.05)
    held = asyncio.Event()
    done = asyncio.Event()

    async def holder() -> None:
        async with gate.slot(provider="p", what="GET /x"):
            held.set()
            await done.wait()

    task = asyncio.create_task(holder())
    await held.wait()
    with pytest.raises(ProviderUnavailable, match="PoolTimeout"):
        async with gate.slot(provider="p", what="GET /y"):
            pass
    waiter = asyncio.create_task(_enter(gate))
    await asyncio.sleep(0)
    waiter.cancel()
    done.set()
    await task
    async with gate.slot(provider="p", what="GET /z"):  # the slot came back
        assert gate._slots._value == 0
    assert gate._slots._value == 1


async def _enter(gate: RequestGate) -> None:
    async with gate.slot(provider="p", what="GET /w"):
        pass


async def test_every_remote_provider_gates_its_short_calls():
    from gpubridge.providers.comfy_api import ComfyApiRunner
    from gpubridge.providers.modal import ModalRunner
    from gpubridge.providers.runpod import RunPodRunner

    runners = [ModalRunner("http://127.0.0.1:9", token="t"), RunPodRunner("ep", api_key="k",
               base_url="http://127.0.0.1:9/v2"), ComfyApiRunner("http://127.0.0.1:9")]
    try:
        gates = [r._gate for r in runners[::2]] + [runners[1]._transport.gate]
        assert all(isinstance(g, RequestGate) and g.limit >= 1 for g in gates)
    finally:
        for r in runners:
            await r.aclose()


@pytest.mark.parametrize("provider", ["modal", "runpod", "comfy"])
async def test_concurrent_short_calls_never_exceed_the_gate(provider):
    import httpx
    import respx

    from gpubridge.providers.comfy_api import ComfyApiRunner
    from gpubridge.providers.modal import ModalRunner
    from gpubridge.providers.runpod import RunPodRunner

    inside, peak = 0, 0
    release, full = asyncio.Event(), asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        if inside >= 3:
            full.set()
        await release.wait()
        inside -= 1
        body = {"job_id": "j1", "provider": "modal", "state": "running", "id": "j1", "status": "running"}
        return httpx.Response(200, json=body)

    with respx.mock(assert_all_called=False) as mock:
        mock.route(host="api.test").mock(side_effect=slow)
        if provider == "modal":
            runner, gate = ModalRunner("http://api.test", token="t"), None
            call = lambda: runner.cancel("j1")  # noqa: E731 - one short POST each
        elif provider == "runpod":
            runner = RunPodRunner("ep", api_key="k", base_url="http://api.test/v2", rate_limits=False)
            call = lambda: runner._transport.call("GET", "/health")  # noqa: E731
        else:
            runner = ComfyApiRunner("http://api.test")
            call = lambda: runner._call("GET", "/health")  # noqa: E731
        gate = runner._transport.gate if provider == "runpod" else runner._gate
        gate.limit = 3
        tasks = [asyncio.create_task(call()) for _ in range(12)]
        await asyncio.wait_for(full.wait(), 5)  # three reached the server...
        for _ in range(50):
            await asyncio.sleep(0)  # ...and the other nine had every chance to follow them
        assert peak == 3
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.aclose()
    assert peak == 3
