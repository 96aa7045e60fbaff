"""Provider ``modal``: gpubridge's job API on Modal (``modal_app/``), over HTTP.

Configure it with ``GPUBRIDGE_MODAL_URL`` (the ``JobAPI.web`` endpoint of the deployed app) and either
``GPUBRIDGE_MODAL_TOKEN`` (a bearer token from the app's ``gpubridge-api`` Secret) or
``GPUBRIDGE_MODAL_KEY`` + ``GPUBRIDGE_MODAL_SECRET`` (a Modal proxy auth token), or the ``[providers.modal]``
table of the config file::

    GPUBRIDGE_MODAL_URL=https://ryla--gpubridge-jobapi-web.modal.run GPUBRIDGE_MODAL_TOKEN=... \\
        gpubridge run -p modal workflow.json

The runner submits with ``POST /v1/jobs``, follows jobs with long-polls (``GET /v1/jobs/{id}?wait=``),
cancels with ``DELETE``, and maps every HTTP failure onto :mod:`gpubridge.errors`: the API's own error
bodies come back as the same typed error (by class name), bare HTTP codes by code. Secrets never appear
in reprs, logs or error messages.

This module also syncs a model manifest into a Modal Volume (:func:`sync_volume`, ``batch_upload``).
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from .. import errors as _errors
from ..config import ProviderSettings, Settings
from ..errors import (
    AuthError,
    ConfigError,
    GpuBridgeError,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    WorkflowInvalid,
    redact_url,
)
from ..manifest import Manifest, ModelEntry, Plan, SyncReport, download, plan, store_files
from ..models import (
    MIN_JOB_TIMEOUT,
    STATE_EVENTS,
    EventType,
    HealthReport,
    HealthState,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
)
from ..gate import RequestGate
from ..plugins import ProviderSpec, hookimpl
from ..runner import JobRef, WorkflowRunner, job_id_of

__all__ = [
    "ModalRunner",
    "ModalSettings",
    "error_from_dict",
    "plan_volume",
    "sync_volume",
    "volume_listing",
]

_RETRY_DELAYS = (0.5, 1.0, 2.0)
SHORT_CALLS = 64
LONG_POLLS = 2000
_RESUBMIT_DELAYS = (0.1, 0.5, 1.5)


class ModalSettings(ProviderSettings):
    """Settings of the modal provider (environment ``GPUBRIDGE_MODAL_*``, TOML ``[providers.modal]``)."""

    model_config = SettingsConfigDict(env_prefix="GPUBRIDGE_MODAL_")
    section = "modal"

    url: str | None = None
    """The job API's base URL (``GPUBRIDGE_MODAL_URL``)."""
    token: SecretStr | None = None
    """Bearer token (``GPUBRIDGE_MODAL_TOKEN``)."""
    key: SecretStr | None = None
    """Modal proxy auth token id, sent as Modal-Key (``GPUBRIDGE_MODAL_KEY``)."""
    secret: SecretStr | None = None
    """Modal proxy auth token secret, sent as Modal-Secret (``GPUBRIDGE_MODAL_SECRET``)."""
    request_timeout: float = Field(default=30.0, gt=0)
    """Seconds for one request, on top of any long-poll wait."""
    connect_timeout: float = Field(default=10.0, gt=0)
    long_poll: float = Field(default=25.0, gt=0, le=120)
    """Seconds one status long-poll may be held (Modal cuts web requests at 150 s)."""
    deadline_grace: float = Field(default=30.0, ge=0)
    """How long past a job's deadline the runner waits for the server to end it before cancelling."""
    volume: str = "gpubridge-models"
    """The models Volume ``gpubridge models plan/sync --volume`` uses by default."""
    environment: str | None = None
    """The Modal environment of that Volume (default: the profile's)."""


# -------------------------------------------------------------------------------------------- wire


class _Envelope(BaseModel):
    """The job API's job envelope (gpubridge.server.schema's JobEnvelope, read back)."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="ignore")

    job_id: str
    version: int = 0
    deadline: float | None = None
    status: JobStatus
    result: JobResult | None = None
    error: dict[str, Any] | None = None

    @property
    def terminal(self) -> bool:
        return self.status.state.is_terminal


_ERROR_TYPES: dict[str, type[GpuBridgeError]] = {
    name: obj
    for name, obj in vars(_errors).items()
    if isinstance(obj, type) and issubclass(obj, GpuBridgeError)
}


def error_from_dict(
    data: dict[str, Any], *, provider: str | None = None, status_code: int | None = None
) -> GpuBridgeError | None:
    """Rebuild the typed error a job API error body describes (``{"type": "JobTimeout", ...}``).

    Returns None when the type is not a gpubridge error. ``retryable`` is taken from the body. This is the
    one place an error body is read: a field of the wrong type (``traceback: 5``, ``error: "x"`` for a
    WorkflowInvalid) gives a ProtocolError (retryable: the backend's fault), never a TypeError.
    """
    if not isinstance(data, dict):
        return _unreadable(f"an error that is a {type(data).__name__}, not an object", provider, status_code)
    cls = _ERROR_TYPES.get(str(data.get("type")))
    if cls is None:
        return None
    try:
        return _build_error(cls, data, provider=provider, status_code=status_code)
    except (TypeError, ValueError) as exc:
        return _unreadable(f"a {cls.__name__} it cannot read ({exc})", provider, status_code)


def _unreadable(what: str, provider: str | None, status_code: int | None) -> ProtocolError:
    return ProtocolError(f"The Modal job API sent {what}"[:300], provider=provider, status_code=status_code,
                         retryable=True)


_NUMBER = (int, float)


def _field(data: dict[str, Any], key: str, *types: type) -> Any:
    """``data[key]`` if it is absent/None or one of ``types`` (bools are not numbers), else TypeError."""
    value = data.get(key)
    if value is None or (isinstance(value, types) and not (isinstance(value, bool) and bool not in types)):
        return value
    raise TypeError(f"{key} is {type(value).__name__}, not {' or '.join(t.__name__ for t in types)}")


def _build_error(cls: type[GpuBridgeError], data: dict[str, Any], *, provider: str | None,
                 status_code: int | None) -> GpuBridgeError:
    message = str(_field(data, "message", str) or cls.__name__)
    job_id = _field(data, "job_id", str)
    exc: GpuBridgeError
    if issubclass(cls, WorkflowInvalid):
        exc = cls(message, error=_field(data, "error", dict), node_errors=_field(data, "node_errors", dict))
    elif issubclass(cls, PayloadTooLarge):
        exc = cls(message, size=_field(data, "size", int), limit=_field(data, "limit", int))
    elif issubclass(cls, RateLimited):
        exc = cls(message, retry_after=_field(data, "retry_after", *_NUMBER), status_code=status_code)
    elif issubclass(cls, ProviderError):
        exc = cls(message, status_code=_field(data, "status_code", int) or status_code)
    elif issubclass(cls, JobTimeout):
        exc = cls(message, job_id=job_id, state=_field(data, "state", str), cancelled=bool(data.get("cancelled")))
    elif issubclass(cls, JobFailed):
        traceback = _field(data, "traceback", str, list)
        if isinstance(traceback, list) and not all(isinstance(line, str) for line in traceback):
            raise TypeError("traceback is a list of something other than strings")
        node_id = _field(data, "node_id", str, int)
        exc = cls(
            message,
            job_id=job_id,
            node_id=str(node_id) if node_id is not None else None,
            node_type=_field(data, "node_type", str),
            exception_type=_field(data, "exception_type", str),
            exception_message=_field(data, "exception_message", str),
            traceback=traceback,
        )
    elif issubclass(cls, JobError):
        exc = cls(message, job_id=job_id)
    else:
        exc = cls(message)
    exc.provider = provider
    if isinstance(data.get("retryable"), bool):
        exc.retryable = data["retryable"]
    return exc


def _retry_after(resp: httpx.Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- runner


def _loopback(url: str) -> bool:
    from urllib.parse import urlsplit

    from ..fetch import is_loopback_host

    return is_loopback_host(urlsplit(url).hostname or "")


class ModalRunner(WorkflowRunner):
    """Runs jobs through gpubridge's job API on Modal (or anything serving ``gpubridge.server``)."""

    def __init__(
        self,
        url: str,
        *,
        token: SecretStr | str | None = None,
        key: SecretStr | str | None = None,
        secret: SecretStr | str | None = None,
        name: str = "modal",
        default_timeout: float = 600.0,
        request_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        long_poll: float = 25.0,
        deadline_grace: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not url:
            raise ConfigError("The modal provider needs the job API's URL: set GPUBRIDGE_MODAL_URL.")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"GPUBRIDGE_MODAL_URL must be an http(s) URL, got {url!r}")
        key_v, secret_v = _reveal(key), _reveal(secret)
        if bool(key_v) != bool(secret_v):
            raise ConfigError("Modal proxy auth needs both GPUBRIDGE_MODAL_KEY and GPUBRIDGE_MODAL_SECRET.")
        token_v = _reveal(token)
        if not token_v and not key_v and not _loopback(url):
            # The job API refuses anonymous callers except on loopback (serve --allow-anonymous): say so
            # now, not as a 401 at the first request.
            raise ConfigError(
                "The modal provider needs credentials for a job API that is not on this machine: set "
                "GPUBRIDGE_MODAL_TOKEN (the deployment's GPUBRIDGE_API_TOKEN), or GPUBRIDGE_MODAL_KEY and "
                "GPUBRIDGE_MODAL_SECRET for Modal proxy auth."
            )
        headers = {"User-Agent": "gpubridge", "Accept": "application/json"}
        if token_v:
            headers["Authorization"] = f"Bearer {token_v}"
        if key_v and secret_v:
            headers["Modal-Key"] = key_v
            headers["Modal-Secret"] = secret_v
        self.name = name
        self.url = url.rstrip("/")
        self.shown_url = redact_url(self.url)  # for messages and reprs: never a user:password@
        self.capabilities_ttl = 300.0
        self._capabilities: tuple[float, dict[str, Any] | None] | None = None
        self.default_timeout = default_timeout
        self.request_timeout = request_timeout
        self.long_poll = long_poll
        self.deadline_grace = deadline_grace
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(request_timeout, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
            transport=transport,
            # SHORT_CALLS short requests at once (the gate) plus one long-poll per job being followed: long-polls
            # never queue short calls behind them, and nothing queues inside httpx's pool (gpubridge.gate).
            limits=httpx.Limits(max_connections=SHORT_CALLS + LONG_POLLS, max_keepalive_connections=SHORT_CALLS),
        )
        self._gate = RequestGate(SHORT_CALLS, request_timeout)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> ModalRunner:
        name = options.pop("name", "modal")
        transport = options.pop("transport", None)
        cfg = ModalSettings.from_settings(settings, **options)
        return cls(
            cfg.url or "",
            token=cfg.token,
            key=cfg.key,
            secret=cfg.secret,
            name=name,
            default_timeout=settings.timeout,
            request_timeout=cfg.request_timeout,
            connect_timeout=cfg.connect_timeout,
            long_poll=cfg.long_poll,
            deadline_grace=cfg.deadline_grace,
            transport=transport,
        )

    # ------------------------------------------------------------------------------------------- HTTP

    async def _request(
        self, method: str, path: str, *, job_id: str | None = None, wait: float = 0.0, **kwargs: Any
    ) -> httpx.Response:
        timeout = httpx.Timeout(self.request_timeout + wait, connect=self._http.timeout.connect)
        try:
            if wait > 0:  # a long-poll holds its connection while the job API waits: not gated
                resp = await self._http.request(method, path, timeout=timeout, **kwargs)
            else:
                async with self._gate.slot(provider=self.name, what=f"The Modal job API on {method} {path}"):
                    resp = await self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.ConnectError as exc:
            raise ProviderUnavailable(
                f"Cannot reach the Modal job API at {self.shown_url} ({_reason(exc)})", provider=self.name
            ) from None
        except httpx.TimeoutException as exc:
            err = ProviderUnavailable(
                f"The Modal job API at {self.shown_url} timed out on {method} {path} ({type(exc).__name__})",
                provider=self.name,
            )
            # A submit that timed out after sending may have been accepted: resubmitting could run it twice.
            err.job_may_be_running = method == "POST" and not isinstance(exc, httpx.ConnectTimeout)
            raise err from None
        except httpx.TransportError as exc:
            err = ProviderUnavailable(
                f"The Modal job API at {self.shown_url} dropped {method} {path} ({_reason(exc)})",
                provider=self.name,
            )
            err.job_may_be_running = method == "POST"
            raise err from None
        if resp.status_code >= 300:
            raise self._error(resp, method, path, job_id)
        return resp

    def _error(self, resp: httpx.Response, method: str, path: str, job_id: str | None) -> GpuBridgeError:
        code = resp.status_code
        body: Any = None
        try:
            body = resp.json()
        except ValueError:
            pass
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            typed = error_from_dict(body["error"], provider=self.name, status_code=code)
            if typed is not None:
                if isinstance(typed, RateLimited) and typed.retry_after is None:
                    typed.retry_after = _retry_after(resp)
                return typed
        what = f"{method} {path}"
        snippet = _snippet(resp)
        if code in (401, 403):
            return AuthError(
                f"The Modal job API at {self.shown_url} refused our credentials ({code} on {what}{snippet}); check "
                "GPUBRIDGE_MODAL_TOKEN, or GPUBRIDGE_MODAL_KEY/GPUBRIDGE_MODAL_SECRET for proxy auth",
                provider=self.name,
            )
        if code == 404:
            if job_id is not None:
                return JobNotFound(
                    f"The Modal job API knows no job {job_id}", job_id=job_id, provider=self.name
                )
            return ConfigError(
                f"No job API at {self.shown_url} ({code} on {what}{snippet}); is the app deployed and "
                "GPUBRIDGE_MODAL_URL its JobAPI.web URL?",
                provider=self.name,
            )
        if code == 413:
            return PayloadTooLarge(
                f"The Modal job API refused {what}: payload too large{snippet}", provider=self.name
            )
        if code == 429:
            return RateLimited(
                f"The Modal job API is rate limiting ({what}){snippet}",
                provider=self.name,
                retry_after=_retry_after(resp),
                status_code=code,
            )
        if code >= 500:
            return ProviderUnavailable(
                f"The Modal job API answered {code} to {what}{snippet}", provider=self.name, status_code=code
            )
        return ProtocolError(
            f"The Modal job API answered {code} to {what}{snippet}",
            provider=self.name,
            status_code=code,
            retryable=False,
        )

    def _envelope(self, resp: httpx.Response, what: str) -> _Envelope:
        try:
            env = _Envelope.model_validate_json(resp.content)
        except (ValidationError, ValueError) as exc:
            raise ProtocolError(
                f"The Modal job API sent a response we cannot read for {what} (HTTP {resp.status_code}): "
                f"{_first_error(exc)}",
                provider=self.name,
            ) from None
        env.status.provider = self.name
        if env.result is not None:
            env.result.provider = self.name
        return env

    async def _get(self, job_id: str, *, wait: float = 0.0, after: int | None = None) -> _Envelope:
        params: dict[str, Any] = {"wait": f"{max(0.0, wait):g}"}
        if after is not None:
            params["after"] = after
        resp = await self._request("GET", f"/v1/jobs/{job_id}", job_id=job_id, wait=wait, params=params)
        return self._envelope(resp, f"job {job_id}")

    async def _poll(self, job_id: str, *, wait: float, after: int | None = None) -> _Envelope:
        """A long-poll that rides out brief outages (connection drops, 5xx, 429), a few times."""
        for delay in (*_RETRY_DELAYS, None):
            try:
                return await self._get(job_id, wait=wait, after=after)
            except (ProviderUnavailable, ProtocolError, RateLimited) as exc:
                if delay is None or not exc.retryable:
                    raise
                await asyncio.sleep(max(delay, getattr(exc, "retry_after", None) or 0.0))
        raise AssertionError("unreachable")  # pragma: no cover

    # ---------------------------------------------------------------------------------------- runner

    async def submit(self, request: JobRequest) -> JobHandle:
        """``POST /v1/jobs`` with an ``Idempotency-Key`` of its own. If the answer is lost (a timeout or a
        dropped connection after the request went out), the same submit is sent again with the same key,
        so the API hands back the job it may already have created instead of starting a second one."""
        if request.timeout is None:
            request = request.model_copy(update={"timeout": self.default_timeout})
        if request.timeout < MIN_JOB_TIMEOUT:
            # What is left of a deadline (after failover attempts, say) is under what the job API accepts:
            # the job could not run in time anyway, so it ends here, never sent (nothing to cancel).
            raise JobTimeout(
                f"Only {request.timeout:.3g}s of the job's deadline was left, under the {MIN_JOB_TIMEOUT:g}s "
                "a remote job needs; it was not submitted",
                state="queued", cancelled=True, provider=self.name,
            )
        if request.queue_timeout is not None and request.queue_timeout < MIN_JOB_TIMEOUT:
            request = request.model_copy(update={"queue_timeout": MIN_JOB_TIMEOUT})
        submitted = time.time()
        body = request.model_dump_json()
        headers = {"Content-Type": "application/json", "Idempotency-Key": uuid.uuid4().hex}
        maybe_created = False  # an earlier try may have created the job: keep asking with the same key
        for delay in (*_RESUBMIT_DELAYS, None):
            try:
                resp = await self._request("POST", "/v1/jobs", content=body, headers=headers)
            except (ProviderUnavailable, RateLimited) as exc:
                maybe_created = maybe_created or exc.job_may_be_running
                if delay is None or not maybe_created:
                    exc.job_may_be_running = maybe_created
                    raise
                await asyncio.sleep(max(delay, getattr(exc, "retry_after", None) or 0.0))
                continue
            try:
                env = self._envelope(resp, "POST /v1/jobs")
                break
            except ProtocolError as exc:
                # The submit was accepted but its answer is unreadable: the job may exist. Ask again with
                # the same key; the API hands back the job it created instead of starting a second one.
                maybe_created = True
                if delay is None:
                    exc.job_may_be_running = True
                    raise
                await asyncio.sleep(delay)
        return JobHandle(
            job_id=env.job_id,
            provider=self.name,
            request_id=request.request_id,
            submitted_at=submitted,
            deadline=env.deadline,
        )

    async def status(self, job: JobRef) -> JobStatus:
        return (await self._get(job_id_of(job))).status

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        job_id = job_id_of(job)
        hint = job.deadline if isinstance(job, JobHandle) else None
        stop_at = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self.long_poll
            if stop_at is not None:
                wait = max(0.0, min(wait, stop_at - time.monotonic()))
            env = await self._poll(job_id, wait=wait)
            if env.terminal:
                return self._outcome(env)
            deadline = env.deadline or hint
            if deadline is not None and time.time() > deadline + self.deadline_grace:
                # The server should have ended it at its deadline; make sure nothing keeps running.
                await self.cancel(job_id)
                raise JobTimeout(
                    f"Job {job_id} passed its deadline while {env.status.state.value} and was cancelled",
                    job_id=job_id,
                    provider=self.name,
                    state=env.status.state.value,
                    cancelled=True,
                )
            if stop_at is not None and time.monotonic() >= stop_at:
                raise JobTimeout(
                    f"Stopped waiting for job {job_id} after {timeout:g}s; "
                    f"it is still {env.status.state.value}",
                    job_id=job_id,
                    provider=self.name,
                    state=env.status.state.value,
                    cancelled=False,
                )

    def _outcome(self, env: _Envelope) -> JobResult:
        state = env.status.state
        if state is JobState.SUCCEEDED:
            if env.result is None:
                raise ProtocolError(
                    f"Job {env.job_id} succeeded but the API sent no result", provider=self.name
                )
            return env.result
        error = env.error or env.status.error
        exc = error_from_dict(error, provider=self.name) if error else None
        if exc is not None:
            if isinstance(exc, JobError) and exc.job_id is None:
                exc.job_id = env.job_id
            raise exc
        message = env.status.message or f"Job {env.job_id} ended {state.value}"
        if state is JobState.CANCELLED:
            raise JobCancelled(message, job_id=env.job_id, provider=self.name)
        if state is JobState.TIMED_OUT:
            raise JobTimeout(message, job_id=env.job_id, provider=self.name, cancelled=True)
        raise JobFailed(message, job_id=env.job_id, provider=self.name)

    async def cancel(self, job: JobRef) -> JobStatus:
        job_id = job_id_of(job)
        resp = await self._request("POST", f"/v1/jobs/{job_id}/cancel", job_id=job_id)
        return self._envelope(resp, f"cancel {job_id}").status

    async def events(self, job: JobRef) -> AsyncIterator[JobEvent]:  # type: ignore[override]
        job_id = job_id_of(job)
        version: int | None = None
        last_state: JobState | None = None
        last_progress: tuple[Any, ...] | None = None
        while True:
            env = await self._poll(job_id, wait=0.0 if version is None else self.long_poll, after=version)
            st = env.status
            if st.state is not last_state:
                last_state = st.state
                yield JobEvent(
                    type=STATE_EVENTS[st.state],
                    job_id=job_id,
                    provider=self.name,
                    queue_position=st.queue_position,
                    message=st.message,
                    data={"error": env.error} if env.error else {},
                )
            if env.terminal:
                return
            p = st.progress
            key = (p.node_id, p.value, p.max) if p is not None else None
            if p is not None and key != last_progress:
                last_progress = key
                yield JobEvent(
                    type=EventType.PROGRESS if p.max else EventType.EXECUTING,
                    job_id=job_id,
                    provider=self.name,
                    node_id=p.node_id,
                    node_type=p.node_type,
                    value=p.value,
                    max=p.max,
                )
            version = env.version

    async def capabilities(self) -> dict[str, Any] | None:
        """``GET /v1/capabilities`` (ComfyUI's /object_info on the workers), cached for
        ``capabilities_ttl`` seconds; None when the job API cannot say or does not answer."""
        now = time.monotonic()
        if self._capabilities is not None and now - self._capabilities[0] < self.capabilities_ttl:
            return self._capabilities[1]
        try:
            resp = await self._http.get("/v1/capabilities")
            info = resp.json().get("object_info") if resp.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        info = info if isinstance(info, dict) else None
        self._capabilities = (now, info)
        return info

    async def health(self, *, deep: bool = False) -> HealthReport:
        t0 = time.perf_counter()
        try:
            resp = await self._http.get("/v1/health", params={"deep": "true"} if deep else None)
        except httpx.HTTPError as exc:
            return HealthReport(
                provider=self.name,
                state=HealthState.UNHEALTHY,
                message=f"Cannot reach the Modal job API at {self.shown_url} ({_reason(exc)})",
            )
        latency = round((time.perf_counter() - t0) * 1000, 2)
        if resp.status_code in (401, 403):
            raise self._error(resp, "GET", "/v1/health", None)
        if resp.status_code in (200, 503):
            try:
                report = HealthReport.model_validate_json(resp.content)
            except (ValidationError, ValueError):
                report = None
            if report is not None:
                report.provider = self.name
                report.latency_ms = latency
                report.details.setdefault("url", self.url)
                return report
        return HealthReport(
            provider=self.name,
            state=HealthState.UNHEALTHY,
            latency_ms=latency,
            message=f"The Modal job API answered {resp.status_code} to GET /v1/health{_snippet(resp)}",
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"<ModalRunner {self.name!r} {self.shown_url}>"




def _reveal(value: SecretStr | str | None) -> str | None:
    if value is None:
        return None
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    return text.strip() or None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _snippet(resp: httpx.Response) -> str:
    try:
        text = resp.text.strip()
    except Exception:  # noqa: BLE001
        return ""
    return f": {text[:200]}" if text else ""


def _first_error(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        errs = exc.errors()
        if errs:
            e = errs[0]
            return f"{'.'.join(str(x) for x in e.get('loc', ()))}: {e.get('msg')}"
    return _reason(exc)


# ------------------------------------------------------------------------------------ Modal Volumes


def _volume(volume: Any, environment: str | None) -> Any:
    if not isinstance(volume, str):
        return volume
    try:
        import modal
    except ImportError:
        raise ConfigError(
            "Syncing a Modal Volume needs the modal package: pip install 'gpubridge[modal]'"
        ) from None
    return modal.Volume.from_name(volume, create_if_missing=True, environment_name=environment)


def volume_listing(volume: Any, *, environment: str | None = None) -> list[str]:
    """The paths of the files (and links) in a Modal Volume (a name or a ``modal.Volume``)."""
    vol = _volume(volume, environment)
    out = []
    for entry in vol.iterdir("/", recursive=True):
        kind = getattr(entry.type, "name", str(entry.type))
        if kind in ("FILE", "SYMLINK"):
            out.append(str(entry.path).lstrip("/"))
    return out


def plan_volume(
    manifest: Manifest | Sequence[ModelEntry], volume: Any, *, environment: str | None = None
) -> Plan:
    """Which manifest models a Modal Volume holds and which it lacks (reads the Volume's listing)."""
    name = volume if isinstance(volume, str) else getattr(volume, "name", None) or "volume"
    return plan(
        manifest, listing=volume_listing(volume, environment=environment), store=f"Modal Volume {name}"
    )


def sync_volume(
    manifest: Manifest | Iterable[ModelEntry],
    volume: Any,
    *,
    cache_dir: str | Path,
    token: str | None = None,
    force: bool = False,
    environment: str | None = None,
    hf_download: Any = None,
) -> SyncReport:
    """Put the manifest's models into a Modal Volume: download what it lacks into ``cache_dir`` (a local
    store, reused between runs), then upload in one ``Volume.batch_upload``.

    The Volume ends up laid out like any store (``hf/`` hub cache, ``files/``), which is what the app's
    containers link from.
    """
    entries = list(manifest)
    vol = _volume(volume, environment)
    current = plan(entries, listing=volume_listing(vol), store="volume")
    todo = entries if force else current.to_download
    local = download(todo, cache_dir, token=token, hf_download=hf_download)
    report = SyncReport(
        present=[] if force else [e.name for e in current.present],
        gated=local.gated,
        failed=dict(local.failed),
        warnings=list(local.warnings),
    )
    uploads: list[tuple[Path | bytes, str]] = []
    for entry in todo:
        if entry.name in local.failed or entry.name in local.gated:
            continue
        uploads.extend(store_files(entry, cache_dir))
        report.downloaded.append(entry.name)
    if uploads:
        with vol.batch_upload(force=True) as batch:
            for item, rel in uploads:
                source = io.BytesIO(item) if isinstance(item, bytes) else item
                batch.put_file(source, "/" + rel)
    return report


# ------------------------------------------------------------------------------------------- plugin


@hookimpl
def register_providers(register: Any) -> None:
    register(
        ProviderSpec(
            name="modal",
            factory=ModalRunner.from_settings,
            description="gpubridge's job API on Modal (GPUBRIDGE_MODAL_URL, GPUBRIDGE_MODAL_TOKEN)",
            settings=ModalSettings,
        )
    )
