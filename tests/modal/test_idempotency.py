"""A submit whose answer is lost is sent again with the same Idempotency-Key: one job, not two."""

from __future__ import annotations

import httpx

from gpubridge.models import JobRequest, Workflow
from gpubridge.providers.modal import ModalRunner

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
