"""Provider ``runpod``: a RunPod serverless endpoint running the gpubridge worker (or worker-comfyui).

It speaks RunPod's v2 queue API (``{base_url}/{endpoint_id}/run``, ``/status/{id}``, ``/cancel/{id}``,
``/health``, ``/purge-queue``) with one kept-alive ``httpx.AsyncClient`` and a bearer key, and does what the
``runpod`` SDK does not:

- Adaptive polling: a job is polled fast at first (``poll_initial`` 50 ms), the interval growing by
  ``poll_backoff`` (1.3) per poll up to ``poll_max`` (0.5 s), and reset when the job's state changes
  (queued -> running); progress reports do not reset it. Short jobs are seen done well under the SDK's
  fixed 1 s polling floor. One poller per job feeds ``wait``, ``status`` and ``events``.
- Optionally (``sync_wait``), ``run()`` goes through ``POST /runsync?wait=``: RunPod answers the moment the
  job is done, and polling takes over only if it outlives the wait.
- No error is lost: a FAILED job's ``error`` (a JSON string for worker exceptions), the worker's
  ``output.details`` and worker-comfyui's ``details`` become a :class:`~gpubridge.errors.JobFailed` with
  the node, exception type and traceback. Failures of the *worker* (crash, dead ComfyUI, out of memory)
  are ``retryable``; failures of the workflow are not.
- 429 and 5xx are retried with exponential backoff that honours ``Retry-After``, bounded in attempts and
  time. ``POST /run`` is retried only where the request cannot have been accepted (429, 502/503/504,
  connection refused), so a retry never starts a job twice.
- ``delayTime``/``executionTime`` become :class:`~gpubridge.models.Timings` and an estimated cost.
- The request is checked against RunPod's 10 MB ``/run`` limit before it is sent.
- A 404 for a job this runner submitted means RunPod dropped it (results are kept 30 min after
  completion; a job's TTL is a hard limit): :class:`~gpubridge.errors.ResultExpired`.
- The job's deadline cancels it at RunPod (``POST /cancel``) and raises ``JobTimeout(cancelled=True)``.

The API key is a ``SecretStr``; it is only ever put in the Authorization header.
"""

from __future__ import annotations

import asyncio
import hashlib
import base64
import binascii
import collections
import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay

from ..comfy.protocol import guess_mime
from ..config import ProviderSettings, Settings
from ..errors import (
    AuthError,
    ConfigError,
    GpuBridgeError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    ResultExpired,
    WorkflowFormatError,
    WorkflowInputError,
    WorkflowInvalid,
)
from ..models import (
    STATE_EVENTS,
    Artifact,
    ArtifactKind,
    Cost,
    EventType,
    HealthReport,
    HealthState,
    InputFile,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Progress,
    Timings,
    artifact_kind,
)
from ..plugins import ProviderSpec, hookimpl
from ..runner import EventStream, JobRef, WorkflowRunner, as_request, job_id_of

__all__ = [
    "RunPodRunner",
    "RunPodSettings",
    "RUNPOD_GPU_PRICES",
    "RUN_PAYLOAD_LIMIT",
    "poll_delays",
    "parse_failure",
]

log = logging.getLogger("gpubridge.providers.runpod")

DEFAULT_BASE_URL = "https://api.runpod.ai/v2"
RUN_PAYLOAD_LIMIT = 10 * 1024 * 1024
"""RunPod's documented request limit for ``/run`` (10 MB; ``/runsync`` allows 20 MB)."""

RUNPOD_GPU_PRICES: dict[str, float] = {
    # RunPod serverless "flex" prices in USD per second (runpod.io/pricing, 2025). An estimate: override
    # with GPUBRIDGE_RUNPOD_GPU_PRICE_PER_S or the [pricing] table.
    "AMPERE_16": 0.00016, "A4000": 0.00016, "A4500": 0.00016, "RTX4000": 0.00016,
    "AMPERE_24": 0.00019, "A5000": 0.00019, "L4": 0.00019, "RTX3090": 0.00019,
    "ADA_24": 0.00031, "RTX4090": 0.00031,
    "AMPERE_48": 0.00034, "A6000": 0.00034, "A40": 0.00034,
    "ADA_48_PRO": 0.00053, "L40": 0.00053, "L40S": 0.00053, "RTX6000ADA": 0.00053,
    "AMPERE_80": 0.00076, "A100": 0.00076,
    "ADA_80_PRO": 0.00116, "H100": 0.00116,
    "HOPPER_141": 0.00155, "H200": 0.00155,
}

_STATES = {
    "IN_QUEUE": JobState.QUEUED,
    "IN_PROGRESS": JobState.RUNNING,
    "RUNNING": JobState.RUNNING,  # in RunPod's docs; the API answers IN_PROGRESS
    "COMPLETED": JobState.SUCCEEDED,
    "FAILED": JobState.FAILED,
    "CANCELLED": JobState.CANCELLED,
    "TIMED_OUT": JobState.TIMED_OUT,
}
# Output keys that list files, in worker-comfyui's shape ({"filename", "type": "base64"|"s3_url", "data"}).
_FILE_KEYS = ("images", "videos", "gifs", "audio", "files")


class RunPodSettings(ProviderSettings):
    """Settings of the RunPod provider (environment prefix ``GPUBRIDGE_RUNPOD_``, TOML ``[providers.runpod]``).

    The API key may also come from ``RUNPOD_API_KEY``.
    """

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_RUNPOD_")
    section = "runpod"

    endpoint_id: str | None = None
    """The serverless endpoint's id (``GPUBRIDGE_RUNPOD_ENDPOINT_ID``)."""
    api_key: SecretStr | None = None
    """The RunPod API key (``GPUBRIDGE_RUNPOD_API_KEY``, else ``RUNPOD_API_KEY``)."""
    base_url: str = DEFAULT_BASE_URL
    """The v2 API root; the endpoint's URL is ``{base_url}/{endpoint_id}``."""
    gpu_type: str | None = None
    """GPU pool or type the endpoint runs on (e.g. ADA_24, L40S, H100), for cost estimates."""
    gpu_price_per_s: float | None = Field(default=None, ge=0)
    """USD per second of execution; overrides the price table."""
    poll_initial: float = Field(default=0.05, gt=0)
    """First status poll interval in seconds (and after every change)."""
    poll_max: float = Field(default=0.5, gt=0)
    """Longest interval between two status polls."""
    poll_backoff: float = Field(default=1.3, ge=1.0)
    """Factor the interval grows by while nothing changes."""
    poll_fast: float = Field(default=0.02, gt=0)
    """Interval around a running job's expected end (learned from this workflow's recent executionTime)."""
    status_rate: float = Field(default=100.0, gt=0)
    """Status polls per second at most, over all jobs (RunPod allows 2000 per 10 s per endpoint)."""
    request_timeout: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    """HTTP attempts per call on 429/5xx/connection errors (1 = no retries)."""
    retry_initial: float = Field(default=0.25, ge=0)
    """First backoff in seconds; doubles per attempt (with jitter) unless Retry-After says otherwise."""
    retry_max_wait: float = Field(default=30.0, ge=0)
    """Longest single wait between two attempts, Retry-After included."""
    retry_budget: float = Field(default=120.0, gt=0)
    """Stop retrying one call after this many seconds."""
    execution_timeout: float | None = Field(default=None, gt=0)
    """policy.executionTimeout in seconds; default: the job's own timeout."""
    ttl_margin: float | None = Field(default=300.0, ge=0)
    """policy.ttl = job timeout + this margin, so an abandoned job dies at RunPod too; unset: no ttl."""
    low_priority: bool = False
    """policy.lowPriority: the job does not trigger worker scaling."""
    webhook: str | None = None
    sync_wait: float = Field(default=0.0, ge=0, le=300)
    """``run()`` without an event callback submits through ``POST /runsync?wait=`` and gets the result the
    moment it is ready (RunPod's server-side wait), polling only if the job outlives this many seconds.
    0 (default): always ``/run`` + polling. Trade-off: until /runsync answers the job id is unknown, so a
    caller cancelled during that wait cannot cancel the job (it runs on; RunPod drops its result)."""
    max_payload_bytes: int = Field(default=RUN_PAYLOAD_LIMIT, gt=0)
    health_resample: float = Field(default=2.0, ge=0)
    """When /health shows queued jobs and no ready worker, look again after this many seconds to see
    whether the queue grows (0: only compare with the previous health() call)."""


def poll_delays(initial: float, maximum: float, backoff: float):
    """The polling intervals while nothing changes: initial, initial*backoff, ... capped at maximum."""
    delay = min(initial, maximum)
    while True:
        yield delay
        delay = min(maximum, delay * backoff)


class _Outcome:
    """What the poller learned about one job."""

    __slots__ = ("job_id", "ours", "stream", "done", "body", "error", "state", "seen_running", "deadline",
                 "submitted_at", "finished_at", "task", "wake", "progress", "request_id", "tags", "polls",
                 "last_status", "workflow_key", "expected_done")

    def __init__(self, job_id: str, *, ours: bool, deadline: float | None, submitted_at: float | None,
                 request_id: str | None = None, tags: Mapping[str, str] | None = None):
        self.job_id = job_id
        self.ours = ours
        self.stream = EventStream()
        self.done = asyncio.Event()
        self.body: dict[str, Any] | None = None
        self.error: GpuBridgeError | None = None
        self.state = JobState.QUEUED
        self.seen_running = False
        self.deadline = deadline  # loop time
        self.submitted_at = submitted_at
        self.finished_at: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()
        self.progress: tuple[Any, ...] | None = None
        self.request_id = request_id
        self.tags = dict(tags or {})
        self.polls = 0
        self.last_status: JobStatus | None = None
        self.workflow_key: str | None = None
        self.expected_done: float | None = None  # loop time, once running and the workflow's length is known


class RunPodRunner(WorkflowRunner):
    """Runs jobs on one RunPod serverless endpoint. See the module docstring."""

    def __init__(
        self,
        endpoint_id: str,
        *,
        api_key: str | SecretStr | None = None,
        base_url: str = DEFAULT_BASE_URL,
        name: str = "runpod",
        default_timeout: float = 600.0,
        gpu_type: str | None = None,
        gpu_price_per_s: float | None = None,
        prices: Mapping[str, float] | None = None,
        poll_initial: float = 0.05,
        poll_max: float = 0.5,
        poll_backoff: float = 1.3,
        poll_fast: float = 0.02,
        status_rate: float = 100.0,
        request_timeout: float = 30.0,
        max_attempts: int = 6,
        retry_initial: float = 0.25,
        retry_max_wait: float = 30.0,
        retry_budget: float = 120.0,
        execution_timeout: float | None = None,
        ttl_margin: float | None = 300.0,
        low_priority: bool = False,
        webhook: str | None = None,
        sync_wait: float = 0.0,
        max_payload_bytes: int = RUN_PAYLOAD_LIMIT,
        health_resample: float = 2.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not endpoint_id:
            raise ConfigError(
                "The RunPod provider needs an endpoint id: set GPUBRIDGE_RUNPOD_ENDPOINT_ID (or endpoint_id in "
                "[providers.runpod])."
            )
        self.name = name
        self.endpoint_id = endpoint_id
        self.base_url = base_url.rstrip("/")
        self.endpoint_url = f"{self.base_url}/{endpoint_id}"
        self._api_key = api_key if isinstance(api_key, SecretStr) or api_key is None else SecretStr(api_key)
        self.default_timeout = default_timeout
        self.gpu_type = gpu_type
        table = {**RUNPOD_GPU_PRICES, **{k.upper(): v for k, v in (prices or {}).items()}}
        self.price_per_s = (
            gpu_price_per_s if gpu_price_per_s is not None else table.get((gpu_type or "").upper().replace(" ", ""))
        )
        self.poll_initial = poll_initial
        self.poll_max = max(poll_max, poll_initial)
        self.poll_backoff = poll_backoff
        self.poll_fast = min(poll_fast, self.poll_initial)
        self._status_limiter = _RateLimiter(status_rate)
        self._exec_estimate: dict[str, float] = {}  # workflow key -> EWMA of executionTime (s)
        self.max_attempts = max_attempts
        self.retry_initial = retry_initial
        self.retry_max_wait = retry_max_wait
        self.retry_budget = retry_budget
        self.execution_timeout = execution_timeout
        self.ttl_margin = ttl_margin
        self.low_priority = low_priority
        self.webhook = webhook
        self.sync_wait = sync_wait
        self.max_payload_bytes = max_payload_bytes
        self.health_resample = health_resample
        headers = {"Accept": "application/json", "User-Agent": "gpubridge-runpod"}
        if self._api_key is not None and self._api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        self._http = httpx.AsyncClient(
            base_url=self.endpoint_url,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout)),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=100),
            transport=transport,
            trust_env=False,
        )
        self._jobs: collections.OrderedDict[str, _Outcome] = collections.OrderedDict()
        self._max_jobs = 1024
        self._last_health: tuple[float, int, int] | None = None  # (monotonic, inQueue, completed)
        self.stats: collections.Counter[str] = collections.Counter()
        """Requests sent, by route (``run``, ``status``, ``cancel``, ``health``, ...) and ``retries``."""

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> RunPodRunner:
        name = options.pop("name", "runpod")
        url = options.pop("url", None)
        if url:
            options["base_url"] = url
        cfg = RunPodSettings.from_settings(settings, **options)
        key = cfg.api_key
        if key is None and os.environ.get("RUNPOD_API_KEY"):
            key = SecretStr(os.environ["RUNPOD_API_KEY"])
        if key is None and cfg.base_url.rstrip("/") == DEFAULT_BASE_URL:
            raise ConfigError(
                "The RunPod provider needs an API key: set GPUBRIDGE_RUNPOD_API_KEY or RUNPOD_API_KEY."
            )
        return cls(
            cfg.endpoint_id or "",
            api_key=key,
            base_url=cfg.base_url,
            name=name,
            default_timeout=settings.timeout,
            gpu_type=cfg.gpu_type,
            gpu_price_per_s=cfg.gpu_price_per_s,
            prices=settings.pricing,
            poll_initial=cfg.poll_initial,
            poll_max=cfg.poll_max,
            poll_backoff=cfg.poll_backoff,
            poll_fast=cfg.poll_fast,
            status_rate=cfg.status_rate,
            request_timeout=cfg.request_timeout,
            max_attempts=cfg.max_attempts,
            retry_initial=cfg.retry_initial,
            retry_max_wait=cfg.retry_max_wait,
            retry_budget=cfg.retry_budget,
            execution_timeout=cfg.execution_timeout,
            ttl_margin=cfg.ttl_margin,
            low_priority=cfg.low_priority,
            webhook=cfg.webhook,
            sync_wait=cfg.sync_wait,
            max_payload_bytes=cfg.max_payload_bytes,
            health_resample=cfg.health_resample,
        )

    def __repr__(self) -> str:
        return f"<RunPodRunner {self.name!r} {self.endpoint_url}>"

    # ------------------------------------------------------------------------------------------------ HTTP

    async def _call(self, method: str, path: str, *, content: bytes | None = None, resend: bool = True,
                    timeout: float | None = None) -> Any:
        """One API call with bounded retries. ``resend=False`` (POST /run): retry only when the request
        cannot have been accepted."""
        route = path.split("?", 1)[0].strip("/").split("/", 1)[0]

        def retry_this(exc: BaseException) -> bool:
            if isinstance(exc, RateLimited):
                return True
            if isinstance(exc, ProviderUnavailable) and exc.retryable:
                return resend or bool(getattr(exc, "_not_sent", False))
            return False

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            after = getattr(exc, "retry_after", None)
            if after is not None:
                return min(max(0.0, after), self.retry_max_wait)
            base = self.retry_initial * (2 ** (state.attempt_number - 1))
            return min(self.retry_max_wait, base * (0.5 + _jitter()))

        def before_sleep(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            exc = state.outcome.exception() if state.outcome else None
            log.info("RunPod %s %s: %s; retrying (attempt %d)", method, path, exc, state.attempt_number + 1)

        retrying = AsyncRetrying(
            retry=retry_if_exception(retry_this),
            wait=wait,
            stop=stop_after_attempt(self.max_attempts) | stop_after_delay(self.retry_budget),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                self.stats[route] += 1
                return await self._once(method, path, content, timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, path: str, content: bytes | None, timeout: float | None = None) -> Any:
        where = f"RunPod endpoint {self.endpoint_id} ({self.base_url})"
        headers = {"Content-Type": "application/json"} if content is not None else None
        extra: dict[str, Any] = {}
        if timeout is not None:
            extra["timeout"] = httpx.Timeout(timeout, connect=self._http.timeout.connect)
        try:
            resp = await self._http.request(method, path, content=content, headers=headers, **extra)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            err = ProviderUnavailable(f"Cannot reach {where}: {_short(exc)}", provider=self.name)
            err._not_sent = True  # type: ignore[attr-defined]
            raise err from None
        except httpx.TimeoutException as exc:
            raise ProviderUnavailable(
                f"{where} did not answer {method} {path} in time ({type(exc).__name__})", provider=self.name
            ) from None
        except httpx.TransportError as exc:
            raise ProviderUnavailable(
                f"{where} dropped {method} {path} ({_short(exc)})", provider=self.name
            ) from None
        code = resp.status_code
        if code < 300:
            try:
                return resp.json()
            except ValueError:
                raise ProtocolError(
                    f"{where} sent malformed JSON for {method} {path} (HTTP {code}): {resp.text[:120]!r}",
                    provider=self.name,
                    status_code=code,
                ) from None
        if code in (401, 403):
            hint = "" if "Authorization" in self._http.headers else " No API key is configured."
            raise AuthError(
                f"{where} refused the API key (HTTP {code}) for {method} {path}. Check GPUBRIDGE_RUNPOD_API_KEY "
                f"or RUNPOD_API_KEY.{hint}",
                provider=self.name,
            )
        if code == 404:
            raise _NotFound(f"{where} answered 404 to {method} {path}", provider=self.name, status_code=404)
        if code == 413:
            raise PayloadTooLarge(
                f"{where} refused {method} {path} as too large (HTTP 413)", provider=self.name,
                size=len(content) if content else None,
            )
        if code == 429:
            err = RateLimited(
                f"{where} is rate limiting {method} {path} (HTTP 429)",
                provider=self.name,
                retry_after=_retry_after(resp),
                status_code=429,
            )
            err._not_sent = True  # type: ignore[attr-defined]
            raise err
        if code >= 500:
            err = ProviderUnavailable(
                f"{where} answered {code} to {method} {path}: {resp.text[:200]}", provider=self.name,
                status_code=code,
            )
            err._not_sent = code in (502, 503, 504)  # type: ignore[attr-defined]
            raise err
        raise ProtocolError(
            f"{where} answered {code} to {method} {path}: {resp.text[:200]}",
            provider=self.name,
            status_code=code,
            retryable=False,
        )

    # ------------------------------------------------------------------------------------------ requests

    def build_input(self, request: JobRequest) -> dict[str, Any]:
        """The job ``input`` in worker-comfyui's shape (``workflow`` + base64 ``images``).

        URL inputs are passed as URLs (the gpubridge worker downloads them), which keeps large inputs out
        of the 10 MB request.
        """
        images = []
        for name, raw in request.inputs.items():
            item = InputFile.coerce(raw)  # JobRequest.model_copy(update=...) skips validation
            images.append({"name": name, "image": item.url if item.data is None else item.as_base64()})
        payload: dict[str, Any] = {"workflow": request.workflow.to_api()}
        if images:
            payload["images"] = images
        payload["gpubridge"] = {"request_id": request.request_id}
        if request.tags:
            payload["gpubridge"]["tags"] = dict(request.tags)
        return payload

    def build_body(self, request: JobRequest) -> dict[str, Any]:
        """The whole ``POST /run`` body: input, policy (executionTimeout, ttl, lowPriority), webhook."""
        timeout = request.timeout or self.default_timeout
        policy: dict[str, Any] = {}
        execution = self.execution_timeout or timeout
        policy["executionTimeout"] = _clamp_ms(execution, 5.0, 7 * 86400.0)
        if self.ttl_margin is not None:
            policy["ttl"] = _clamp_ms(timeout + self.ttl_margin, 10.0, 7 * 86400.0)
        if self.low_priority:
            policy["lowPriority"] = True
        body: dict[str, Any] = {"input": self.build_input(request), "policy": policy}
        if self.webhook:
            body["webhook"] = self.webhook
        return body

    def encode_body(self, request: JobRequest) -> bytes:
        """The request body as sent, checked against the size limit (PayloadTooLarge names the size)."""
        data = json.dumps(self.build_body(request), separators=(",", ":")).encode()
        if len(data) > self.max_payload_bytes:
            inputs = sum(len(InputFile.coerce(f)) for f in request.inputs.values())
            raise PayloadTooLarge(
                f"The RunPod /run request is {_mb(len(data))}, over the {_mb(self.max_payload_bytes)} limit "
                f"(input files: {_mb(inputs)} before base64, which adds a third). Pass large inputs as "
                "http(s) URLs, or shrink them.",
                provider=self.name,
                size=len(data),
                limit=self.max_payload_bytes,
            )
        return data

    # ------------------------------------------------------------------------------------------- runner

    async def submit(self, request: JobRequest) -> JobHandle:
        return await self._submit(request)

    async def run(self, request: Any, *, on_event: Any = None, **fields: Any) -> JobResult:
        """Submit and wait. With ``sync_wait`` set and no event callback, through ``/runsync`` (see
        :class:`RunPodSettings`); otherwise the base behaviour (``/run``, then polling)."""
        if not self.sync_wait or on_event is not None:
            return await super().run(request, on_event=on_event, **fields)
        req = as_request(request, **fields)
        handle = await self._submit(req, sync_wait=self.sync_wait)
        try:
            return await self.wait(handle)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.cancel(handle))
            raise
        except JobTimeout as exc:
            if not exc.cancelled:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.cancel(handle))
            raise

    async def _submit(self, request: JobRequest, *, sync_wait: float | None = None) -> JobHandle:
        content = self.encode_body(request)
        timeout = request.timeout or self.default_timeout
        submitted = time.time()
        path, call_timeout = "/run", None
        if sync_wait:
            wait_s = min(sync_wait, timeout, 300.0)
            path = f"/runsync?wait={max(1000, int(wait_s * 1000))}"
            call_timeout = max(1.0, wait_s) + self._http.timeout.read  # type: ignore[operator]
        try:
            data = await self._call("POST", path, content=content, resend=False, timeout=call_timeout)
        except _NotFound:
            raise ConfigError(
                f"RunPod has no endpoint {self.endpoint_id!r} at {self.base_url} (HTTP 404). Check "
                "GPUBRIDGE_RUNPOD_ENDPOINT_ID.",
                provider=self.name,
            ) from None
        job_id = data.get("id") if isinstance(data, Mapping) else None
        if not isinstance(job_id, str) or not job_id:
            raise ProtocolError(f"RunPod /run answered without a job id: {str(data)[:200]}", provider=self.name)
        loop = asyncio.get_running_loop()
        out = _Outcome(job_id, ours=True, deadline=loop.time() + timeout, submitted_at=submitted,
                       request_id=request.request_id, tags=request.tags)
        out.workflow_key = _workflow_key(request)
        self._remember(out)
        out.stream.publish(JobEvent(type=EventType.QUEUED, job_id=job_id, provider=self.name))
        if _STATES.get(str(data.get("status", "IN_QUEUE"))) is not JobState.QUEUED:
            self._observe(out, data)  # /runsync: often already terminal
        return JobHandle(
            job_id=job_id,
            provider=self.name,
            request_id=request.request_id,
            submitted_at=submitted,
            deadline=submitted + timeout,
            extra={"endpoint_id": self.endpoint_id},
        )

    def _remember(self, out: _Outcome) -> None:
        self._jobs[out.job_id] = out
        self._jobs.move_to_end(out.job_id)
        while len(self._jobs) > self._max_jobs:
            oldest_id, oldest = next(iter(self._jobs.items()))
            if not oldest.done.is_set():
                break
            del self._jobs[oldest_id]

    def _outcome(self, job: JobRef) -> _Outcome:
        job_id = job_id_of(job)
        out = self._jobs.get(job_id)
        if out is None:
            deadline = None
            if isinstance(job, JobHandle) and job.deadline is not None:
                deadline = asyncio.get_running_loop().time() + max(0.0, job.deadline - time.time())
            out = _Outcome(job_id, ours=isinstance(job, JobHandle), deadline=deadline,
                           submitted_at=job.submitted_at if isinstance(job, JobHandle) else None,
                           request_id=job.request_id if isinstance(job, JobHandle) else None)
            self._remember(out)
        if out.task is None and not out.done.is_set():
            out.task = asyncio.create_task(self._poll(out), name=f"runpod-poll-{job_id[:12]}")
        return out

    @staticmethod
    def _settled(out: _Outcome | None) -> JobStatus | None:
        """The final status of a job this runner already saw end (no request needed)."""
        if out is None or not out.done.is_set():
            return None
        if isinstance(out.error, JobNotFound):
            raise out.error
        return out.last_status

    async def status(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        out = self._jobs.get(job_id)
        settled = self._settled(out)
        if settled is not None:
            return settled
        try:
            body = await self._call("GET", f"/status/{job_id}")
        except _NotFound:
            raise self._gone(job_id, out) from None
        if out is not None:
            self._observe(out, body)
            if out.last_status is not None:
                return out.last_status
        return self._status_of(job_id, body)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        out = self._outcome(job)
        if not out.done.is_set():
            waiter = asyncio.ensure_future(out.done.wait())
            try:
                finished, _ = await asyncio.wait({waiter}, timeout=timeout)
            finally:
                if not waiter.done():
                    waiter.cancel()
            if not finished:
                raise JobTimeout(
                    f"Stopped waiting for RunPod job {out.job_id} after {timeout:g}s; it is still "
                    f"{out.state.value}",
                    job_id=out.job_id,
                    provider=self.name,
                    state=out.state.value,
                    cancelled=False,
                )
        if out.error is not None:
            raise out.error
        assert out.body is not None
        return self._result(out, out.body)

    async def cancel(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        out = self._jobs.get(job_id)
        settled = self._settled(out)
        if settled is not None:
            return settled
        try:
            body = await self._call("POST", f"/cancel/{job_id}")
        except _NotFound:
            raise self._gone(job_id, out) from None
        status = self._status_of(job_id, body if isinstance(body, Mapping) else {})
        if out is not None:
            out.wake.set()  # the poller confirms at once
        return status

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        return self._outcome(job).stream.subscribe()

    async def purge_queue(self) -> int:
        """Remove every queued (not running) job of the endpoint; returns how many were removed."""
        data = await self._call("POST", "/purge-queue")
        return int(data.get("removed", 0)) if isinstance(data, Mapping) else 0

    async def aclose(self) -> None:
        for out in self._jobs.values():
            if out.task is not None and not out.task.done():
                out.task.cancel()
        tasks = [o.task for o in self._jobs.values() if o.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._http.aclose()

    # ------------------------------------------------------------------------------------------ polling

    async def _poll(self, out: _Outcome) -> None:
        loop = asyncio.get_running_loop()
        delays = poll_delays(self.poll_initial, self.poll_max, self.poll_backoff)
        try:
            while True:
                if out.deadline is not None and loop.time() >= out.deadline:
                    await self._on_deadline(out)
                    return
                out.wake.clear()
                await self._status_limiter.acquire()
                try:
                    body = await self._call("GET", f"/status/{out.job_id}")
                except _NotFound:
                    self._finish(out, error=self._gone(out.job_id, out))
                    return
                except GpuBridgeError as exc:
                    exc.job_may_be_running = True
                    self._finish(out, error=exc)
                    return
                out.polls += 1
                if not isinstance(body, Mapping) or "status" not in body:
                    self._finish(out, error=ProtocolError(
                        f"RunPod /status for {out.job_id} has no status: {str(body)[:200]}", provider=self.name))
                    return
                changed = self._observe(out, body)
                if out.done.is_set():
                    return
                if changed:
                    delays = poll_delays(self.poll_initial, self.poll_max, self.poll_backoff)
                delay = self._shape_delay(out, next(delays), loop.time())
                if out.deadline is not None:
                    delay = min(delay, max(0.0, out.deadline - loop.time()))
                try:
                    await asyncio.wait_for(out.wake.wait(), delay)
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            if not out.done.is_set():  # the runner is closing: release anyone still waiting
                err = ProviderUnavailable(f"Stopped following RunPod job {out.job_id}: the runner was closed",
                                          provider=self.name)
                err.job_may_be_running = True
                out.error = err
                out.stream.close()
                out.done.set()
            raise

    def _shape_delay(self, out: _Outcome, delay: float, now: float) -> float:
        """Adapt the next poll to a running job's expected end: wake at that moment, then poll fast for a
        while, so a job's result is seen within ``poll_fast`` of it being ready rather than within the
        (growing) regular interval. Far from the end, and without an estimate, the regular schedule holds
        (it keeps progress events fresh)."""
        if out.expected_done is None or out.state is not JobState.RUNNING:
            return delay
        late = now - out.expected_done
        if late < -delay:
            return delay
        if late < 0:
            return -late
        estimate = self._exec_estimate.get(out.workflow_key or "", 0.0)
        if late < max(0.5, 0.25 * estimate):
            return min(delay, self.poll_fast)
        return delay

    def _learn(self, out: _Outcome, body: Mapping[str, Any]) -> None:
        """Fold a finished job's executionTime into its workflow's estimate (EWMA)."""
        exec_s = _seconds(body.get("executionTime"))
        if out.workflow_key is None or exec_s is None:
            return
        old = self._exec_estimate.get(out.workflow_key)
        self._exec_estimate[out.workflow_key] = exec_s if old is None else 0.7 * old + 0.3 * exec_s
        if len(self._exec_estimate) > 1024:
            self._exec_estimate.pop(next(iter(self._exec_estimate)))

    def _expect(self, out: _Outcome, body: Mapping[str, Any]) -> None:
        """When a job is seen running, expect it done at start + this workflow's usual execution time."""
        estimate = self._exec_estimate.get(out.workflow_key or "")
        if estimate is None or out.submitted_at is None:
            return
        delay_s = _seconds(body.get("delayTime"))
        started_wall = out.submitted_at + delay_s if delay_s is not None else time.time()
        out.expected_done = asyncio.get_running_loop().time() + (started_wall + estimate - time.time())

    async def _on_deadline(self, out: _Outcome) -> None:
        state = JobState.RUNNING if out.seen_running else JobState.QUEUED
        cancelled = False
        try:
            body = await self._call("POST", f"/cancel/{out.job_id}")
            status = str(body.get("status", "")) if isinstance(body, Mapping) else ""
            if status in ("COMPLETED", "FAILED"):
                # It finished as we cancelled: deliver what it produced.
                final = await self._call("GET", f"/status/{out.job_id}")
                if isinstance(final, Mapping) and _STATES.get(str(final.get("status"))) in (
                    JobState.SUCCEEDED, JobState.FAILED
                ):
                    self._observe(out, final)
                    return
            cancelled = status in ("CANCELLED", "TIMED_OUT", "")
        except _NotFound:
            cancelled = True  # RunPod already dropped it (its ttl)
        except GpuBridgeError as exc:
            log.warning("could not cancel RunPod job %s at its deadline: %s", out.job_id, exc)
        err = JobTimeout(
            f"RunPod job {out.job_id} passed its deadline while {state.value}"
            + (" and was cancelled" if cancelled else "; cancelling it failed, it may still run"),
            job_id=out.job_id,
            provider=self.name,
            state=state.value,
            cancelled=cancelled,
        )
        out.state = JobState.TIMED_OUT
        self._finish(out, error=err, state=JobState.TIMED_OUT)

    def _observe(self, out: _Outcome, body: Mapping[str, Any]) -> bool:
        """Fold one status body into the outcome; publish events; finish on a terminal state.
        Returns whether the job's state changed (progress alone does not reset the polling schedule, so a
        job that reports progress often is not polled at the fastest rate throughout)."""
        raw = str(body.get("status", ""))
        state = _STATES.get(raw)
        if state is None:
            self._finish(out, error=ProtocolError(
                f"RunPod reported an unknown status {raw!r} for job {out.job_id}", provider=self.name))
            return True
        changed = False
        if state is JobState.RUNNING and not out.seen_running:
            out.seen_running = True
            out.state = JobState.RUNNING
            self._expect(out, body)
            out.stream.publish(JobEvent(type=EventType.STARTED, job_id=out.job_id, provider=self.name,
                                        data=_pick(body, ("delayTime", "workerId"))))
            changed = True
        if state is JobState.RUNNING:
            progress = _progress_of(body.get("output"))
            if progress is not None:
                key = (progress.node_id, progress.value, progress.max, progress.nodes_done)
                if key != out.progress:
                    node_changed = out.progress is None or out.progress[0] != progress.node_id
                    out.progress = key
                    if node_changed and progress.node_id:
                        out.stream.publish(JobEvent(
                            type=EventType.EXECUTING, job_id=out.job_id, provider=self.name,
                            node_id=progress.node_id, node_type=progress.node_type))
                    if progress.value is not None:
                        out.stream.publish(JobEvent(
                            type=EventType.PROGRESS, job_id=out.job_id, provider=self.name,
                            node_id=progress.node_id, node_type=progress.node_type,
                            value=progress.value, max=progress.max))
        out.last_status = self._status_of(out.job_id, body)
        if state.is_terminal:
            if not out.seen_running and (state is JobState.SUCCEEDED or body.get("executionTime") is not None):
                # It ran between two looks (or inside a /runsync wait): keep the event order complete.
                out.seen_running = True
                out.stream.publish(JobEvent(type=EventType.STARTED, job_id=out.job_id, provider=self.name,
                                            data=_pick(body, ("delayTime", "workerId"))))
            out.body = dict(body)
            if state is JobState.SUCCEEDED:
                self._learn(out, body)
            error = None
            if state is JobState.FAILED:
                error = parse_failure(body, job_id=out.job_id, provider=self.name)
            elif state is JobState.CANCELLED:
                error = JobCancelled(f"RunPod job {out.job_id} was cancelled", job_id=out.job_id,
                                     provider=self.name)
            elif state is JobState.TIMED_OUT:
                where = JobState.RUNNING if out.seen_running or body.get("executionTime") else JobState.QUEUED
                error = JobTimeout(
                    f"RunPod timed the job {out.job_id} out while {where.value} (its executionTimeout or ttl "
                    "passed)",
                    job_id=out.job_id, provider=self.name, state=where.value, cancelled=True,
                )
            self._finish(out, error=error, state=state)
            return True
        return changed

    def _finish(self, out: _Outcome, *, error: GpuBridgeError | None = None, state: JobState | None = None) -> None:
        if out.done.is_set():
            return
        out.error = error
        out.finished_at = time.time()
        if state is None:
            state = JobState.FAILED if error is not None else JobState.SUCCEEDED
        out.state = state
        if out.last_status is None or out.last_status.state is not state:
            out.last_status = JobStatus(job_id=out.job_id, provider=self.name, state=state,
                                        error=error.to_dict() if error else None,
                                        message=str(error) if error else None)
        out.stream.publish(JobEvent(
            type=STATE_EVENTS[state], job_id=out.job_id, provider=self.name,
            message=str(error) if error else None,
            data={"error": error.to_dict()} if error else _pick(out.body or {}, ("delayTime", "executionTime")),
        ))
        out.done.set()

    def _gone(self, job_id: str, out: _Outcome | None) -> JobNotFound:
        if out is not None and (out.ours or out.polls):
            return ResultExpired(
                f"RunPod no longer has job {job_id} (HTTP 404): its result expired (RunPod keeps /run results "
                "for 30 minutes after completion) or its ttl passed",
                job_id=job_id, provider=self.name,
            )
        return JobNotFound(
            f"RunPod endpoint {self.endpoint_id} does not know job {job_id} (HTTP 404): wrong id, or its "
            "result expired",
            job_id=job_id, provider=self.name,
        )

    def _status_of(self, job_id: str, body: Mapping[str, Any]) -> JobStatus:
        state = _STATES.get(str(body.get("status", "")), JobState.QUEUED)
        error = None
        message = None
        if state is JobState.FAILED:
            exc = parse_failure(body, job_id=job_id, provider=self.name)
            error, message = exc.to_dict(), str(exc)
        progress = _progress_of(body.get("output")) if state is JobState.RUNNING else None
        return JobStatus(job_id=job_id, provider=self.name, state=state, progress=progress, error=error,
                         message=message)

    # ------------------------------------------------------------------------------------------- results

    def _result(self, out: _Outcome, body: Mapping[str, Any]) -> JobResult:
        output = body.get("output")
        artifacts, outputs, warnings, worker_timings = _artifacts_of(output)
        delay_s = _seconds(body.get("delayTime"))
        exec_s = _seconds(body.get("executionTime"))
        finished = out.finished_at or time.time()
        submitted = out.submitted_at
        timings = Timings(
            submitted_at=submitted,
            started_at=submitted + delay_s if submitted is not None and delay_s is not None else None,
            finished_at=finished,
            queued_s=delay_s,
            executing_s=exec_s,
            total_s=round(finished - submitted, 6) if submitted is not None else None,
            upload_s=_float(worker_timings.get("upload_s")),
            download_s=_float(worker_timings.get("download_s")),
        )
        cost = None
        if self.price_per_s is not None and exec_s is not None:
            cost = Cost(usd=round(exec_s * self.price_per_s, 8), gpu=self.gpu_type, seconds=exec_s,
                        rate_usd_per_s=self.price_per_s, basis="estimate")
        if body.get("workerId"):
            outputs.setdefault("_runpod", {})["worker_id"] = body["workerId"]
        return JobResult(
            job_id=out.job_id,
            provider=self.name,
            request_id=out.request_id,
            artifacts=artifacts,
            outputs=outputs,
            timings=timings,
            cost=cost,
            tags=out.tags,
            warnings=warnings,
        )

    # -------------------------------------------------------------------------------------------- health

    async def health(self) -> HealthReport:
        t0 = time.perf_counter()
        try:
            data = await self._call("GET", "/health")
        except _NotFound:
            return HealthReport(provider=self.name, state=HealthState.UNHEALTHY,
                                message=f"RunPod has no endpoint {self.endpoint_id!r} (HTTP 404)")
        except GpuBridgeError as exc:
            return HealthReport(provider=self.name, state=HealthState.UNHEALTHY, message=str(exc))
        latency = round((time.perf_counter() - t0) * 1000, 2)
        if not isinstance(data, Mapping):
            return HealthReport(provider=self.name, state=HealthState.UNHEALTHY,
                                message=f"RunPod /health sent {type(data).__name__}, not an object")
        jobs = _int_map(data.get("jobs"))
        workers = _int_map(data.get("workers"))
        in_queue = jobs.get("inQueue", 0)
        ready = workers.get("idle", 0) + workers.get("running", 0) + workers.get("ready", 0)
        previous = self._last_health
        now = time.monotonic()
        self._last_health = (now, in_queue, jobs.get("completed", 0))
        state, message = HealthState.HEALTHY, None
        if ready == 0 and in_queue > 0:
            earlier = previous[1] if previous is not None and now - previous[0] < 600 else None
            if earlier is None and self.health_resample > 0:
                await asyncio.sleep(self.health_resample)  # a second sample: is the queue growing?
                try:
                    again = await self._call("GET", "/health")
                    jobs2, workers2 = _int_map(again.get("jobs")), _int_map(again.get("workers"))
                    earlier, jobs, workers = in_queue, jobs2, workers2
                    in_queue = jobs.get("inQueue", 0)
                    ready = workers.get("idle", 0) + workers.get("running", 0) + workers.get("ready", 0)
                    self._last_health = (time.monotonic(), in_queue, jobs.get("completed", 0))
                except (GpuBridgeError, AttributeError):
                    pass
            if ready == 0 and in_queue > 0 and earlier is not None and in_queue > earlier:
                state = HealthState.DEGRADED
                message = (
                    f"no ready workers and a growing queue ({earlier} -> {in_queue} jobs in queue): jobs "
                    "will stay IN_QUEUE"
                )
            elif ready == 0 and in_queue > 0:
                message = f"{in_queue} jobs queued and no ready workers (scaling up?)"
        if state is HealthState.HEALTHY and ready == 0 and workers.get("unhealthy", 0) > 0:
            state = HealthState.DEGRADED
            message = f"{workers['unhealthy']} unhealthy workers and none ready"
        return HealthReport(
            provider=self.name,
            state=state,
            message=message,
            latency_ms=latency,
            queue_depth=in_queue,
            running=jobs.get("inProgress", 0),
            workers=workers,
            details={"endpoint_id": self.endpoint_id, "base_url": self.base_url, "jobs": jobs},
        )


@hookimpl
def register_providers(register: Any) -> None:
    register(
        ProviderSpec(
            name="runpod",
            factory=RunPodRunner.from_settings,
            description="A RunPod serverless endpoint running the gpubridge worker or worker-comfyui "
            "(GPUBRIDGE_RUNPOD_ENDPOINT_ID, GPUBRIDGE_RUNPOD_API_KEY)",
            settings=RunPodSettings,
        )
    )


# ---------------------------------------------------------------------------------------------- failures


class _NotFound(ProviderError):
    """A 404 from the API (translated by each caller: expired job, unknown endpoint...)."""

    retryable = False


_WORKER_FAILURE_TYPES = {
    "WorkerCrashed", "WorkerLost", "SystemExit", "KeyboardInterrupt", "MemoryError", "OutOfMemoryError",
    "torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError", "ProviderUnavailable", "ComfyStartError",
}
_WORKER_FAILURE_TEXT = re.compile(
    r"worker (?:exited|crashed|died|was lost|lost)|out of memory|exit code -?\d+|"
    r"comfyui (?:at \S+ )?(?:is not reachable|not reachable|went away|died|is dead)|cannot reach comfyui",
    re.IGNORECASE,
)
_WC_EXEC = re.compile(r"Node Type: (?P<type>[^,]+), Node ID: (?P<id>[^,]+), Message: (?P<msg>.*)", re.DOTALL)


def _clean_type(value: Any) -> str | None:
    if not value:
        return None
    text = str(value)
    m = re.fullmatch(r"<class '([^']+)'>", text.strip())
    text = m.group(1) if m else text.strip()
    for prefix in ("builtins.", "__main__."):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def parse_failure(body: Mapping[str, Any], *, job_id: str | None = None, provider: str | None = None) -> GpuBridgeError:
    """The typed error of a FAILED job: its ``error`` (a JSON string for worker exceptions, else text),
    plus ``output.details`` (gpubridge worker: a dict; worker-comfyui: a list of strings), lose nothing."""
    raw = body.get("error")
    output = body.get("output") if isinstance(body.get("output"), Mapping) else {}
    parsed: Mapping[str, Any] | None = None
    if isinstance(raw, str) and raw.lstrip().startswith("{"):
        try:
            candidate = json.loads(raw)
            parsed = candidate if isinstance(candidate, Mapping) else None
        except ValueError:
            parsed = None
    elif isinstance(raw, Mapping):
        parsed = raw
    details_raw = output.get("details") if output else None
    if details_raw is None and parsed is not None:
        details_raw = parsed.get("details")
    details: dict[str, Any] = dict(details_raw) if isinstance(details_raw, Mapping) else {}
    if isinstance(details_raw, list):
        details["errors"] = list(details_raw)

    text = (parsed.get("error_message") or parsed.get("error")) if parsed is not None else raw
    text = str(text) if text is not None else "RunPod reported the job FAILED without an error"
    exc_type = _clean_type(details.get("exception_type")) or _clean_type(parsed.get("error_type") if parsed else None)
    exc_message = details.get("exception_message") or (parsed.get("error_message") if parsed else None)
    traceback = details.get("traceback") or (parsed.get("error_traceback") if parsed else None) or None
    node_id = details.get("node_id", details.get("node"))
    node_type = details.get("node_type")
    # worker-comfyui: "Workflow execution error: Node Type: X, Node ID: N, Message: M" (in error or details)
    for candidate in [text, *[e for e in details.get("errors", []) if isinstance(e, str)]]:
        m = _WC_EXEC.search(candidate)
        if m and node_id is None:
            node_type = node_type or m.group("type").strip()
            node_id = m.group("id").strip()
            exc_message = exc_message or m.group("msg").strip()
    node_id = str(node_id) if node_id is not None else None
    extra = {k: parsed[k] for k in ("hostname", "worker_id", "runpod_version") if parsed and parsed.get(k)}
    if body.get("workerId"):
        extra["worker_id"] = body["workerId"]
    full_details = {**details, **({"runpod": extra} if extra else {})}
    if output:
        full_details.setdefault("output", {k: v for k, v in output.items() if k != "details"})

    # Errors the workflow or its inputs caused, reported by the gpubridge worker, keep their own type.
    if exc_type == "WorkflowInvalid" or (text.startswith("Workflow validation failed") and exc_type is None):
        return WorkflowInvalid(
            f"RunPod worker rejected the workflow: {text}" if not details.get("node_errors") else None,
            error=details.get("error") if isinstance(details.get("error"), Mapping) else {"message": text},
            node_errors=details.get("node_errors") if isinstance(details.get("node_errors"), Mapping) else {},
            provider=provider,
        )
    if exc_type in ("WorkflowFormatError", "WorkflowInputError"):
        cls = WorkflowFormatError if exc_type == "WorkflowFormatError" else WorkflowInputError
        return cls(f"RunPod worker: {text}", provider=provider)

    # Retryable only when the worker (not the workflow) failed: the worker says so, the error type means
    # the process died or ran out of memory, or (no node to blame) the text says the worker/ComfyUI died.
    short_type = (exc_type or "").rsplit(".", 1)[-1]
    worker_failure = bool(
        details.get("worker_failure")
        or details.get("refresh_worker")
        or exc_type in _WORKER_FAILURE_TYPES
        or short_type in _WORKER_FAILURE_TYPES
        or (node_id is None and (_WORKER_FAILURE_TEXT.search(text)
                                 or _WORKER_FAILURE_TEXT.search(str(exc_message or ""))))
    )
    if node_id:
        where = f"node {node_id}" + (f" ({node_type})" if node_type else "")
        message = f"{where} raised {exc_type or 'an error'}" + (f": {str(exc_message).strip()}" if exc_message else "")
    else:
        message = text if exc_type is None or text.startswith(exc_type) else f"{exc_type}: {text}"
    return JobFailed(
        f"RunPod job {job_id} failed: {message}" if job_id else message,
        job_id=job_id,
        provider=provider,
        node_id=node_id,
        node_type=node_type,
        exception_type=exc_type,
        exception_message=str(exc_message).strip() if exc_message else text,
        traceback=traceback,
        details=full_details,
        retryable=worker_failure,
    )


# ---------------------------------------------------------------------------------------------- helpers


def _progress_of(output: Any) -> Progress | None:
    """Progress from an IN_PROGRESS ``output`` (what the worker sent with progress_update)."""
    if not isinstance(output, Mapping):
        return None
    p = output.get("progress")
    if isinstance(p, Mapping):
        try:
            return Progress(
                node_id=str(p["node_id"]) if p.get("node_id") is not None else None,
                node_type=p.get("node_type"),
                value=_float(p.get("value")),
                max=_float(p.get("max")),
                nodes_done=p.get("nodes_done"),
                nodes_total=p.get("nodes_total"),
            )
        except (ValueError, TypeError):
            return None
    if isinstance(p, (int, float)):
        return Progress(value=float(p), max=100.0)
    if isinstance(output.get("percent"), (int, float)):
        return Progress(value=float(output["percent"]), max=100.0)
    return None


def _artifacts_of(output: Any) -> tuple[list[Artifact], dict[str, Any], list[str], dict[str, Any]]:
    """Artifacts from worker-comfyui's output shape (and its gpubridge extensions)."""
    if not isinstance(output, Mapping):
        return [], ({"output": output} if output is not None else {}), [], {}
    artifacts: list[Artifact] = []
    warnings: list[str] = [str(e) for e in output.get("errors") or []] if isinstance(output.get("errors"), list) else []
    for key in _FILE_KEYS:
        for item in output.get(key) or []:
            if not isinstance(item, Mapping):
                continue
            art = _artifact_of(key, item)
            if art is not None:
                artifacts.append(art)
    message = output.get("message")
    if isinstance(message, str) and message and not artifacts:  # worker-comfyui < 5: one image
        art = _artifact_of("images", {"filename": None, "type": "base64", "data": message})
        if art is not None:
            artifacts.append(art)
    for item in output.get("text") or []:
        if isinstance(item, Mapping):
            artifacts.append(Artifact(node_id=str(item.get("node_id", "")), kind=ArtifactKind.TEXT,
                                      text=str(item.get("text", "")), mime_type="text/plain"))
        elif isinstance(item, str):
            artifacts.append(Artifact(node_id="", kind=ArtifactKind.TEXT, text=item, mime_type="text/plain"))
    meta = output.get("gpubridge") if isinstance(output.get("gpubridge"), Mapping) else {}
    outputs = dict(meta.get("outputs") or {}) if isinstance(meta.get("outputs"), Mapping) else {}
    warnings.extend(str(w) for w in meta.get("warnings") or [])
    timings = output.get("timings") if isinstance(output.get("timings"), Mapping) else {}
    return artifacts, outputs, warnings, dict(timings)


def _artifact_of(key: str, item: Mapping[str, Any]) -> Artifact | None:
    filename = item.get("filename")
    kind_of_data = item.get("type") or "base64"
    data = url = None
    value = item.get("data")
    if not isinstance(value, str):
        return None
    if kind_of_data == "s3_url" or value.startswith(("http://", "https://")):
        url = value
    else:
        if value.startswith("data:"):
            value = value.partition(",")[2]
        try:
            data = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            return None
    mime = item.get("mime_type") or (guess_mime(filename) if filename else None)
    if mime is None and data:
        from ..models import _sniff_mime  # filetype-based sniffing

        mime = _sniff_mime(data)
    if key == "videos":
        kind = ArtifactKind.VIDEO if not mime or not mime.startswith("image/") else ArtifactKind.ANIMATION
    elif key == "gifs":
        kind = artifact_kind(mime, animated=True) if mime else ArtifactKind.ANIMATION
    else:
        kind = artifact_kind(mime)
    return Artifact(
        node_id=str(item.get("node_id", "")),
        kind=kind,
        filename=filename,
        subfolder=str(item.get("subfolder") or ""),
        type=item.get("comfy_type") or "output",
        mime_type=mime,
        data=data,
        url=url,
        width=item.get("width"),
        height=item.get("height"),
        size=len(data) if data is not None else None,
    )


def _pick(body: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: body[k] for k in keys if body.get(k) is not None}


def _int_map(value: Any) -> dict[str, int]:
    if not isinstance(value, Mapping):
        return {}
    out = {}
    for k, v in value.items():
        try:
            out[str(k)] = int(v)
        except (TypeError, ValueError):
            continue
    return out


def _seconds(ms: Any) -> float | None:
    value = _float(ms)
    return round(value / 1000.0, 6) if value is not None else None


def _float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _clamp_ms(seconds: float, low: float, high: float) -> int:
    return int(math.ceil(min(high, max(low, seconds)) * 1000))


def _mb(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _workflow_key(request: JobRequest) -> str:
    """Jobs of one workflow take about as long as each other: key them by the graph's node types (seeds,
    prompts and sizes aside), or by ``tags["workflow"]`` when the caller names it."""
    named = request.tags.get("workflow")
    if named:
        return f"tag:{named}"
    types = sorted(str(n.get("class_type")) for n in request.workflow.to_api().values())
    return "graph:" + hashlib.sha1("|".join(types).encode()).hexdigest()[:16]


class _RateLimiter:
    """At most ``rate`` acquisitions per second, spread evenly (a leaky bucket of one), shared by pollers."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate
        self._next = 0.0

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        slot = max(now, self._next)
        self._next = slot + self.interval
        if slot > now:
            await asyncio.sleep(slot - now)


def _jitter() -> float:
    import random

    return random.random()
