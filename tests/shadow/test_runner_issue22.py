"""ShadowRunner regressions of issue 22: the request snapshot, the comparison executor, unwaited jobs."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpubridge.models import EventType, JobRequest, JobState, Workflow
from gpubridge.shadow.compare import compare
from gpubridge.shadow.runner import ShadowRunner
from gpubridge.shadow.store import MemorySink

from .helpers import WORKFLOW, ImageRunner


def shadow(control, candidate, **kw) -> ShadowRunner:
    kw.setdefault("noise_warmup", 0)
    kw.setdefault("noise_rate", 0.0)
    kw.setdefault("sink", MemorySink())
    return ShadowRunner(control, candidate, kw.pop("rate", 1.0), rng=random.Random(0), **kw)


async def test_candidate_and_noise_run_the_request_as_submitted():
    """Defect 4: a caller that reuses one workflow and sets the next seed before awaiting sent seeds
    [1..7, 7] to the candidate for control seeds [0..7]."""
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, noise_warmup=8)
    wf = Workflow(WORKFLOW)
    handles = []
    for seed in range(8):
        wf["3"]["inputs"]["seed"] = seed
        req = JobRequest(workflow=wf, tags={"workflow": "t2i"})
        handles.append(await runner.submit(req))
    wf["3"]["inputs"]["seed"] = 99
    for h in handles:
        await runner.wait(h)
    assert await runner.drain(timeout=5)

    def seeds(runner_, role):
        return sorted(j.request.workflow["3"]["inputs"]["seed"] for j in runner_.jobs.values()
                      if j.request.tags.get("shadow") == role)

    assert seeds(cand, "candidate") == list(range(8))
    assert seeds(ctl, "noise") == list(range(8))
    assert runner.metrics.recorded == 8 and runner.metrics.noise_recorded == 8


async def test_comparisons_run_on_their_own_bounded_executor():
    """Defect 8: comparisons saturated the loop's default thread pool, which getaddrinfo needs."""
    loop = asyncio.get_running_loop()
    default = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(default)
    release = threading.Event()
    started = asyncio.Event()
    threads: list[str] = []

    def slow_compare(*args, **kwargs):
        threads.append(threading.current_thread().name)
        loop.call_soon_threadsafe(started.set)
        release.wait(10)
        return compare(*args, **kwargs)

    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, comparator=slow_compare)
    try:
        for _ in range(2):
            await runner.run(JobRequest(workflow=WORKFLOW))
        await asyncio.wait_for(started.wait(), 5)
        # the loop's default executor (DNS lookups of new connections) is free while comparisons run
        assert await asyncio.wait_for(loop.run_in_executor(None, lambda: "free"), 2) == "free"
        assert await asyncio.wait_for(loop.getaddrinfo("127.0.0.1", 80), 2)
    finally:
        release.set()
        await runner.drain(timeout=5)
        await runner.aclose()
        default.shutdown(wait=False)
    assert threads and all(t.startswith("gpubridge-shadow-compare") for t in threads)
    assert runner.metrics.recorded == 2


@pytest.mark.parametrize("follow", ["status", "events"])
async def test_jobs_followed_without_wait_release_their_slot_and_are_recorded(follow: str):
    """Rate 1.0, cap 4, 40 jobs followed with status()/events(): 8 started and 0 recorded before the fix."""
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, max_inflight=4, timeout=30)
    for _ in range(40):
        handle = await runner.submit(JobRequest(workflow=WORKFLOW))
        ctl.start(handle.job_id)
        ctl.succeed(handle.job_id)
        if follow == "status":  # the caller never calls wait()
            assert (await runner.status(handle)).state is JobState.SUCCEEDED
        else:
            seen = [ev.type async for ev in runner.events(handle)]
            assert seen[-1] is EventType.SUCCEEDED
        assert await runner.drain(timeout=2), "the shadow still holds its slot"
    assert runner.metrics.sampled == 40 and runner.metrics.started == 40 and runner.metrics.dropped == 0
    assert runner.metrics.recorded == 40 and runner.inflight == 0
