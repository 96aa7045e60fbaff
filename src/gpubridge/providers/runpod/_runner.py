"""RunPodRunner: one RunPod serverless endpoint as a WorkflowRunner (see the package docstring)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx
from pydantic import SecretStr

from ...config import Settings
from ...errors import (
    ConfigError,
    GpuBridgeError,
    JobCancelled,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderUnavailable,
    ResultExpired,
)
from ...models import (
    STATE_EVENTS,
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
    Timings,
)
from ...runner import JobRef, WorkflowRunner, as_request, job_id_of
from ...storage import ArtifactStore
from ._polling import _Outcome, is_transient, poll_delays, transient_delay
from ._health import StallTracker
from ._ratelimit import EndpointLimits, _RateLimiter, shared_limits
from ._settings import DEFAULT_BASE_URL, RUN_PAYLOAD_LIMIT, RUNPOD_GPU_PRICES, RunPodSettings
from ._shapes import (
    parsing,
    _STATES,
    _artifacts_of,
    _clamp_ms,
    _float,
    _int_map,
    _mb,
    _pick,
    _progress_of,
    _seconds,
    _workflow_key,
    parse_failure,
)
from ._transport import MAX_BODY_BYTES, Transport, _NotFound

log = logging.getLogger("gpubridge.providers.runpod")

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
        stalled_unhealthy_s: float = 120.0,
        rate_limits: bool | Mapping[str, tuple[int, float]] | EndpointLimits = True,
        cancel_grace: float = 5.0,
        worker: str = "worker-comfyui",
        status_sync: bool | None = None,
        status_sync_wait: float = 10.0,
        capabilities_ttl: float = 3600.0,
        capabilities_wait: float = 10.0,
        artifacts: ArtifactStore | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
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
        self.execution_timeout = execution_timeout
        self.ttl_margin = ttl_margin
        self.low_priority = low_priority
        self.webhook = webhook
        self.sync_wait = sync_wait
        self.max_payload_bytes = max_payload_bytes
        self.worker = worker
        self.status_sync = status_sync  # None: not known yet; a 404 on /status-sync makes it False
        self.status_sync_wait = status_sync_wait
        self.capabilities_ttl = capabilities_ttl
        self.artifacts = artifacts  # the store that takes inputs too large for the request body
        self.capabilities_wait = capabilities_wait
        self._capabilities: tuple[float, dict[str, Any] | None] | None = None  # (monotonic time, info)
        self.health_resample = health_resample
        self.retry_initial = retry_initial
        self.retry_max_wait = retry_max_wait
        self.cancel_grace = cancel_grace
        self._health = StallTracker(stalled_unhealthy_s)
        if isinstance(rate_limits, EndpointLimits):
            limits: EndpointLimits | None = rate_limits
        elif rate_limits is True:
            limits = shared_limits(self.base_url, endpoint_id)
        elif rate_limits:
            limits = shared_limits(self.base_url, endpoint_id, rate_limits)
        else:
            limits = None
        self._transport = Transport(
            name=name, endpoint_id=endpoint_id, base_url=self.base_url, api_key=self._api_key,
            request_timeout=request_timeout, max_attempts=max_attempts, retry_initial=retry_initial,
            retry_max_wait=retry_max_wait, retry_budget=retry_budget, transport=transport, limits=limits,
            max_body_bytes=max_body_bytes,
        )
        self.limits = limits
        """RunPod's per-route request limits for this endpoint, shared by every runner of it (None: off)."""
        self._http = self._transport.http
        self._call = self._transport.call
        self.stats = self._transport.stats
        """Requests sent, by route (``run``, ``status``, ``cancel``, ``health``, ...) and ``retries``."""
        self._jobs: collections.OrderedDict[str, _Outcome] = collections.OrderedDict()
        self._max_jobs = 1024
        self._last_health: tuple[float, int, int] | None = None  # (monotonic, inQueue, completed)

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
            stalled_unhealthy_s=cfg.stalled_unhealthy_s,
            rate_limits=cfg.rate_limits,
            cancel_grace=cfg.cancel_grace,
            worker=cfg.worker,
            status_sync=cfg.status_sync,
            status_sync_wait=cfg.status_sync_wait,
            capabilities_ttl=cfg.capabilities_ttl,
            capabilities_wait=cfg.capabilities_wait,
            artifacts=ArtifactStore.from_env(),
        )

    def __repr__(self) -> str:
        return f"<RunPodRunner {self.name!r} {self.endpoint_url}>"

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
        if request.store_prefix:
            payload["gpubridge"]["store_prefix"] = request.store_prefix
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

    async def _inline_url_inputs(self, request: JobRequest) -> JobRequest:
        """For a stock worker-comfyui (which base64-decodes every image): fetch URL inputs here, through
        the guarded fetcher, and send their bytes; the payload limit then applies to them too."""
        if self.worker == "gpubridge" or not request.inputs:
            return request
        urls = {n: InputFile.coerce(f) for n, f in request.inputs.items()}
        urls = {n: f for n, f in urls.items() if f.data is None and f.url}
        if not urls:
            return request
        from ...fetch import UrlFetcher

        fetcher = UrlFetcher.from_settings()
        fetched = {n: await fetcher.fetch(f.url or "", name=n) for n, f in urls.items()}
        inputs = dict(request.inputs)
        for name, got in fetched.items():
            inputs[name] = InputFile(data=got.data, mime_type=got.content_type)
        return request.model_copy(update={"inputs": inputs})

    async def _upload_large_inputs(self, request: JobRequest) -> JobRequest:
        """When the inputs would push the body past RunPod's limit and an artifact store is configured, upload
        the byte inputs to it and pass presigned URLs instead (the gpubridge worker downloads them; the
        store's endpoint is on its fetch allow list). A stock worker-comfyui cannot read URLs: unchanged."""
        if self.artifacts is None or self.worker != "gpubridge" or not request.inputs:
            return request
        files = {name: InputFile.coerce(f) for name, f in request.inputs.items()}
        inline = sum(len(f.data) for f in files.values() if f.data is not None)
        if (inline + 2) // 3 * 4 + len(json.dumps(request.workflow.to_api())) + 4096 <= self.max_payload_bytes:
            return request
        inputs: dict[str, Any] = dict(request.inputs)
        for name, f in files.items():
            if f.data is not None:
                prefix = f"{request.store_prefix.strip('/')}/inputs" if request.store_prefix else "inputs"
                stored = await self.artifacts.put(f.data, name, content_type=f.mime_type, prefix=prefix,
                                                  job_id=request.request_id)
                inputs[name] = InputFile(url=stored.url, mime_type=f.mime_type)
        return request.model_copy(update={"inputs": inputs})

    async def _submit(self, request: JobRequest, *, sync_wait: float | None = None) -> JobHandle:
        request = await self._inline_url_inputs(request)
        request = await self._upload_large_inputs(request)
        content = self.encode_body(request)
        timeout = request.timeout or self.default_timeout
        submitted = time.time()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout  # the deadline covers the whole call, /runsync's wait included
        path, call_timeout = "/run", None
        if sync_wait and timeout >= 2.0:
            # RunPod waits at least 1 s; leave a second of the deadline for the answer and the cancel.
            wait_s = min(sync_wait, timeout - 1.0, 300.0)
            path = f"/runsync?wait={max(1000, int(wait_s * 1000))}"
            call_timeout = max(1.0, wait_s) + self._http.timeout.read  # type: ignore[operator]
        try:
            call = self._call("POST", path, content=content, resend=False, timeout=call_timeout,
                              long_poll=call_timeout is not None)
            data = await (asyncio.wait_for(call, timeout) if call_timeout is not None else call)
        except TimeoutError:
            raise JobTimeout(
                f"RunPod /runsync did not answer within the job's {timeout:g}s deadline; the job may still run "
                "(its policy.ttl ends it at RunPod)", provider=self.name, state="queued", cancelled=False,
            ) from None
        except _NotFound:
            raise ConfigError(
                f"RunPod has no endpoint {self.endpoint_id!r} at {self.base_url} (HTTP 404). Check "
                "GPUBRIDGE_RUNPOD_ENDPOINT_ID.",
                provider=self.name,
            ) from None
        except ProviderUnavailable as exc:
            if getattr(exc, "_not_sent", False):
                raise  # it never reached RunPod (connection refused, 429 after every retry)
            # A 5xx, a timeout or a dropped connection after the request went out: RunPod may have queued the
            # job without telling us its id. Not resent here (that could run it twice); the failover runner
            # moves on, and the job's policy.ttl ends it at RunPod if it was queued.
            err = ProviderUnavailable(f"{exc}; RunPod may have accepted the job (no id came back), so it is not "
                                      "resent to this endpoint", provider=self.name,
                                      status_code=getattr(exc, "status_code", None))
            err.job_may_be_running = True
            raise err from None
        with parsing("a /run answer", provider=self.name):
            job_id = data.get("id") if isinstance(data, Mapping) else None
            if not isinstance(job_id, str) or not job_id:
                raise ProtocolError(f"RunPod /run answered without a job id: {str(data)[:200]}",
                                    provider=self.name)
            first = _STATES.get(str(data.get("status", "IN_QUEUE")))
        out = _Outcome(job_id, ours=True, deadline=deadline, submitted_at=submitted,
                       request_id=request.request_id, tags=request.tags)
        out.workflow_key = _workflow_key(request)
        self._remember(out)
        out.stream.publish(JobEvent(type=EventType.QUEUED, job_id=job_id, provider=self.name))
        if first is not JobState.QUEUED:
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
        """The final status of a job whose end RunPod itself reported (no request needed). An end that
        was not RunPod's word (a deadline whose cancel went unconfirmed) is never answered from cache."""
        if out is None or not out.done.is_set() or not out.final:
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
        assert out.result is not None
        return out.result

    async def cancel(self, job: JobRef) -> JobStatus:
        """Ask RunPod to cancel the job; the answer is RunPod's (CANCELLED, or the terminal state the job
        reached first). A job whose end RunPod already reported is not asked again; one that ended here
        without RunPod's word (its deadline passed and that cancel went unconfirmed) is."""
        job_id = job_id_of(job)
        out = self._jobs.get(job_id)
        settled = self._settled(out)
        if settled is not None:
            return settled
        try:
            body = await self._call("POST", f"/cancel/{job_id}")
        except _NotFound:
            raise self._gone(job_id, out) from None
        with parsing("a /cancel answer", job_id=job_id, provider=self.name):
            raw = str(body.get("status", "")) if isinstance(body, Mapping) else ""
        state = _STATES.get(raw)
        if out is None:
            return self._status_of(job_id, body if isinstance(body, Mapping) else {})
        if not out.done.is_set():
            out.wake.set()  # the poller confirms at once (and fetches the result if it finished first)
            return self._status_of(job_id, body if isinstance(body, Mapping) else {})
        if state is not None and state.is_terminal:
            # Ended here without RunPod's word: RunPod's answer now settles it. A job that finished
            # first has its result (or failure) in /status, not in the /cancel answer.
            try:
                full = await self._call("GET", f"/status/{job_id}")
                self._observe(out, full)
            except GpuBridgeError as exc:
                log.info("RunPod job %s: status after cancel unavailable: %s", job_id, exc)
            if not out.final and state is JobState.CANCELLED:
                self._finish(out, error=JobCancelled(f"RunPod job {job_id} was cancelled", job_id=job_id,
                                                     provider=self.name), state=JobState.CANCELLED, final=True)
            if out.final and out.last_status is not None:
                return out.last_status
        return self._status_of(job_id, body if isinstance(body, Mapping) else {})

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
        await self._transport.aclose()

    # ------------------------------------------------------------------------------------------ polling

    async def _poll(self, out: _Outcome) -> None:
        """Follow one job until RunPod reports it terminal, or its deadline. Transient errors (429, 5xx,
        timeouts, dropped connections) never end it: the poller backs off, honouring Retry-After, and
        asks again. Anything else that goes wrong ends the job with an error, never silence."""
        loop = asyncio.get_running_loop()
        delays = poll_delays(self.poll_initial, self.poll_max, self.poll_backoff)
        failures = 0
        try:
            while True:
                if out.deadline is not None and loop.time() >= out.deadline:
                    await self._on_deadline(out)
                    return
                out.wake.clear()
                await self._status_limiter.acquire()
                synced = self.status_sync is not False
                try:
                    body = await self._before_deadline(out, self._ask_status(out, loop, synced))
                except _NotFound:
                    # A 404 on /status-sync before the endpoint ever answered one (this job's or another's
                    # probe, concurrently) says nothing about the job: ask /status, which tells the two apart.
                    if synced and self.status_sync is not True:
                        log.info("RunPod endpoint %s has no /status-sync; polling /status", self.endpoint_id)
                        self.status_sync = False
                        continue
                    self._finish(out, error=self._gone(out.job_id, out), final=True)
                    return
                except TimeoutError:
                    continue  # the deadline passed mid-request
                except GpuBridgeError as exc:
                    if synced and self.status_sync is not True and not is_transient(exc):
                        # An endpoint that answers /status-sync with anything but a status (405, 400...)
                        # does not have it: poll /status from now on.
                        log.info("RunPod endpoint %s refused /status-sync (%s); polling /status",
                                 self.endpoint_id, exc)
                        self.status_sync = False
                        continue
                    if not is_transient(exc):
                        exc.job_may_be_running = True
                        self._finish(out, error=exc)
                        return
                    failures += 1
                    delay = transient_delay(failures, getattr(exc, "retry_after", None),
                                            max(self.retry_initial, self.poll_max), self.retry_max_wait)
                    log.info("RunPod job %s: %s; asking again in %.2fs", out.job_id, exc, delay)
                    await self._pause(out, delay, loop)
                    continue
                failures = 0
                out.polls += 1
                if synced and self.status_sync is None:
                    self.status_sync = True  # the endpoint answers it
                changed = self._observe(out, body)
                if out.done.is_set():
                    return
                if synced:
                    continue  # the server held the request: ask again at once
                if changed:
                    delays = poll_delays(self.poll_initial, self.poll_max, self.poll_backoff)
                await self._pause(out, self._shape_delay(out, next(delays), loop.time()), loop)
        except asyncio.CancelledError:
            if not out.done.is_set():  # the runner is closing: release anyone still waiting
                err = ProviderUnavailable(f"Stopped following RunPod job {out.job_id}: the runner was closed",
                                          provider=self.name)
                err.job_may_be_running = True
                self._finish(out, error=err)
            raise
        except Exception as exc:  # a poller that dies ends its job with an error, never silence
            log.exception("following RunPod job %s failed", out.job_id)
            err = ProtocolError(f"Following RunPod job {out.job_id} failed: {type(exc).__name__}: {exc}",
                                provider=self.name, retryable=True)
            err.job_may_be_running = True
            self._finish(out, error=err)

    def _ask_status(self, out: _Outcome, loop: asyncio.AbstractEventLoop, synced: bool) -> Any:
        """One status request: ``/status-sync`` long-poll (held by RunPod until the job ends or the wait
        passes, never past the job's deadline) or a plain ``/status``."""
        if not synced:
            return self._call("GET", f"/status/{out.job_id}")
        wait = self.status_sync_wait
        if out.deadline is not None:
            wait = min(wait, max(1.0, out.deadline - loop.time()))
        read = self._http.timeout.read or 30.0  # type: ignore[attr-defined]
        return self._call("GET", f"/status-sync/{out.job_id}?wait={int(wait * 1000)}", timeout=wait + read,
                          long_poll=True)

    async def _pause(self, out: _Outcome, delay: float, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep ``delay`` (never past the deadline); a cancel() wakes it early."""
        if out.deadline is not None:
            delay = min(delay, max(0.0, out.deadline - loop.time()))
        try:
            await asyncio.wait_for(out.wake.wait(), delay)
        except TimeoutError:
            pass

    @staticmethod
    async def _before_deadline(out: _Outcome, call: Any) -> Any:
        """Run one request, abandoned (TimeoutError) when the job's deadline passes first."""
        if out.deadline is None:
            return await call
        left = out.deadline - asyncio.get_running_loop().time()
        return await asyncio.wait_for(call, max(0.0, left))

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
        """Cancel the job at RunPod, within ``cancel_grace``. Only RunPod's CANCELLED (or a terminal state
        it reports) confirms it; otherwise the JobTimeout says the job may still run (and a later cancel()
        asks RunPod again)."""
        state = JobState.RUNNING if out.seen_running else JobState.QUEUED
        cancelled = False
        try:
            body = await asyncio.wait_for(self._call("POST", f"/cancel/{out.job_id}"), self.cancel_grace)
            with parsing("a /cancel answer", job_id=out.job_id, provider=self.name):
                status = str(body.get("status", "")) if isinstance(body, Mapping) else ""
            if status in ("COMPLETED", "FAILED"):
                # It finished as we cancelled: deliver what it produced.
                final = await asyncio.wait_for(self._call("GET", f"/status/{out.job_id}"), self.cancel_grace)
                if isinstance(final, Mapping) and _STATES.get(str(final.get("status"))) in (
                    JobState.SUCCEEDED, JobState.FAILED
                ):
                    self._observe(out, final)
                    return
            cancelled = status in ("CANCELLED", "TIMED_OUT")
        except _NotFound:
            cancelled = True  # RunPod already dropped it (its ttl)
        except (GpuBridgeError, TimeoutError) as exc:
            log.warning("could not cancel RunPod job %s at its deadline: %s", out.job_id, exc or "timed out")
        err = JobTimeout(
            f"RunPod job {out.job_id} passed its deadline while {state.value}"
            + (" and was cancelled" if cancelled else "; cancelling it was not confirmed, it may still run"),
            job_id=out.job_id,
            provider=self.name,
            state=state.value,
            cancelled=cancelled,
        )
        self._finish(out, error=err, state=JobState.TIMED_OUT, final=cancelled)

    def _observe(self, out: _Outcome, body: Any) -> bool:
        """Fold one status body into the outcome; publish events; finish on a terminal state.
        Returns whether the job's state changed (progress alone does not reset the polling schedule, so a
        job that reports progress often is not polled at the fastest rate throughout). A body gpubridge
        cannot read ends the job with a ProtocolError (retryable: the backend's fault)."""
        if out.done.is_set() and out.final:
            return False
        try:
            with parsing("a /status body", job_id=out.job_id, provider=self.name):
                if not isinstance(body, Mapping) or "status" not in body:
                    raise ProtocolError(f"RunPod /status for {out.job_id} has no status: {str(body)[:200]}",
                                        provider=self.name, retryable=True)
                return self._fold(out, body)
        except ProtocolError as exc:
            exc.job_may_be_running = True
            self._finish(out, error=exc)
            return True

    def _fold(self, out: _Outcome, body: Mapping[str, Any]) -> bool:
        raw = str(body.get("status", ""))
        state = _STATES.get(raw)
        if state is None:
            raise ProtocolError(f"RunPod reported an unknown status {raw[:40]!r} for job {out.job_id}",
                                provider=self.name, retryable=True)
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
                out.finished_at = time.time()
                out.result = self._result(out, body)  # parsed now: an unreadable result is an error now
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
            self._finish(out, error=error, state=state, final=True)
            return True
        return changed

    def _finish(self, out: _Outcome, *, error: GpuBridgeError | None = None, state: JobState | None = None,
                final: bool = False) -> None:
        """End the job. ``final``: the end is RunPod's own word (a terminal state, a 404, a confirmed
        cancel); only such an end is answered from cache, and it replaces an earlier end that was not."""
        if state is None:
            state = JobState.FAILED if error is not None else JobState.SUCCEEDED
        if out.done.is_set():
            if out.final or not final:
                return
            out.error, out.state, out.final = error, state, True
            out.last_status = JobStatus(job_id=out.job_id, provider=self.name, state=state,
                                        error=error.to_dict() if error else None,
                                        message=str(error) if error else None)
            return
        out.error = error
        out.final = final
        out.finished_at = out.finished_at or time.time()
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
        with parsing("a status body", job_id=job_id, provider=self.name):
            return self._status_of_unguarded(job_id, body)

    def _status_of_unguarded(self, job_id: str, body: Mapping[str, Any]) -> JobStatus:
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

    async def capabilities(self) -> dict[str, Any] | None:
        """What the endpoint's workers can run (node classes, model files), from a capabilities job on the
        gpubridge worker (``worker = "gpubridge"``), cached ``capabilities_ttl`` seconds. The job is low
        priority with a short ttl: it is answered by a worker that is already up and never starts one. None
        (unknown, which never blocks a provider) for a stock worker-comfyui, or when no worker answered
        within ``capabilities_wait``; an unanswered job is cancelled and asked again after a minute."""
        if self.worker != "gpubridge":
            return None
        now = time.monotonic()
        if self._capabilities is not None:
            at, info = self._capabilities
            if now - at < (self.capabilities_ttl if info is not None else 60.0):
                return info
        wait = self.capabilities_wait
        body = json.dumps({"input": {"gpubridge_capabilities": True},
                           "policy": {"lowPriority": True, "ttl": int((wait + 60) * 1000),
                                      "executionTimeout": 60_000}}).encode()
        info: dict[str, Any] | None = None
        try:
            data = await self._call("POST", f"/runsync?wait={max(1000, int(wait * 1000))}", content=body,
                                    resend=False, timeout=wait + (self._http.timeout.read or 30.0), long_poll=True)
        except GpuBridgeError as exc:
            log.info("RunPod endpoint %s: no capabilities (%s)", self.endpoint_id, exc)
            data = None
        if isinstance(data, Mapping):
            output = data.get("output") if isinstance(data.get("output"), Mapping) else {}
            found = output.get("capabilities")
            if data.get("status") == "COMPLETED" and isinstance(found, Mapping):
                info = dict(found)
            elif isinstance(data.get("id"), str) and data.get("status") in ("IN_QUEUE", "IN_PROGRESS"):
                with contextlib.suppress(GpuBridgeError):  # nobody took it: do not leave it queued
                    await self._call("POST", f"/cancel/{data['id']}")
        self._capabilities = (time.monotonic(), info)
        return info

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
        stalled_for = self._health.observe(in_queue, ready, jobs.get("completed", 0))
        if self._health.is_unhealthy(stalled_for):
            state = HealthState.UNHEALTHY
            message = (
                f"stuck: {in_queue} jobs queued, no ready worker and no job finished for {stalled_for:.0f}s "
                f"(limit {self._health.unhealthy_after:g}s)"
            )
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

