"""ShadowRunner: the caller sees only the control; the shadow path never reaches it."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest
from scipy.stats import binom

from gpubridge.errors import JobCancelled, JobFailed, JobTimeout, WorkflowInvalid
from gpubridge.models import EventType
from gpubridge.shadow.compare import Outcome
from gpubridge.shadow.runner import ShadowRunner
from gpubridge.shadow.store import MemorySink

from .helpers import ImageRunner, png, request


class BrokenSink:
    def __init__(self) -> None:
        self.closed = False

    async def write(self, record) -> None:
        raise OSError("disk full")

    async def aclose(self) -> None:
        self.closed = True


def shadow(control, candidate, **kw) -> ShadowRunner:
    kw.setdefault("noise_warmup", 0)
    kw.setdefault("noise_rate", 0.0)
    kw.setdefault("sink", MemorySink())
    return ShadowRunner(control, candidate, kw.pop("rate", 1.0), rng=random.Random(0), **kw)


async def control_outcome(runner, control: ImageRunner, script: str):
    """Run one job through ``runner`` with the control scripted to ``script``; return result or error."""
    handle = await runner.submit(request())
    if script == "ok":
        control.succeed(handle.job_id)
    else:
        control.fail(handle.job_id, JobFailed("node 3 exploded", node_id="3", job_id=handle.job_id))
    try:
        return await runner.wait(handle)
    except JobFailed as exc:
        return exc


@pytest.mark.parametrize("script", ["ok", "fail"])
async def test_control_outcome_identical_with_and_without_shadow(script: str):
    plain_ctl = ImageRunner("ctl")
    plain = await control_outcome(plain_ctl, plain_ctl, script)

    ctl, cand = ImageRunner("ctl"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand)
    shadowed = await control_outcome(runner, ctl, script)
    await runner.drain()

    job_id = next(iter(ctl.jobs))
    if script == "ok":
        assert shadowed is ctl.results[job_id]  # the very object the control returned
        assert shadowed.model_dump() == plain.model_dump()
    else:
        assert shadowed is ctl.jobs[job_id].error  # the very exception object the control raised
        assert type(shadowed) is type(plain) and str(shadowed) == str(plain)
    assert runner.metrics.started == 1 and len(cand.jobs) == 1  # it was shadowed
    assert runner.sink.records[0].outcome is (Outcome.BOTH_OK if script == "ok" else Outcome.CONTROL_FAILED)


async def test_control_submit_error_is_the_same_object():
    error = WorkflowInvalid("bad graph", node_errors={})
    ctl, cand = ImageRunner("ctl", submit_error=error), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, noise_warmup=5)
    with pytest.raises(WorkflowInvalid) as info:
        await runner.run(request())
    assert info.value is error
    await runner.drain()
    rec = runner.sink.records[0]
    assert rec.outcome is Outcome.CONTROL_FAILED and rec.control.error_type == "WorkflowInvalid"
    assert runner.metrics.noise_started == 0  # the control refused it: no second run


async def test_caller_does_not_wait_for_the_candidate():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand")  # candidate never finishes
    runner = shadow(ctl, cand, timeout=30)
    result = await runner.run(request())
    assert result.provider == "ctl"
    await cand.submitted.wait()
    assert runner.inflight == 1 and not cand.jobs["cand-1"].done.done()
    cand.succeed("cand-1")
    await runner.drain()
    assert runner.inflight == 0 and runner.metrics.recorded == 1


@pytest.mark.parametrize("where", ["submit", "wait"])
async def test_candidate_crash_never_reaches_the_caller(where: str, caplog):
    ctl = ImageRunner("ctl", auto="succeed")
    if where == "submit":
        cand = ImageRunner("cand", submit_error=RuntimeError("candidate crashed"))  # type: ignore[arg-type]
    else:
        cand = ImageRunner("cand")

        async def crash(job, *, timeout=None):
            raise ZeroDivisionError("candidate bug")

        cand.wait = crash  # type: ignore[method-assign]
    runner = shadow(ctl, cand)
    result = await runner.run(request())
    await runner.drain()
    assert result is ctl.results["ctl-1"]
    rec = runner.sink.records[0]
    assert rec.outcome is Outcome.CANDIDATE_FAILED
    assert rec.candidate.error_type == ("RuntimeError" if where == "submit" else "ZeroDivisionError")
    assert runner.metrics.candidate_failures == 1


async def test_candidate_timeout_cancels_its_job_and_never_reaches_the_caller():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand")  # candidate hangs
    runner = shadow(ctl, cand, timeout=0.05)
    result = await runner.run(request())
    assert result.provider == "ctl"
    await runner.drain()
    assert runner.metrics.candidate_timeouts == 1
    assert cand.cancelled == ["cand-1"]  # no orphan on the candidate
    rec = runner.sink.records[0]
    assert rec.outcome is Outcome.CANDIDATE_FAILED and rec.candidate.error_type == "JobTimeout"


async def test_candidate_hanging_in_submit_is_cancelled_once_accepted():
    ctl = ImageRunner("ctl", auto="succeed")
    cand = ImageRunner("cand")
    gate = asyncio.Event()
    real_submit = cand.submit

    async def slow_submit(req):
        await gate.wait()
        return await real_submit(req)

    cand.submit = slow_submit  # type: ignore[method-assign]
    runner = shadow(ctl, cand, timeout=0.05)
    timed_out = asyncio.Event()
    real_timed_out = runner._timed_out

    def spy(*args):
        timed_out.set()
        return real_timed_out(*args)

    runner._timed_out = spy  # type: ignore[method-assign]
    await runner.run(request())
    await timed_out.wait()
    assert cand.jobs == {}  # not accepted yet when its deadline passed
    gate.set()
    await runner.drain()
    assert cand.cancelled == ["cand-1"]


async def test_comparator_exception_never_reaches_the_caller(caplog):
    def broken(*args, **kwargs):
        raise ValueError("comparator bug")

    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, comparator=broken)
    with caplog.at_level(logging.ERROR, logger="gpubridge.shadow"):
        result = await runner.run(request())
        await runner.drain()
    assert result is ctl.results["ctl-1"]
    assert runner.metrics.comparator_errors == 1 and runner.sink.records == []
    assert any("comparator" in r.getMessage() and r.name == "gpubridge.shadow" for r in caplog.records)


async def test_sink_exception_never_reaches_the_caller(caplog):
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    sink = BrokenSink()
    runner = shadow(ctl, cand, sink=sink)
    with caplog.at_level(logging.ERROR, logger="gpubridge.shadow"):
        assert (await runner.run(request())).provider == "ctl"
        await runner.drain()
        await runner.aclose()
    assert runner.metrics.sink_errors == 1 and sink.closed
    assert any("sink" in r.getMessage() for r in caplog.records)


async def test_excess_shadows_are_dropped_and_counted():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand")  # candidates hang
    runner = shadow(ctl, cand, max_inflight=2, timeout=30)
    for _ in range(5):
        await runner.run(request())
    assert (runner.metrics.sampled, runner.metrics.started, runner.metrics.dropped) == (5, 2, 3)
    assert runner.inflight == 2
    while len(cand.jobs) < 2:
        await asyncio.sleep(0)  # let the shadow tasks submit
    for jid in list(cand.jobs):
        cand.succeed(jid)
    await runner.drain()
    assert runner.inflight == 0 and runner.metrics.recorded == 2 and runner.metrics.candidate_timeouts == 0


async def test_sampling_rate_through_the_runner_within_binomial_bounds():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    runner = ShadowRunner(ctl, cand, 0.1, rng=random.Random(42), noise_rate=0.0, noise_warmup=0,
                          max_inflight=10_000, comparator=lambda *a, **k: None)
    n = 3000
    for _ in range(n):
        h = await runner.submit(request())
        await runner.wait(h)
    await runner.drain()
    lo, hi = int(binom.ppf(1e-6 / 2, n, 0.1)), int(binom.isf(1e-6 / 2, n, 0.1))
    assert lo <= runner.metrics.started <= hi
    assert runner.metrics.started == len(cand.jobs) and runner.metrics.dropped == 0


async def test_rate_zero_never_touches_the_candidate():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, rate=0.0)
    for _ in range(20):
        await runner.run(request())
    await runner.drain()
    assert cand.jobs == {} and runner.metrics.seen == 20 and runner.metrics.sampled == 0


async def test_cancel_cancels_the_control_and_its_shadow():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand")
    runner = shadow(ctl, cand, timeout=30)
    handle = await runner.submit(request())
    await cand.submitted.wait()
    status = await runner.cancel(handle)
    assert status.job_id == handle.job_id and ctl.cancelled == [handle.job_id]
    await runner.drain()
    assert cand.cancelled == ["cand-1"] and runner.metrics.cancelled == 1
    with pytest.raises(JobCancelled):
        await runner.wait(handle)


async def test_wait_timeout_is_not_an_outcome():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand, timeout=30)
    handle = await runner.submit(request())
    with pytest.raises(JobTimeout) as info:
        await runner.wait(handle, timeout=0.01)
    assert info.value.cancelled is False
    ctl.succeed(handle.job_id)
    assert (await runner.wait(handle)) is ctl.results[handle.job_id]
    await runner.drain()
    assert runner.sink.records[0].outcome is Outcome.BOTH_OK


async def test_events_are_the_controls():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand", auto="succeed")
    runner = shadow(ctl, cand)
    seen = []
    handle = await runner.submit(request())
    ctl.start(handle.job_id)
    ctl.succeed(handle.job_id)
    async for ev in runner.events(handle):
        seen.append((ev.type, ev.provider))
    assert seen == [(EventType.QUEUED, "ctl"), (EventType.STARTED, "ctl"), (EventType.SUCCEEDED, "ctl")]
    await runner.wait(handle)
    await runner.aclose()


async def test_noise_floor_pairs_run_the_control_twice():
    ctl = ImageRunner("ctl", auto="succeed", image=png("gradient"))
    cand = ImageRunner("cand", auto="succeed", image=png("checker"))
    runner = ShadowRunner(ctl, cand, 1.0, sink=MemorySink(), noise_warmup=2, noise_rate=0.0,
                          rng=random.Random(0))
    for _ in range(3):
        await runner.run(request(idempotency_key="k"))
    await runner.drain()
    kinds = sorted(r.kind for r in runner.sink.records)
    assert kinds == ["candidate"] * 3 + ["noise"] * 2
    assert len(ctl.jobs) == 5  # 3 caller jobs + 2 second runs
    noise = [r for r in runner.sink.records if r.kind == "noise"]
    assert all(r.phash_distance == 0 for r in noise)  # control against itself
    cand_recs = [r for r in runner.sink.records if r.kind == "candidate"]
    assert all(r.phash_distance and r.phash_distance > 10 for r in cand_recs)
    keys = {j.request.idempotency_key for j in ctl.jobs.values()}
    assert keys == {"k", "k:shadow-noise"}  # a dedup layer cannot hand back the caller's job
    assert {j.request.idempotency_key for j in cand.jobs.values()} == {"k:shadow-candidate"}
    assert runner.metrics.noise_recorded == 2


async def test_unobserved_control_is_counted_unpaired():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand", auto="succeed")  # the control never ends
    runner = shadow(ctl, cand, timeout=0.05)
    await runner.submit(request())  # the caller never waits through this runner
    await runner.drain()
    assert runner.metrics.unpaired == 1 and runner.sink.records == [] and runner.inflight == 0


async def test_aclose_cancels_running_shadows_and_closes_everything():
    ctl, cand = ImageRunner("ctl", auto="succeed"), ImageRunner("cand")  # candidate hangs
    sink = MemorySink()
    runner = shadow(ctl, cand, timeout=30, drain_timeout=0.05, sink=sink)
    await runner.run(request())
    await cand.submitted.wait()
    await runner.aclose()
    assert cand.cancelled == ["cand-1"] and ctl.closed and cand.closed
    assert runner.inflight == 0 and runner.metrics.cancelled == 1
    h = await runner.submit(request())  # closing: no more shadows
    assert runner.metrics.started == 1 and h.provider == "ctl"


async def test_health_is_the_controls_with_shadow_counters():
    ctl, cand = ImageRunner("ctl"), ImageRunner("cand")
    runner = shadow(ctl, cand)
    report = await runner.health()
    assert report.provider == "ctl" and report.details["shadow"]["candidate"] == "cand"
    assert runner.name == "ctl"
