"""RunPod's serverless API (``/v2/{endpoint_id}/...``) in front of any :class:`JobBackend`.

A caller written against RunPod changes its base URL to the gateway's and nothing else: the same
``POST /v2/{id}/run`` with ``{"input": {...worker-comfyui input...}, "webhook", "policy"}``, the same
``GET /v2/{id}/status/{job}`` answering ``{"id", "status": "IN_QUEUE"|..."COMPLETED", "delayTime",
"executionTime", "output"}`` with worker-comfyui's output, ``runsync``, ``cancel``, ``health`` and
``purge-queue``. Behind it the job runs wherever the gateway's runner sends it (failover, shadow, canary).

Differences from RunPod, on purpose: input that cannot run (a missing or UI-format workflow, an invalid node
input, undecodable images) is refused at submit with a 422 in gpubridge's error envelope, before any GPU
time, instead of a job that ends FAILED; ``policy.executionTimeout`` and ``policy.ttl`` both bound the job's
one deadline, which counts from submission. RunPod's ``Authorization`` header is accepted with or without
``Bearer``. ``Idempotency-Key`` works here as on ``/v1/jobs``.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations.
import asyncio
import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Path, Query, Response
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field

from gpubridge.errors import GpuBridgeError, InvalidRequest, JobNotFound, WorkflowFormatError, WorkflowInputError
from gpubridge.models import JobRequest, JobState

from .backend import JobBackend
from .runpod_shapes import RUNPOD_STATES, InputError, failure_of, output_of, parse_input
from .schema import ErrorBody, JobEnvelope, fingerprint

__all__ = ["add_runpod_facade", "RunPodRequest", "RunPodStatus"]

ENDPOINT_TAG = "runpod_endpoint"


class RunPodPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    executionTimeout: int | None = Field(default=None, gt=0, description="Milliseconds the job may run")
    ttl: int | None = Field(default=None, gt=0, description="Milliseconds the job may live (queue included)")
    lowPriority: bool | None = None


class RunPodRequest(BaseModel):
    """RunPod's ``/run`` body; ``input`` is worker-comfyui's (``workflow``, ``images``)."""

    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra={"example": {"input": {"workflow": {
            "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        }}}},
    )
    input: dict[str, Any]
    webhook: str | None = Field(default=None, max_length=2048)
    policy: RunPodPolicy | None = None


class RunPodJob(BaseModel):
    id: str
    status: str


class RunPodStatus(BaseModel):
    """RunPod's job status body. ``output``: worker-comfyui's output once COMPLETED (progress while running);
    ``error``: the failure's text once FAILED."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: str
    delayTime: int | None = None
    executionTime: int | None = None
    output: Any = None
    error: str | None = None


class RunPodHealth(BaseModel):
    model_config = ConfigDict(extra="allow")
    jobs: dict[str, int]
    workers: dict[str, int]


class RunPodPurge(BaseModel):
    removed: int
    status: str


def _ms(start: float | None, end: float | None) -> int | None:
    return None if start is None or end is None else max(0, round((end - start) * 1000))


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "Unreadable JSON", 401: "Missing or invalid API key (AuthError)",
            404: "Unknown endpoint id or job (JobNotFound), or an expired result (ResultExpired)",
            413: "Request body too large (PayloadTooLarge)",
            422: "Input that cannot run: missing or UI-format workflow, invalid node input, bad images",
            424: "An input URL could not be fetched (InputUnavailable)", 429: "Too many jobs (RateLimited)",
            500: "A bug in the gateway (InternalError)", 503: "The backend is unavailable (ProviderUnavailable)"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


def add_runpod_facade(
    app: FastAPI,
    backend: JobBackend,
    *,
    endpoints: Sequence[str],
    check_token: Callable[[str], str],
    accept_webhook: Callable[[str], Awaitable[None]],
    register_webhook: Callable[[str, str], Awaitable[None]],
    max_timeout: float,
    sync_wait: float = 90.0,
    status_wait: float = 0.0,
    templates: Any = None,
) -> Callable[[str], Awaitable[tuple[bytes, bool]]]:
    """Add ``/v2/{endpoint_id}/...`` for each of ``endpoints`` to ``app``; returns the webhook payload loader
    (RunPod's status body) for the dispatcher's ``"runpod"`` format."""
    known = set(endpoints)
    api_key = APIKeyHeader(name="Authorization", auto_error=False,
                           description="The gateway's token, as RunPod's API key (with or without 'Bearer ')")

    async def authorize(raw: Annotated[str | None, Depends(api_key)]) -> str:
        token = (raw or "").strip()
        if token[:7].lower() == "bearer ":
            token = token[7:].strip()
        return check_token(token)

    EndpointId = Annotated[str, Path(description="One of the gateway's RunPod endpoint ids",
                                     json_schema_extra={"enum": sorted(known)})]

    def endpoint(endpoint_id: EndpointId) -> str:
        if endpoint_id not in known:
            raise JobNotFound(f"No endpoint {endpoint_id!r} here; this gateway serves {sorted(known)}",
                              provider=backend.provider)
        return endpoint_id

    deps = [Depends(authorize)]

    def job_request(body: RunPodRequest, endpoint_id: str) -> JobRequest:
        try:
            spec = parse_input(body.input, templates)
        except InputError as exc:
            cls = WorkflowFormatError if exc.exception_type == "WorkflowFormatError" else WorkflowInputError
            detail = f": {'; '.join(exc.errors)}" if exc.errors and exc.exception_type != "ParamInvalid" else ""
            raise cls(f"{exc.message}{detail}", provider=backend.provider) from None
        limits = [s for s in (
            body.policy.executionTimeout / 1000 if body.policy and body.policy.executionTimeout else None,
            body.policy.ttl / 1000 if body.policy and body.policy.ttl else None,
            spec.timeout,
        ) if s is not None]
        timeout = min(limits) if limits else None
        if timeout is not None and timeout > max_timeout:
            raise InvalidRequest(f"policy allows the job {timeout:g} s; this gateway allows at most {max_timeout:g} s",
                                 provider=backend.provider)
        try:
            return JobRequest(workflow=spec.workflow, inputs=spec.images, timeout=timeout,
                              tags={ENDPOINT_TAG: endpoint_id}, template=spec.template,
                              template_version=spec.template_version, params=spec.params or {})
        except ValueError as exc:
            raise InvalidRequest(f"Invalid job: {exc}", provider=backend.provider) from None

    async def status_body(env: JobEnvelope) -> dict[str, Any]:
        state = env.status.state
        body: dict[str, Any] = {"id": env.job_id, "status": RUNPOD_STATES[state]}
        record = await backend.store.record(env.job_id)
        if record is not None:
            started = record.started_at or (record.finished_at if state.is_terminal else None)
            delay = _ms(record.submitted_at, started)
            if delay is not None:
                body["delayTime"] = delay
            if state.is_terminal:
                execution = _ms(record.started_at, record.finished_at)
                if execution is not None:
                    body["executionTime"] = execution
        if state is JobState.SUCCEEDED and env.result is not None:
            body["output"] = output_of(env.result)
        elif state is JobState.RUNNING and env.status.progress is not None:
            body["output"] = {"progress": env.status.progress.model_dump(mode="json", exclude_none=True)}
        elif state.is_terminal and state is not JobState.SUCCEEDED:
            failure = failure_of(env.status.error or env.error or {"type": "JobFailed", "message": state.value})
            body["error"] = failure["error"]
            body["output"] = {"details": failure["details"], "gpubridge_error": failure["gpubridge_error"]}
        return body

    def reply(body: Any, status: int = 200) -> Response:
        return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")

    async def submit(body: RunPodRequest, endpoint_id: str, scope: str, key: str | None) -> JobEnvelope:
        request = job_request(body, endpoint_id)
        if body.webhook is not None:
            await accept_webhook(body.webhook)
        env, _created = await backend.submit_idempotent(request, key, scope=f"runpod:{endpoint_id}:{scope}",
                                                        fingerprint=fingerprint(body.model_dump(mode="json")))
        if body.webhook is not None and _created:
            await register_webhook(env.job_id, body.webhook)
        return env

    IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255,
                                           description="Same key and body: the same job, never a second")]

    @app.post("/v2/{endpoint_id}/run", response_model=RunPodJob, tags=["runpod"], operation_id="runpod_run",
              summary="RunPod: submit a job", responses=_errors(400, 401, 404, 413, 422, 424, 429, 500, 503))
    async def run(body: RunPodRequest, endpoint_id: Annotated[str, Depends(endpoint)],
                  scope: Annotated[str, Depends(authorize)], idempotency_key: IdemKey = None) -> Response:
        env = await submit(body, endpoint_id, scope, idempotency_key)
        return reply({"id": env.job_id, "status": RUNPOD_STATES[env.status.state]})

    @app.post("/v2/{endpoint_id}/runsync", response_model=RunPodStatus, tags=["runpod"],
              operation_id="runpod_runsync", summary="RunPod: submit and wait (bounded)",
              responses=_errors(400, 401, 404, 413, 422, 424, 429, 500, 503))
    async def runsync(
        body: RunPodRequest, endpoint_id: Annotated[str, Depends(endpoint)],
        scope: Annotated[str, Depends(authorize)], idempotency_key: IdemKey = None,
        wait: Annotated[int | None, Query(gt=0, le=300_000, description="Milliseconds to wait")] = None,
    ) -> Response:
        env = await submit(body, endpoint_id, scope, idempotency_key)
        budget = min(sync_wait, wait / 1000) if wait else sync_wait
        if not env.terminal:
            env = await backend.get(env.job_id, wait=budget)
        return reply(await status_body(env))

    async def _own(job_id: str, endpoint_id: str) -> JobEnvelope:
        env = await backend.get(job_id)
        record = await backend.store.record(job_id)
        if record is None or record.tags.get(ENDPOINT_TAG, endpoint_id) != endpoint_id:
            raise JobNotFound(f"No job {job_id} on endpoint {endpoint_id}", job_id=job_id, provider=backend.provider)
        return env

    JobId = Annotated[str, Path(max_length=200)]

    async def status(job_id: JobId, endpoint_id: Annotated[str, Depends(endpoint)]) -> Response:
        env = await _own(job_id, endpoint_id)
        if status_wait > 0 and not env.terminal:
            env = await backend.get(job_id, wait=status_wait)
        return reply(await status_body(env))

    for method in ("GET", "POST"):
        app.add_api_route(
            "/v2/{endpoint_id}/status/{job_id}", status, methods=[method], response_model=RunPodStatus,
            dependencies=deps, tags=["runpod"], operation_id=f"runpod_status_{method.lower()}",
            summary="RunPod: a job's status and output", responses=_errors(401, 404, 500, 503),
        )

    @app.post("/v2/{endpoint_id}/cancel/{job_id}", response_model=RunPodStatus, dependencies=deps,
              tags=["runpod"], operation_id="runpod_cancel", summary="RunPod: cancel a job",
              responses=_errors(401, 404, 500, 503))
    async def cancel(job_id: JobId, endpoint_id: Annotated[str, Depends(endpoint)]) -> Response:
        await _own(job_id, endpoint_id)
        env = await backend.cancel(job_id)
        return reply({"id": env.job_id, "status": RUNPOD_STATES[env.status.state]})

    async def _jobs(endpoint_id: str) -> list[Any]:
        try:
            keys = await backend.store.keys("job:")
        except NotImplementedError:
            return []
        records = await asyncio.gather(*(backend.store.record(k[4:]) for k in keys))
        return [r for r in records if r is not None and r.tags.get(ENDPOINT_TAG) == endpoint_id]

    @app.get("/v2/{endpoint_id}/health", response_model=RunPodHealth, dependencies=deps, tags=["runpod"],
             operation_id="runpod_health", summary="RunPod: job counts and worker state",
             responses=_errors(401, 404, 500))
    async def health(endpoint_id: Annotated[str, Depends(endpoint)]) -> Response:
        counts = {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0}
        for record in await _jobs(endpoint_id):
            key = {JobState.QUEUED: "inQueue", JobState.RUNNING: "inProgress",
                   JobState.SUCCEEDED: "completed"}.get(record.state, "failed")
            counts[key] += 1
        try:
            report = await backend.health()
            ok, detail = report.ok, report.model_dump(mode="json")
        except GpuBridgeError as exc:
            ok, detail = False, {"state": "unhealthy", "message": exc.message}
        workers = {"idle": 0, "initializing": 0, "ready": int(ok), "running": counts["inProgress"],
                   "throttled": 0, "unhealthy": int(not ok)}
        return reply({"jobs": counts, "workers": workers, "gpubridge": detail})

    @app.post("/v2/{endpoint_id}/purge-queue", response_model=RunPodPurge, dependencies=deps, tags=["runpod"],
              operation_id="runpod_purge_queue", summary="RunPod: cancel every job still in the queue",
              responses=_errors(401, 404, 500, 503))
    async def purge(endpoint_id: Annotated[str, Depends(endpoint)]) -> Response:
        queued = [r.job_id for r in await _jobs(endpoint_id) if r.state is JobState.QUEUED]
        removed = 0
        for job_id in queued:
            try:
                env = await backend.cancel(job_id)
            except JobNotFound:
                continue
            removed += env.status.state is JobState.CANCELLED
        return reply({"removed": removed, "status": "completed"})

    async def load(job_id: str) -> tuple[bytes, bool]:
        env = await backend.get(job_id)
        return json.dumps(await status_body(env), separators=(",", ":")).encode(), env.terminal

    return load
