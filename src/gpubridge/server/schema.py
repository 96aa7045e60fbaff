"""The job API's wire schema: one module, shared by the server and its backends.

Requests are :class:`gpubridge.models.JobRequest` JSON (bytes as base64; ``timeout`` is the job's deadline
in seconds from submission). Every job response is a :class:`JobEnvelope`::

    {"job_id": "fc-01J...", "version": 3, "deadline": 1767225600.0,
     "status": {JobStatus}, "result": {JobResult} | null, "error": {GpuBridgeError.to_dict()} | null}

``version`` grows with every change of state or progress: ``GET /v1/jobs/{id}?wait=S&after=V`` answers as
soon as the version passes V (or the job ends, or S passes). Failed requests answer with an HTTP error
code and ``{"error": {"type": <error class name>, "message", "retryable", ...}}`` (:class:`ErrorBody`).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpubridge.errors import (
    AuthError,
    ConfigError,
    Conflict,
    GpuBridgeError,
    InputUnavailable,
    InvalidRequest,
    JobError,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    WorkflowError,
)
from gpubridge.models import JobResult, JobState, JobStatus, Progress

__all__ = [
    "HEALTH_KEY",
    "ErrorBody",
    "ErrorDetail",
    "JobEnvelope",
    "JobRecord",
    "error_dict",
    "error_headers",
    "http_status",
    "record_key",
]

HEALTH_KEY = "health"


def record_key(job_id: str) -> str:
    return f"job:{job_id}"


def idempotency_key(key: str, scope: str = "") -> str:
    """Where the job created for an ``Idempotency-Key`` request header is remembered: per ``scope`` (a
    hash of the caller's token, never the token), the key itself hashed so any header fits the store."""
    return f"idem:{_digest(scope)[:32]}:{_digest(key)}"


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def fingerprint(body: Any) -> str:
    """A hash of a request body in canonical JSON (sorted keys), to tell a retry from a different request."""
    return _digest(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True))


class JobRecord(BaseModel):
    """What the backend knows about a job while it lives: state, progress, timestamps, error.

    It is stored per job (a modal.Dict entry, or memory) and written by whoever moves the job: the API
    (queued, cancelled, timed out in the queue) and the GPU worker (running, progress, terminal).
    """

    job_id: str
    state: JobState = JobState.QUEUED
    version: int = 0
    submitted_at: float = Field(default_factory=time.time)
    deadline: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress | None = None
    message: str | None = None
    error: dict[str, Any] | None = None
    gpu: str | None = None
    request_id: str | None = None
    prompt_id: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)

    def bump(self, **changes: Any) -> JobRecord:
        """A copy with ``changes`` applied and the version increased."""
        return self.model_copy(update={**changes, "version": self.version + 1})

    def status(self, provider: str) -> JobStatus:
        return JobStatus(
            job_id=self.job_id,
            provider=provider,
            state=self.state,
            progress=self.progress if self.state is JobState.RUNNING else None,
            message=self.message,
            error=self.error,
        )

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class WebhookDelivery(BaseModel):
    """A job's webhook delivery, as the job's envelope shows it."""

    url: str
    """The target, shown without credentials or query."""
    state: Literal["waiting", "pending", "delivered", "failed"]
    """``waiting`` for the job to end, ``pending`` (an attempt is due), ``delivered`` or ``failed`` (gave up)."""
    webhook_id: str
    """The ``webhook-id`` header of every attempt of this delivery: receivers dedupe on it."""
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None
    next_attempt_at: float | None = None
    events: list[str] = Field(default_factory=list)


class JobEnvelope(BaseModel):
    """A job as the API returns it: its status, and its result or error once it ended."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    job_id: str
    version: int = 0
    deadline: float | None = None
    status: JobStatus
    result: JobResult | None = None
    error: dict[str, Any] | None = None
    webhook: WebhookDelivery | None = None
    """The job's webhook delivery, when it asked for one."""

    @classmethod
    def of(cls, record: JobRecord, provider: str, result: JobResult | None = None) -> JobEnvelope:
        return cls(
            job_id=record.job_id,
            version=record.version,
            deadline=record.deadline,
            status=record.status(provider),
            result=result if record.state is JobState.SUCCEEDED else None,
            error=record.error,
        )

    @property
    def terminal(self) -> bool:
        return self.status.state.is_terminal


class Capabilities(BaseModel):
    """What a backend can run: ComfyUI's ``/object_info`` (null when the backend cannot say). Clients run
    :func:`gpubridge.comfy.preflight.preflight` against it to skip a backend that lacks a node or model."""

    object_info: dict[str, Any] | None = None


class TemplateInfo(BaseModel):
    """A workflow template this server runs: submit ``{"template": name, "params": {...}}``. ``schema`` is
    the JSON Schema of ``params``; ``version`` changes whenever its workflow or manifest does."""

    name: str
    version: str
    description: str = ""
    params: list[dict[str, Any]] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    outputs: list[dict[str, Any]] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)


class TemplateList(BaseModel):
    templates: list[TemplateInfo] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    """What went wrong: the gpubridge error type, a message, and whether the same request may succeed
    later; type-specific fields (``retry_after``, ``job_id``, ``node_errors``, ...) ride along."""

    model_config = ConfigDict(extra="allow")

    type: str
    message: str
    retryable: bool


class ErrorBody(BaseModel):
    """The body of every error response: ``{"error": {"type", "message", "retryable", ...}}``."""

    error: ErrorDetail


def http_status(exc: GpuBridgeError) -> int:
    """The HTTP status a request that raised ``exc`` answers with."""
    if isinstance(exc, AuthError):
        return 401
    if isinstance(exc, JobNotFound):
        return 404
    if isinstance(exc, PayloadTooLarge):
        return 413
    if isinstance(exc, Conflict):
        return 409
    if isinstance(exc, (WorkflowError, InvalidRequest)):
        return 422
    if isinstance(exc, RateLimited):
        return 429
    if isinstance(exc, InputUnavailable):
        # The caller's own input URL failed (DNS, its 5xx, a timeout): a failed dependency of the request,
        # not a failure of this server; retryable says whether sending it again may work.
        return 424
    if isinstance(exc, ProviderUnavailable):
        return 503
    if isinstance(exc, JobTimeout):
        return 504
    if isinstance(exc, (ProviderError, JobError)):
        return 502
    if isinstance(exc, ConfigError):
        return 500
    return 500


def error_headers(exc: GpuBridgeError) -> dict[str, str]:
    headers: dict[str, str] = {}
    if isinstance(exc, AuthError):
        headers["WWW-Authenticate"] = 'Bearer realm="gpubridge"'
    if isinstance(exc, RateLimited) and exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after)))
    return headers


def error_dict(exc: GpuBridgeError) -> dict[str, Any]:
    """``exc.to_dict()`` plus the fields a client needs to rebuild the same error."""
    d = exc.to_dict()
    if isinstance(exc, RateLimited):
        d["retry_after"] = exc.retry_after
    if isinstance(exc, JobTimeout):
        d["state"] = exc.state
        d["cancelled"] = exc.cancelled
    if isinstance(exc, PayloadTooLarge):
        d["size"] = exc.size
        d["limit"] = exc.limit
    if isinstance(exc, ProviderError):
        d["status_code"] = exc.status_code
    d["job_may_be_running"] = exc.job_may_be_running
    return d
