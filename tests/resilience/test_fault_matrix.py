"""The fault matrix across real backends on loopback.

Modal: the job API (modal_app.create_app, in-process backend) under uvicorn, over ComfyUI double A.
RunPod: the endpoint double running the real worker handler, over ComfyUI double B.
HTTP faults that are hard to produce for real (5xx, 429, timeouts, resets, malformed JSON) come from
respx, routed for one API path while everything else passes through to the real servers.

For every fault the job ends in a result (retry or failover) or in the right typed error before its
deadline; no remote job is left queued or running (orphans); the outcome is delivered once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
import respx

from gpubridge.errors import AuthError, JobFailed, WorkflowInvalid
from gpubridge.models import EventType, JobRequest, Workflow
from gpubridge.providers.modal import ModalRunner
from gpubridge.providers.runpod import RunPodRunner
from gpubridge.resilience import FailoverRunner, JobOutcome, ResilienceConfig
from gpubridge.testing import ComfyDouble, CrashFault, DropFault, ErrorFault, RunPodEndpointDouble

from ..conftest import EXAMPLES
from ..modal.conftest import TOKEN, serve_api
from ..runpod.conftest import API_KEY, load_worker_module

INVERT = Workflow.load(EXAMPLES / "model_free_invert.json")
DEADLINE = 60.0


class World:
    def __init__(self, comfy_a, comfy_b, modal_url, modal_backend, endpoint):
        self.comfy_a, self.comfy_b = comfy_a, comfy_b
        self.modal_url, self.modal_backend, self.endpoint = modal_url, modal_backend, endpoint
        self.outcomes: list[JobOutcome] = []
        self.runners: list[FailoverRunner] = []

    def failover(self, order=("modal", "runpod"), *, modal_token: str = TOKEN, **cfg: Any) -> FailoverRunner:
        made = {
            "modal": ModalRunner(self.modal_url, token=modal_token, long_poll=2.0),
            "runpod": RunPodRunner(self.endpoint.endpoint_id, api_key=API_KEY, base_url=self.endpoint.base_url,
                                   poll_initial=0.01, poll_max=0.1, retry_initial=0.01, health_resample=0),
        }
        config = ResilienceConfig(probe_interval_s=None, backoff_initial_s=0.01, **cfg)
        runner = FailoverRunner([made[n] for n in order], config, on_outcome=self.outcomes.append)
        self.runners.append(runner)
        return runner

    async def assert_no_orphans(self) -> None:
        for comfy in (self.comfy_a, self.comfy_b):
            if not comfy.crashed:
                await comfy.wait_for_idle()
                assert comfy.queue_remaining == 0
        await self.endpoint.wait_for(lambda d: d.in_queue == 0 and d.in_progress == 0)
        # The Modal API's jobs are tasks on uvicorn's loop (another thread): watch them finish.
        tasks = [job.task for job in list(self.modal_backend.jobs.values())]
        for _ in range(1000):
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        assert all(t.done() for t in tasks)


@pytest.fixture
async def world(tmp_path):
    worker = load_worker_module()
    async with ComfyDouble(root=tmp_path / "a") as comfy_a, ComfyDouble(root=tmp_path / "b") as comfy_b:
        worker.configure(comfy_url=comfy_b.url, reconnect_timeout=0.5, progress_interval=0.0)
        try:
            async with RunPodEndpointDouble(worker.handler, api_key=API_KEY) as endpoint:
                # uvicorn runs in a thread; enter and leave it off this loop, which serves the doubles.
                api = serve_api(comfy_a.url, client_options={"reconnect_timeout": 0.5})
                modal_url, backend = await asyncio.to_thread(api.__enter__)
                try:
                    w = World(comfy_a, comfy_b, modal_url, backend, endpoint)
                    yield w
                    for r in w.runners:
                        await r.aclose()
                finally:
                    await asyncio.to_thread(api.__exit__, None, None, None)
        finally:
            await worker.aclose()


def routed(world: World, method: str, path: str, **side: Any) -> respx.MockRouter:
    """respx: fault one Modal API route, pass everything else through to the real servers."""
    router = respx.mock(assert_all_called=False)
    port = int(world.modal_url.rsplit(":", 1)[1])
    router.route(method=method, host="127.0.0.1", port=port, path__regex=path).mock(**side)
    router.route().pass_through()
    return router


async def run_one(runner: FailoverRunner, **kw):
    events: list = []
    result = await asyncio.wait_for(runner.run(JobRequest(workflow=INVERT, timeout=DEADLINE, **kw),
                                               on_event=events.append), DEADLINE)
    return result, events


# ---------------------------------------------------------------------------------------------- HTTP faults


@pytest.mark.parametrize(
    "name, side",
    [
        ("5xx", {"return_value": httpx.Response(503, text="upstream unavailable")}),
        ("429", {"return_value": httpx.Response(429, headers={"Retry-After": "0"})}),
        ("timeout", {"side_effect": httpx.ConnectTimeout("connect timed out")}),
        ("connection reset", {"side_effect": httpx.ConnectError("[Errno 104] Connection reset by peer")}),
        ("malformed JSON", {"return_value": httpx.Response(202, content=b"{not json")}),
    ],
)
async def test_modal_submit_faults_fail_over_to_runpod(world, name, side):
    runner = world.failover()
    with routed(world, "POST", r"^/v1/jobs$", **side):
        result, events = await run_one(runner)
    assert result.provider == "runpod", name
    assert [a.provider for a in result.attempts] == ["modal", "runpod"]
    assert any(e.type is EventType.FAILOVER for e in events)
    assert len(world.outcomes) == 1
    await world.assert_no_orphans()


async def test_malformed_status_mid_job_cancels_the_modal_job_before_failing_over(world):
    runner = world.failover()
    world.comfy_a.faults.hold = {"ImageInvert"}  # keep the Modal job running while its status is garbage
    with routed(world, "GET", r"^/v1/jobs/.+", return_value=httpx.Response(200, content=b"<html>oops")):
        task = asyncio.create_task(run_one(runner))
        result, _ = await task
    world.comfy_a.faults.hold = set()
    assert result.provider == "runpod"
    assert result.attempts[0].outcome == "failed" and result.attempts[0].error["type"] == "ProtocolError"
    await world.assert_no_orphans()  # the Modal job was cancelled: ComfyUI A interrupted it


# ------------------------------------------------------------------------------------------- backend faults


async def test_stuck_in_queue_on_runpod_is_rerouted_to_modal(world):
    world.endpoint.workers = 0  # the seeds' failure: jobs sit IN_QUEUE for ever
    runner = world.failover(order=("runpod", "modal"), queue_timeout=0.3)
    result, events = await run_one(runner)
    assert result.provider == "modal" and result.attempts[0].outcome == "stuck"
    stuck_id = result.attempts[0].job_id
    assert world.endpoint.status_of(stuck_id) == "CANCELLED"
    world.endpoint.workers = 1
    await world.assert_no_orphans()


async def test_runpod_worker_crash_mid_run_fails_over(world):
    world.endpoint.crash_next = 1
    runner = world.failover(order=("runpod", "modal"))
    result, _ = await run_one(runner)
    assert result.provider == "modal"
    assert result.attempts[0].error["type"] == "JobFailed" and result.attempts[0].error["retryable"]
    await world.assert_no_orphans()


async def test_runpod_throttling_is_retried_in_place(world):
    world.endpoint.throttle = 2
    world.endpoint.throttle_retry_after = 0.01
    runner = world.failover(order=("runpod", "modal"))
    result, _ = await run_one(runner)
    assert result.provider == "runpod" and len(result.attempts) == 1  # the provider's own backoff absorbed it
    await world.assert_no_orphans()


async def test_comfyui_crash_behind_modal_fails_over(world):
    world.comfy_a.faults.crash = CrashFault(class_type="ImageInvert")
    runner = world.failover()
    result, _ = await run_one(runner)
    assert result.provider == "runpod" and result.attempts[0].outcome == "failed"
    await world.assert_no_orphans()


async def test_comfyui_dead_before_submit_is_a_retryable_refusal(world):
    await world.comfy_a.crash()
    runner = world.failover()
    result, _ = await run_one(runner)
    assert result.provider == "runpod"
    assert result.attempts[0].error["type"] == "ProviderUnavailable"
    await world.assert_no_orphans()


async def test_websocket_drop_is_absorbed_where_it_happens(world):
    world.comfy_a.faults.drop_ws = DropFault(after="execution_start")
    runner = world.failover()
    result, _ = await run_one(runner)
    assert result.provider == "modal" and len(result.attempts) == 1
    await world.assert_no_orphans()


async def test_execution_error_is_the_callers_not_failed_over(world):
    world.comfy_a.faults.error = ErrorFault(class_type="ImageInvert")
    runner = world.failover()
    with pytest.raises(JobFailed) as info:
        await run_one(runner)
    assert info.value.node_type == "ImageInvert" and not world.endpoint.job_ids
    await world.assert_no_orphans()


async def test_invalid_workflow_fails_before_any_backend_runs_it(world):
    runner = world.failover()
    with pytest.raises(WorkflowInvalid) as info:
        await runner.run(JobRequest(workflow=INVERT.with_values({"Canvas.width": 0}), timeout=DEADLINE))
    assert info.value.errors[0].input_name == "width"
    assert world.comfy_a.stats.prompts_received == 0 and not world.endpoint.job_ids


async def test_bad_auth_is_not_failed_over(world):
    runner = world.failover(modal_token="wrong-token")
    with pytest.raises(AuthError):
        await run_one(runner)
    assert not world.endpoint.job_ids and len(world.outcomes) == 1


async def test_every_job_delivered_once_under_mixed_faults(world):
    """A burst with intermittent faults on both sides: every job ends once, nothing is left running."""
    world.endpoint.crash_rate = 0.3
    world.endpoint.seed = 7
    world.comfy_a.faults.error = None
    runner = world.failover(order=("runpod", "modal"), max_attempts=3)
    results = await asyncio.gather(
        *(runner.run(JobRequest(workflow=INVERT.with_values({"Canvas.color": i}), timeout=DEADLINE))
          for i in range(12)),
        return_exceptions=True,
    )
    assert all(not isinstance(r, BaseException) for r in results), [r for r in results if isinstance(r, BaseException)]
    assert len(world.outcomes) == 12 and len({o.job_id for o in world.outcomes}) == 12
    assert {r.provider for r in results} <= {"runpod", "modal"}
    await world.assert_no_orphans()
    assert not json.dumps([o.model_dump(mode="json") for o in world.outcomes]).count(API_KEY)


async def test_an_ambiguous_runpod_submit_fails_over_without_resending(world):
    """RunPod took the job but the answer was a 502: the job is not sent to RunPod again (it may run there);
    it counts as an unconfirmed submit and goes to the next provider."""
    runner = world.failover(order=("runpod", "modal"))
    world.endpoint.lose_run_answers, world.endpoint.http_error_status = 1, 502
    result, events = await run_one(runner)
    assert result.provider == "modal"
    assert world.endpoint.counters["run"] == 1 and world.endpoint.counters["lost_run_answers"] == 1
    assert runner.counters["unconfirmed_submits"] == 1
    first = result.attempts[0]
    assert first.provider == "runpod" and first.error["job_may_be_running"] is True
    assert any(e.type is EventType.FAILOVER for e in events)
    await world.assert_no_orphans()  # the job RunPod took ran to its end there; nothing is left queued
