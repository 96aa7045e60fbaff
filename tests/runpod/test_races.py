"""Issue 23 (and issue 10 item 5) on the RunPod endpoint double over loopback, RunPod's limits enforced.

Each test reproduces one reported defect: 429 storms that settled a job, unconfirmed cancels answered from
cache, /cancel bursts past RunPod's 100-per-10-s limit, a stuck endpoint that looked healthy, a /runsync
wait outside the deadline, and backend bodies of the wrong shape that killed the poller.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpubridge.errors import JobTimeout, ProtocolError
from gpubridge.models import HealthState, JobRequest, JobState
from gpubridge.providers.runpod import RunPodRunner
from gpubridge.testing.runpod import RunPodEndpointDouble

from .conftest import API_KEY, make_runner

WF = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8}}}
PNG = base64.b64encode(base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")).decode()


class Gate:
    """A RunPod handler that holds each job until released; its output is picked by tags["out"]."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.outputs: dict[str, Any] = {
            "ok": {"images": [{"filename": "out.png", "type": "base64", "data": PNG}]},
            "details-errors-int": {"error": "it broke", "details": {"errors": 5}},
            "width-wide": {"images": [{"filename": "o.png", "type": "base64", "data": PNG, "width": "wide"}]},
            "filename-int": {"images": [{"filename": 5, "type": "base64", "data": PNG}]},
            "big": {"images": [{"filename": "o.png", "type": "base64", "data": PNG * 400}]},
        }

    async def __call__(self, job: dict[str, Any]) -> Any:
        tags = job["input"].get("gpubridge", {}).get("tags", {})
        if tags.get("hold"):
            await self.open.wait()
        return self.outputs[tags.get("out", "ok")]


@pytest.fixture
async def gate() -> Gate:
    return Gate()


@pytest.fixture
async def rp(gate: Gate) -> AsyncIterator[RunPodEndpointDouble]:
    async with RunPodEndpointDouble(gate, api_key=API_KEY, rate_limits=True) as double:
        yield double


def req(out: str = "ok", hold: bool = False, **kw: Any) -> JobRequest:
    tags = {"out": out, **({"hold": "1"} if hold else {})}
    return JobRequest(workflow=WF, tags=tags, **kw)


async def test_a_429_storm_on_status_never_settles_the_job(rp: RunPodEndpointDouble, gate: Gate):
    """Defect 1: six 429s in a row on /status ended the job FAILED; status() and cancel() then answered
    from that cache, and the result was lost while the job completed at RunPod."""
    runner = make_runner(rp, max_attempts=2, retry_max_wait=0.05)
    try:
        handle = await runner.submit(req(hold=True, timeout=30))
        waiter = asyncio.ensure_future(runner.wait(handle))
        await rp.wait_status(handle.job_id, "IN_PROGRESS")
        rp.throttle_routes = {"status"}
        rp.throttle = 6
        drained = asyncio.ensure_future(rp.wait_for(lambda d: d.throttle == 0))
        ended = asyncio.ensure_future(runner._jobs[handle.job_id].done.wait())  # main: the poller gave up
        await asyncio.wait({drained, ended}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        ended.cancel()
        assert (await runner.status(handle)).state is JobState.RUNNING  # asked RunPod, not a cache
        gate.open.set()
        result = await asyncio.wait_for(waiter, 10)
        assert result.images and rp.counters["throttled"] >= 6
        assert rp.completions[handle.request_id] == 1
    finally:
        await runner.aclose()


async def test_an_unconfirmed_cancel_at_the_deadline_is_asked_again(rp: RunPodEndpointDouble):
    """Defect 2: a job still IN_QUEUE at its deadline whose /cancel got 429s was reported
    JobTimeout(cancelled=False), and a later cancel() answered timed_out without sending anything."""
    rp.workers = 0
    runner = make_runner(rp, max_attempts=2, cancel_grace=2.0)
    try:
        rp.throttle_routes = {"cancel"}
        rp.throttle = 2  # every try of the deadline's cancel
        handle = await runner.submit(req(timeout=0.3))
        with pytest.raises(JobTimeout) as info:
            await runner.wait(handle)
        assert info.value.cancelled is False and info.value.job_may_be_running
        job_id = info.value.job_id
        assert rp.status_of(job_id) == "IN_QUEUE"
        sent = rp.counters["cancel"]
        status = await runner.cancel(job_id)
        assert rp.counters["cancel"] == sent + 1
        assert status.state is JobState.CANCELLED and rp.status_of(job_id) == "CANCELLED"
        rp.workers = 1  # nothing is left to run
        await rp.wait_for(lambda d: d.in_queue == 0)
        assert not rp.handler_runs
    finally:
        await runner.aclose()


async def test_cancels_keep_to_runpods_cancel_limit(gate: Gate):
    """Defect 5: /cancel had no rate limiter; a burst of cancels went past RunPod's limit and got 429s.
    (RunPod's 100 per 10 s, scaled to 10 per 0.5 s so the test is fast; run and status as documented.)"""
    limits = {"run": (1000, 10.0), "status": (2000, 10.0), "cancel": (10, 0.5)}
    async with RunPodEndpointDouble(gate, api_key=API_KEY, workers=0, rate_limits=limits) as rp:
        runner = make_runner(rp, rate_limits=limits)
        try:
            handles = [await runner.submit(req()) for _ in range(15)]
            statuses = await asyncio.gather(*(runner.cancel(h) for h in handles))
            assert [s.state for s in statuses] == [JobState.CANCELLED] * 15
            assert rp.counters["rate_limited_cancel"] == 0 and rp.counters["cancel"] == 15
        finally:
            await runner.aclose()


async def test_a_stuck_endpoint_turns_unhealthy(rp: RunPodEndpointDouble):
    """Defect 7: no workers and jobs queued, not moving, looked healthy for ever. (How long counts as
    stuck is configured; 0 here, the clocked decision is tested below.)"""
    rp.workers = 0
    runner = make_runner(rp, stalled_unhealthy_s=0.0)
    try:
        for _ in range(3):
            await runner.submit(req())
        stuck = await runner.health()
        assert stuck.state is HealthState.UNHEALTHY and "stuck" in (stuck.message or "")
        rp.workers = 1
        await rp.wait_for(lambda d: d.in_queue == 0)
        assert (await runner.health()).state is HealthState.HEALTHY
    finally:
        await runner.aclose()


def test_stall_tracker_resets_when_jobs_finish():
    from gpubridge.providers.runpod._health import StallTracker

    now = [0.0]
    t = StallTracker(10.0, clock=lambda: now[0])
    assert t.observe(3, 0, 5) == 0.0
    now[0] = 9.0
    assert t.observe(3, 0, 6) == 0.0  # a job finished: moving
    now[0] = 20.0
    assert t.is_unhealthy(t.observe(3, 0, 6))
    assert t.observe(3, 1, 6) is None  # a ready worker


async def test_the_deadline_covers_the_runsync_wait(rp: RunPodEndpointDouble):
    """Defect 10: with sync_wait, the job's deadline started after /runsync returned, so run(timeout=4)
    raised JobTimeout after 8 s."""
    rp.workers = 0
    runner = make_runner(rp, sync_wait=90)
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(JobTimeout) as info:
            await runner.run(req(timeout=2.0))
        assert rp.counters["runsync"] == 1
        assert runner._jobs[info.value.job_id].deadline <= t0 + 2.0 + 0.05
        assert info.value.cancelled and rp.status_of(info.value.job_id) == "CANCELLED"
    finally:
        await runner.aclose()


@pytest.mark.parametrize("out", ["details-errors-int", "width-wide", "filename-int"])
async def test_bodies_of_the_wrong_shape_are_protocol_errors(rp: RunPodEndpointDouble, out: str):
    """Issue 10 item 5: `{"status":"FAILED","output":{"details":{"errors":5}}}` raised TypeError inside the
    poller and wait() hung; odd types in COMPLETED bodies surfaced as raw TypeError/ValidationError."""
    runner = make_runner(rp)
    try:
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(runner.run(req(out, timeout=30)), 10)
        assert info.value.retryable
    finally:
        await runner.aclose()


async def test_response_bodies_are_capped(rp: RunPodEndpointDouble):
    runner = make_runner(rp, max_body_bytes=4096)
    try:
        with pytest.raises(ProtocolError, match="over 4096 bytes"):
            await asyncio.wait_for(runner.run(req("big", timeout=30)), 10)
    finally:
        await runner.aclose()


def test_token_bucket_never_exceeds_its_window():
    from gpubridge.providers.runpod._ratelimit import TokenBucket

    now = [0.0]
    bucket = TokenBucket(100, 10.0, clock=lambda: now[0])
    sent: list[float] = []
    for _ in range(400):
        delay = bucket.reserve()
        sent.append(now[0] + delay)
    for i, t in enumerate(sent):
        assert sum(1 for u in sent[i:] if u < t + 10.0) <= 100
    assert sent[-1] == pytest.approx((400 - bucket.burst) / bucket.rate)


def test_runners_of_one_endpoint_share_its_limits():
    a = RunPodRunner("ep", api_key="k", base_url="http://127.0.0.1:9/v2")
    b = RunPodRunner("ep", api_key="k", base_url="http://127.0.0.1:9/v2/")
    c = RunPodRunner("other", api_key="k", base_url="http://127.0.0.1:9/v2")
    assert a.limits is b.limits and a.limits is not c.limits
    assert a.limits is not None and a.limits.buckets["cancel"].limit <= 100


async def test_a_job_whose_worker_dies_is_requeued_and_runs_once_more(rp: RunPodEndpointDouble):
    """RunPod puts a job back in the queue when its worker dies: the provider follows it through
    IN_PROGRESS -> IN_QUEUE -> COMPLETED and delivers the one result."""
    rp.lose_worker_next = 1
    runner = make_runner(rp)
    try:
        result = await asyncio.wait_for(runner.run(req(timeout=30)), 10)
        assert result.images
        assert rp.counters["requeued"] == 1 and rp.completions[result.request_id] == 1
        assert rp.snapshot(result.job_id)["retries"] == 1
    finally:
        await runner.aclose()


async def test_the_double_enforces_runpods_limits_per_route(gate: Gate):
    import httpx

    async with RunPodEndpointDouble(gate, api_key=API_KEY, rate_limits={"status": (3, 60.0)}) as rp:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with httpx.AsyncClient(base_url=rp.endpoint_url, headers=headers, trust_env=False) as http:
            job_id = (await http.post("/run", json={"input": {}})).json()["id"]
            codes = [(await http.get(f"/status/{job_id}")).status_code for _ in range(4)]
            assert codes == [200, 200, 200, 429]
            limited = await http.get(f"/status/{job_id}")
            assert float(limited.headers["Retry-After"]) > 0
            assert (await http.post(f"/cancel/{job_id}")).status_code == 200  # another route, its own limit
            assert rp.counters["rate_limited_status"] == 2 and rp.counters["rate_limited_cancel"] == 0


async def test_a_poller_that_dies_ends_its_job_with_an_error(rp: RunPodEndpointDouble, monkeypatch):
    """Issue 10 item 5: whatever kills the poller, wait() ends with an error instead of hanging."""
    rp.workers = 0
    runner = make_runner(rp)

    def broken(*args: Any) -> float:
        raise RuntimeError("a bug in the polling schedule")

    monkeypatch.setattr(runner, "_shape_delay", broken)
    try:
        handle = await runner.submit(req(timeout=30))
        with pytest.raises(ProtocolError) as info:
            await asyncio.wait_for(runner.wait(handle), 10)
        assert info.value.job_may_be_running and "RuntimeError" in str(info.value)
    finally:
        await runner.aclose()
