"""The ``comfy`` provider's runner: Comfy Org's API v2 (Comfy Cloud, Comfy serverless deployments, a
self-hosted ComfyUI behind ``comfy-api-proxy``).

- ``POST /api/v2/jobs`` with an ``Idempotency-Key`` (the request's key, else its request id) and the request
  id as ``metadata``. A submit whose answer was lost (timeout, dropped socket, 5xx) is sent again with the
  same key; keys are single-use, so ``idempotency_key_reuse`` then means the first one arrived, and the job
  is found by its ``metadata`` in ``GET /jobs``. Nothing runs twice.
- Input files are assets: ``HEAD /assets/by-hash/blake3:...`` first (identical inputs upload once), else
  ``POST /assets``; the workflow references them as ``core/ASSET`` by hash.
- The job's SSE ``events`` stream carries progress and its end; the job resource (``GET /jobs/{id}``) is
  the truth: every end the stream announces is confirmed there, and when the stream drops, the runner polls.
- Outputs are fetched from their URLs, each with its kind and MIME type. The deadline cancels the job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping
from datetime import datetime
from typing import Any

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt

from ...config import ProviderSettings, Settings
from ...errors import (
    ConfigError,
    GpuBridgeError,
    InvalidRequest,
    JobCancelled,
    JobNotFound,
    JobTimeout,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
)
from ...models import (
    Artifact,
    ArtifactKind,
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
from ...gate import RequestGate
from ...runner import EventStream, JobRef, WorkflowRunner, job_id_of
from ._errors import error_of, failure_of

__all__ = ["ComfyApiRunner", "ComfyApiSettings"]

log = logging.getLogger("gpubridge.providers.comfy")

_STATES = {"queued": JobState.QUEUED, "running": JobState.RUNNING, "canceling": JobState.RUNNING,
           "succeeded": JobState.SUCCEEDED, "failed": JobState.FAILED, "canceled": JobState.CANCELLED,
           "cancelled": JobState.CANCELLED}
SHORT_CALLS = 64
LONG_POLLS = 2000
_KINDS = {"image": ArtifactKind.IMAGE, "video": ArtifactKind.VIDEO, "audio": ArtifactKind.AUDIO,
          "text": ArtifactKind.TEXT}


class ComfyApiSettings(ProviderSettings):
    """Settings of the ``comfy`` provider (environment ``GPUBRIDGE_COMFY_API_*``, TOML ``[providers.comfy]``)."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_COMFY_API_")
    section = "comfy"

    url: str | None = None
    """The API's base URL (``https://{deployment}.run.comfy.app``, Comfy Cloud, or a comfy-api-proxy)."""
    api_key: SecretStr | None = None
    """Bearer key; optional for a self-hosted proxy without a token."""
    request_timeout: float = Field(default=30.0, gt=0)
    events: bool = True
    """Follow jobs on their SSE events stream (polling when it drops); false: poll only."""
    poll_initial: float = Field(default=0.05, gt=0)
    poll_max: float = Field(default=1.0, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    """Attempts per call on 429/5xx/connection errors."""
    retry_max_wait: float = Field(default=30.0, ge=0)
    gpu_price_per_s: float | None = Field(default=None, ge=0)
    """USD per second of execution, for cost estimates when the API reports none."""


class _Job:
    __slots__ = ("job_id", "request_id", "deadline", "submitted_at", "stream", "last", "result", "error", "task",
                 "started_at", "cancel_requested", "stream_task")

    def __init__(self, job_id: str, request_id: str | None, deadline: float | None, submitted_at: float):
        self.job_id = job_id
        self.request_id = request_id
        self.deadline = deadline  # epoch seconds
        self.submitted_at = submitted_at
        self.started_at: float | None = None
        self.stream = EventStream()
        self.last: dict[str, Any] | None = None
        self.result: JobResult | None = None
        self.error: GpuBridgeError | None = None
        self.task: asyncio.Task[None] | None = None
        self.cancel_requested = False
        self.stream_task: asyncio.Future[None] | None = None


class ComfyApiRunner(WorkflowRunner):
    def __init__(self, url: str, *, api_key: SecretStr | str | None = None, name: str = "comfy",
                 default_timeout: float = 600.0, request_timeout: float = 30.0, events: bool = True,
                 poll_initial: float = 0.05, poll_max: float = 1.0, max_attempts: int = 5,
                 retry_max_wait: float = 30.0, gpu_price_per_s: float | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        if not url:
            raise ConfigError("The comfy provider needs the API's URL: set GPUBRIDGE_COMFY_API_URL")
        self.name = name
        self.url = url.rstrip("/")
        key = api_key.get_secret_value() if isinstance(api_key, SecretStr) else api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.AsyncClient(base_url=f"{self.url}/api/v2", headers=headers, transport=transport,
                                       timeout=httpx.Timeout(request_timeout, connect=min(10.0, request_timeout)),
                                       # SHORT_CALLS gated short requests plus one events stream per job
                                       limits=httpx.Limits(max_connections=SHORT_CALLS + LONG_POLLS,
                                                           max_keepalive_connections=SHORT_CALLS))
        self._gate = RequestGate(SHORT_CALLS, request_timeout)
        self.default_timeout = default_timeout
        self.use_events = events
        self.poll_initial, self.poll_max = poll_initial, max(poll_max, poll_initial)
        self.max_attempts, self.retry_max_wait = max_attempts, retry_max_wait
        self.price_per_s = gpu_price_per_s
        self._jobs: dict[str, _Job] = {}
        self.stats: collections.Counter[str] = collections.Counter()  # uploads, asset_hits, resubmits, ...

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> ComfyApiRunner:
        name = options.pop("name", "comfy")
        url = options.pop("url", None)
        if url:
            options["url"] = url
        cfg = ComfyApiSettings.from_settings(settings, **options)
        return cls(cfg.url or "", api_key=cfg.api_key, name=name, default_timeout=settings.timeout,
                   request_timeout=cfg.request_timeout, events=cfg.events, poll_initial=cfg.poll_initial,
                   poll_max=cfg.poll_max, max_attempts=cfg.max_attempts, retry_max_wait=cfg.retry_max_wait,
                   gpu_price_per_s=cfg.gpu_price_per_s)

    def __repr__(self) -> str:
        return f"<ComfyApiRunner {self.name!r} {self.url}>"

    # ------------------------------------------------------------------------------------------- HTTP

    async def _call(self, method: str, path: str, *, what: str | None = None, retry: bool = True,
                    **kw: Any) -> httpx.Response:
        """One request; 429 and transient failures (5xx, connection errors; not ``deployment_stopped``) are
        retried when ``retry``, with backoff that honours Retry-After (tenacity, as the RunPod transport).
        Other errors are raised typed."""
        what = what or f"{method} {path.split('?')[0]}"

        def transient(exc: BaseException) -> bool:
            return retry and (isinstance(exc, RateLimited) or (
                isinstance(exc, ProviderUnavailable) and not getattr(exc, "terminal", False)))

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            base = min(self.retry_max_wait, 0.1 * 2 ** (state.attempt_number - 1) * (0.5 + random.random()))
            return max(base, getattr(exc, "retry_after", None) or 0.0)

        async for attempt in AsyncRetrying(retry=retry_if_exception(transient), wait=wait, reraise=True,
                                           stop=stop_after_attempt(self.max_attempts)):
            with attempt:
                return await self._once(method, path, what, **kw)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            async with self._gate.slot(provider=self.name, what=f"Comfy API {what}"):
                resp = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            err: GpuBridgeError = ProviderUnavailable(f"Comfy API {what}: {type(exc).__name__}: {exc}",
                                                      provider=self.name)
            err.sent = not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout))  # type: ignore[attr-defined]
            raise err from None
        if resp.status_code >= 400:
            err = error_of(resp, provider=self.name, what=what)
            err.sent = True  # type: ignore[attr-defined]
            raise err
        return resp

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        resp = await self._call(method, path, **kw)
        try:
            return resp.json()
        except ValueError:
            raise ProtocolError(f"Comfy API {method} {path}: not JSON: {resp.text[:120]!r}",
                                provider=self.name) from None

    # ----------------------------------------------------------------------------------------- submit

    async def _asset_ref(self, name: str, item: InputFile) -> dict[str, Any]:
        """The ``core/ASSET`` reference of one input, uploading it unless the API already has its bytes."""
        import blake3

        data = item.data
        if data is None:
            from ...fetch import UrlFetcher

            data = (await UrlFetcher.from_settings().fetch(str(item.url), name=name)).data
        digest = "blake3:" + blake3.blake3(data).hexdigest()
        head = await self._http.head(f"/assets/by-hash/{digest}")
        if head.status_code == 200:
            self.stats["asset_hits"] += 1
        else:
            self.stats["uploads"] += 1
            files = {"file": (name, data, item.mime_type or "application/octet-stream")}
            await self._call("POST", "/assets", what="POST /assets", files=files,
                             data={"file_path": f"input/{name}", "expected_hash": digest})
        return {"__type": "core/ASSET", "info": {"hash": digest}}

    async def _workflow(self, request: JobRequest) -> dict[str, Any]:
        """The API-format graph, with every input value that names an input file replaced by its asset."""
        prompt = request.workflow.to_api()
        if not request.inputs:
            return prompt
        refs = {name: await self._asset_ref(name, InputFile.coerce(f)) for name, f in request.inputs.items()}
        for node in prompt.values():
            inputs = node.get("inputs") if isinstance(node, dict) else None
            if isinstance(inputs, dict):
                for key, value in inputs.items():
                    if isinstance(value, str) and value in refs:
                        inputs[key] = refs[value]
        return prompt

    async def submit(self, request: JobRequest) -> JobHandle:
        timeout = request.timeout or self.default_timeout
        submitted = time.time()
        body = {"workflow": await self._workflow(request), "metadata": request.request_id}
        key = request.idempotency_key or request.request_id
        data = None
        for attempt in range(1, self.max_attempts + 1):
            try:
                data = await self._json("POST", "/jobs", json=body, headers={"Idempotency-Key": key}, retry=False)
                break
            except InvalidRequest:
                if attempt == 1:
                    raise  # the caller's key was used before
                self.stats["found_after_lost_answer"] += 1
                data = await self._find(request.request_id)  # our lost first answer: the job exists
                if data is None:
                    err = ProviderUnavailable(f"Comfy API POST /jobs: the key {key!r} was taken by a submit whose "
                                              "job cannot be found; not resent", provider=self.name)
                    err.job_may_be_running = True
                    raise err from None
                break
            except (RateLimited, ProviderUnavailable) as exc:
                if getattr(exc, "terminal", False) or attempt == self.max_attempts:
                    exc.job_may_be_running = bool(getattr(exc, "sent", False)) and not isinstance(exc, RateLimited)
                    raise
                # Resending is safe: the same Idempotency-Key cannot create a second job.
                self.stats["resubmits"] += 1
                await asyncio.sleep(max(getattr(exc, "retry_after", None) or 0.0, 0.1 * 2 ** (attempt - 1)))
        job_id = data.get("id") if isinstance(data, Mapping) else None
        if not isinstance(job_id, str) or not job_id:
            raise ProtocolError(f"Comfy API POST /jobs answered without a job id: {str(data)[:200]}",
                                provider=self.name)
        job = _Job(job_id, request.request_id, submitted + timeout, submitted)
        self._jobs[job_id] = job
        job.stream.publish(JobEvent(type=EventType.QUEUED, job_id=job_id, provider=self.name))
        job.task = asyncio.get_running_loop().create_task(self._follow(job))
        return JobHandle(job_id=job_id, provider=self.name, request_id=request.request_id, submitted_at=submitted,
                         deadline=submitted + timeout)

    async def _find(self, request_id: str) -> dict[str, Any] | None:
        listing = await self._json("GET", "/jobs?limit=100")
        for job in listing.get("jobs", []) if isinstance(listing, Mapping) else []:
            if isinstance(job, Mapping) and job.get("metadata") == request_id:
                return dict(job)
        return None

    # ----------------------------------------------------------------------------------------- follow

    async def _follow(self, job: _Job) -> None:
        """Follow one job to its end: the events stream once, while it holds, then polling; the job resource
        decides every time."""
        streamed = not self.use_events
        delay = self.poll_initial
        try:
            while True:
                left = (job.deadline or float("inf")) - time.time()
                if left <= 0:
                    await self._on_deadline(job)
                    return
                if not streamed and not job.cancel_requested:
                    # The stream ends when it announces the end, drops, or cancel() stops it (a job dequeued
                    # by a cancel never announces one); either way the job resource decides.
                    streamed = True
                    job.stream_task = asyncio.ensure_future(self._stream(job))
                    await asyncio.wait({job.stream_task}, timeout=left)
                    if not job.stream_task.done():
                        job.stream_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await job.stream_task
                else:
                    await asyncio.sleep(min(delay, left))
                    delay = min(self.poll_max, delay * 1.5)
                try:
                    body = await asyncio.wait_for(self._json("GET", f"/jobs/{job.job_id}"), max(left, 0.001))
                except TimeoutError:
                    continue
                if self._observe(job, body):
                    return
        except asyncio.CancelledError:
            if job.result is None and job.error is None:
                self._end(job, ProviderUnavailable(f"Stopped following Comfy API job {job.job_id}: the runner "
                                                   "was closed", provider=self.name))
            raise
        except GpuBridgeError as exc:
            exc.job_may_be_running = not isinstance(exc, JobNotFound)
            self._end(job, exc)
        except Exception as exc:  # a follower that dies ends its job with an error, never silence
            log.exception("following Comfy API job %s failed", job.job_id)
            self._end(job, ProtocolError(f"Following Comfy API job {job.job_id} failed: {exc}", provider=self.name))

    async def _stream(self, job: _Job) -> None:
        """Read the job's SSE stream until it announces the end (or drops: the caller then polls)."""
        # No total limit; a read limit of 45 s (the API sends a heartbeat every 15 s): a silent stream is dead.
        async with self._http.stream("GET", f"/jobs/{job.job_id}/events",
                                     timeout=httpx.Timeout(None, connect=10.0, read=45.0)) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                raise error_of(resp, provider=self.name, what="GET /jobs/{id}/events")
            event = None
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event:
                    data = json.loads(line[5:].strip())
                    if event == "status" and self._on_status(job, data.get("status")):
                        return
                    if event == "progress":
                        self._on_progress(job, data)
                    event = None

    def _on_status(self, job: _Job, status: Any) -> bool:
        """True when ``status`` is an end (the job resource then confirms it)."""
        state = _STATES.get(str(status))
        if state is JobState.RUNNING and job.started_at is None:
            job.started_at = time.time()
            job.stream.publish(JobEvent(type=EventType.STARTED, job_id=job.job_id, provider=self.name))
        return state is not None and state.is_terminal

    def _on_progress(self, job: _Job, data: Mapping[str, Any]) -> None:
        self._on_status(job, "running")
        job.stream.publish(JobEvent(type=EventType.PROGRESS, job_id=job.job_id, provider=self.name,
                                    node_id=data.get("current_node"), value=data.get("step") or data.get("value"),
                                    max=data.get("steps") or 1.0))

    def _observe(self, job: _Job, body: Any) -> bool:
        """Fold one job resource in; True once it is terminal (and the job is settled)."""
        if not isinstance(body, Mapping):
            raise ProtocolError(f"Comfy API GET /jobs/{job.job_id}: not an object", provider=self.name)
        job.last = dict(body)
        status = str(body.get("status"))
        if status == "expired" and job.cancel_requested:
            # A queued job we cancelled leaves ComfyUI without a trace; the API then calls it expired.
            self._end(job, JobCancelled(f"Comfy API job {job.job_id} was cancelled", provider=self.name))
            return True
        if status == "expired":
            raise JobNotFound(f"Comfy API job {job.job_id} expired", provider=self.name)
        state = _STATES.get(status)
        if state is None:
            raise ProtocolError(f"Comfy API job {job.job_id}: unknown status {status!r}", provider=self.name)
        self._on_status(job, status)
        if not state.is_terminal:
            return False
        if state is JobState.SUCCEEDED:
            job.result = None  # built by wait() (downloads happen there, once)
            job.stream.publish(JobEvent(type=EventType.SUCCEEDED, job_id=job.job_id, provider=self.name))
        elif state is JobState.FAILED:
            self._end(job, failure_of(body.get("error") if isinstance(body.get("error"), Mapping) else None,
                                      provider=self.name, job_id=job.job_id))
        else:
            self._end(job, JobCancelled(f"Comfy API job {job.job_id} was cancelled", provider=self.name))
        return True

    def _end(self, job: _Job, exc: GpuBridgeError) -> None:
        job.error = exc
        kind = {JobCancelled: EventType.CANCELLED, JobTimeout: EventType.TIMED_OUT}.get(type(exc), EventType.FAILED)
        job.stream.publish(JobEvent(type=kind, job_id=job.job_id, provider=self.name, message=str(exc)))

    async def _on_deadline(self, job: _Job, grace: float = 5.0) -> None:
        """Cancel the job; ``cancelled`` only when the job resource says ``canceled`` within ``grace``
        (a running job is ``canceling`` until ComfyUI stops it at a node boundary)."""
        state = "running" if job.started_at else "queued"
        job.cancel_requested = True
        cancelled = False
        end = time.monotonic() + grace
        with contextlib.suppress(GpuBridgeError, httpx.HTTPError, TimeoutError):
            body = await asyncio.wait_for(self._json("POST", f"/jobs/{job.job_id}/cancel"), grace)
            delay = self.poll_initial
            while not cancelled and time.monotonic() < end:
                status = str(body.get("status")) if isinstance(body, Mapping) else ""
                if status in ("canceled", "cancelled", "expired"):  # expired: a dequeued job leaves no trace
                    cancelled = True
                    break
                if _STATES.get(status, JobState.RUNNING).is_terminal:
                    break  # it ended another way as we cancelled
                await asyncio.sleep(delay)
                delay = min(self.poll_max, delay * 1.5)
                body = await asyncio.wait_for(self._json("GET", f"/jobs/{job.job_id}"), max(0.1, end - time.monotonic()))
        err = JobTimeout(f"Comfy API job {job.job_id} passed its deadline ({state})"
                         + ("" if cancelled else "; its cancel was not confirmed, it may still run"),
                         state=state, cancelled=cancelled, provider=self.name, job_id=job.job_id)
        err.job_may_be_running = not cancelled
        self._end(job, err)

    # ------------------------------------------------------------------------------------------ runner

    def _known(self, job: JobRef) -> _Job:
        job_id = job_id_of(job)
        found = self._jobs.get(job_id)
        if found is None:
            deadline = job.deadline if isinstance(job, JobHandle) else None
            found = self._jobs[job_id] = _Job(job_id, None, deadline, time.time())
            found.task = asyncio.get_running_loop().create_task(self._follow(found))
        return found

    async def status(self, job: JobRef) -> JobStatus:
        body = await self._json("GET", f"/jobs/{job_id_of(job)}")
        state = _STATES.get(str(body.get("status")), JobState.QUEUED)
        prog = body.get("progress") if isinstance(body.get("progress"), Mapping) else None
        progress = Progress(nodes_done=prog.get("nodes_done"), nodes_total=prog.get("nodes_total"),
                            value=prog.get("value")) if prog else None
        error = body.get("error") if isinstance(body.get("error"), Mapping) else None
        return JobStatus(job_id=job_id_of(job), provider=self.name, state=state, progress=progress,
                         queue_position=body.get("queue_position"), error=dict(error) if error else None)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        known = self._known(job)
        assert known.task is not None
        await asyncio.wait_for(asyncio.shield(known.task), timeout)
        if known.error is not None:
            raise known.error
        if known.result is None:
            known.result = await self._result(known)
        return known.result

    async def _result(self, job: _Job) -> JobResult:
        body = job.last or {}
        t0 = time.perf_counter()
        artifacts = [await self._artifact(o) for o in body.get("outputs") or [] if isinstance(o, Mapping)]
        finished = time.time()
        started = _epoch(body.get("started_at")) or job.started_at
        executing = (_epoch(body.get("completed_at")) or finished) - started if started else None
        cost = None
        if self.price_per_s is not None and executing is not None:
            from ...models import Cost

            cost = Cost(usd=round(self.price_per_s * executing, 8), seconds=executing,
                        rate_usd_per_s=self.price_per_s)
        return JobResult(
            job_id=job.job_id, provider=self.name, request_id=job.request_id, artifacts=artifacts,
            timings=Timings(submitted_at=job.submitted_at, started_at=started, finished_at=finished,
                            queued_s=(started - job.submitted_at) if started else None, executing_s=executing,
                            total_s=finished - job.submitted_at, download_s=time.perf_counter() - t0),
            cost=cost, outputs={"comfy_api": {"outputs_reused": bool(body.get("outputs_reused"))}},
        )

    async def _artifact(self, out: Mapping[str, Any]) -> Artifact:
        url = str(out.get("url") or "")
        if httpx.URL(url).host == self._http.base_url.host:
            resp = await self._call("GET", url, what="GET output")
        else:  # a signed URL elsewhere (a CDN, a bucket): it carries its own authority, never our API key
            async with httpx.AsyncClient(timeout=self._http.timeout) as plain:
                resp = await plain.get(url, follow_redirects=True)
            if resp.status_code >= 400:
                raise error_of(resp, provider=self.name, what="GET output")
        mime = str(out.get("content_type") or resp.headers.get("content-type") or "application/octet-stream")
        mime = mime.split(";")[0].strip()
        declared = str(out.get("type"))
        # The MIME type decides (ComfyUI lists animated WebP and core video saves under "images", which the
        # API calls "image"); the declared type settles what the MIME type cannot.
        kind = artifact_kind(mime, animated=declared == "video" and mime.startswith("image/"))
        if kind is ArtifactKind.FILE and declared in _KINDS:
            kind = _KINDS[declared]
        return Artifact(node_id=str(out.get("node_id", "")), kind=kind, filename=out.get("name"), mime_type=mime,
                        data=resp.content, size=len(resp.content), type="output",
                        metadata={"asset_id": out.get("id")} if out.get("id") else {})

    async def cancel(self, job: JobRef) -> JobStatus:
        """``POST .../cancel``. A queued job ends at once; a running one is ``canceling`` until ComfyUI stops
        it, which the job's follower sees on the job resource (the truth) like any other end."""
        known = self._jobs.get(job_id_of(job))
        if known is not None:
            known.cancel_requested = True
        body = await self._json("POST", f"/jobs/{job_id_of(job)}/cancel")
        if known is not None and known.stream_task is not None and not known.stream_task.done():
            known.stream_task.cancel()  # its follower asks the job resource now, and polls to the end
        return JobStatus(job_id=job_id_of(job), provider=self.name,
                         state=_STATES.get(str(body.get("status")), JobState.RUNNING),
                         message=str(body.get("status")))

    async def events(self, job: JobRef) -> AsyncIterator[JobEvent]:  # type: ignore[override]
        async for event in self._known(job).stream.subscribe():
            yield event

    async def health(self) -> HealthReport:
        t0 = time.perf_counter()
        try:
            body = await self._json("GET", "/health", retry=False)
        except GpuBridgeError as exc:
            return HealthReport(provider=self.name, state=HealthState.UNHEALTHY, message=str(exc))
        healthy = isinstance(body, Mapping) and body.get("status") in ("healthy", "ok")
        return HealthReport(provider=self.name, state=HealthState.HEALTHY if healthy else HealthState.DEGRADED,
                            latency_ms=(time.perf_counter() - t0) * 1000,
                            details={"url": self.url, **({k: v for k, v in body.items() if k != "status"}
                                                        if isinstance(body, Mapping) else {})})

    async def aclose(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        await asyncio.gather(*(j.task for j in self._jobs.values() if j.task is not None), return_exceptions=True)
        await self._http.aclose()


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None
