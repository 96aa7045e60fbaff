"""A submit whose answer is lost is sent again with the same Idempotency-Key: one job, not two."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gpubridge.errors import JobNotFound
from gpubridge.models import HealthReport, HealthState, JobRequest, Workflow
from gpubridge.providers.modal import ModalRunner
from gpubridge.server import JobBackend, MemoryStore
from gpubridge.server.schema import JobEnvelope, JobRecord

from .conftest import TOKEN, WORKFLOWS, serve_api

WF = Workflow.load(WORKFLOWS / "model_free_invert.json")


def test_same_key_same_job(threaded_comfy):
    with serve_api(threaded_comfy.url) as (url, backend):
        headers = {"Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k-1"}
        body = JobRequest(workflow=WF).model_dump_json()
        first = httpx.post(f"{url}/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"})
        again = httpx.post(f"{url}/v1/jobs", content=body, headers={**headers, "Content-Type": "application/json"})
        other = httpx.post(f"{url}/v1/jobs", content=body, headers={
            "Authorization": f"Bearer {TOKEN}", "Idempotency-Key": "k-2", "Content-Type": "application/json"})
        assert first.status_code == 202 and again.status_code == 200 and other.status_code == 202
        assert first.json()["job_id"] == again.json()["job_id"] != other.json()["job_id"]
        assert len(backend.jobs) == 2


async def test_lost_submit_answer_is_resent_and_deduplicated(threaded_comfy):
    with serve_api(threaded_comfy.url) as (url, backend):
        real = httpx.AsyncHTTPTransport()
        seen: list[str] = []

        class LosesFirstAnswer(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                response = await real.handle_async_request(request)
                if request.method == "POST" and not seen:
                    seen.append(request.headers["Idempotency-Key"])
                    await response.aread()
                    raise httpx.ReadTimeout("answer lost", request=request)  # the job was created anyway
                if request.method == "POST":
                    seen.append(request.headers["Idempotency-Key"])
                return response

        runner = ModalRunner(url, token=TOKEN, transport=LosesFirstAnswer())
        try:
            result = await runner.run(JobRequest(workflow=WF))
            assert len(result.images) == 2
            assert len(seen) == 2 and seen[0] == seen[1]
            assert len(backend.jobs) == 1  # not two jobs
        finally:
            await runner.aclose()


class _StoreBackend(JobBackend):
    """A backend whose jobs live in the shared store alone (as on several API replicas); counts submits."""

    provider = "test"

    def __init__(self, store: MemoryStore, submitted: list[str]):
        self.store = store
        self.submitted = submitted

    async def submit(self, request: JobRequest) -> JobEnvelope:
        await asyncio.sleep(0)  # let the other replica in between claim and submit
        record = JobRecord(job_id=f"job-{len(self.submitted)}")
        self.submitted.append(record.job_id)
        await self.store.save(record)
        return JobEnvelope.of(record, self.provider)

    async def get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> JobEnvelope:
        record = await self.store.record(job_id)
        if record is None:
            raise JobNotFound(f"No job {job_id}", job_id=job_id)
        return JobEnvelope.of(record, self.provider)

    async def cancel(self, job_id: str) -> JobEnvelope:
        return await self.get(job_id)

    async def health(self, *, deep: bool = False) -> HealthReport:
        return HealthReport(provider=self.provider, state=HealthState.HEALTHY)


async def test_the_same_key_on_two_replicas_at_once_runs_one_job():
    """Two API replicas (two backends on one store) get the same key at once: the key is claimed before
    anything is submitted, so one job is created (not one created and one cancelled) and both answer its
    id."""
    store, submitted = MemoryStore(), []
    replicas = [_StoreBackend(store, submitted) for _ in range(4)]
    request = JobRequest(workflow=WF)
    answers = await asyncio.gather(
        *(r.submit_idempotent(request, "k-race", scope="s", fingerprint="f") for r in replicas)
    )
    assert len(submitted) == 1
    assert {env.job_id for env, _ in answers} == {submitted[0]}
    assert sorted(created for _, created in answers) == [False, False, False, True]


async def test_a_failed_submit_frees_its_key(comfy):
    """A submit that fails (nothing created) releases its claim: the retry with the same key runs."""
    from gpubridge.errors import ProviderUnavailable
    from gpubridge.server import MemoryStore

    from modal_app.backends import InProcessBackend

    backend = InProcessBackend.for_url(comfy.url, store=MemoryStore())
    real_submit = backend.submit
    calls = 0

    async def flaky(request):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ProviderUnavailable("ComfyUI is restarting", provider="modal")
        return await real_submit(request)

    backend.submit = flaky  # type: ignore[method-assign]
    try:
        with pytest.raises(ProviderUnavailable):
            await backend.submit_idempotent(JobRequest(workflow=WF), "k-retry", fingerprint="f")
        env, created = await backend.submit_idempotent(JobRequest(workflow=WF), "k-retry", fingerprint="f")
        assert created and env.job_id in backend.jobs
    finally:
        await backend.aclose()
