"""The ComfyUI client: one HTTP connection pool and one websocket per client, shared by all its jobs.

``ComfyClient`` is the only ComfyUI client in gpubridge: the local provider, the Modal app and the RunPod
worker all use it. Per job it uploads inputs (content-addressed, so concurrent jobs never collide), gives
outputs a per-job filename prefix, validates the prompt against a cached ``/object_info`` (so a broken
workflow fails before it is queued), queues it with our ``client_id`` and a prompt id we choose, and
follows it on the websocket. The completion signal is ``executing`` with ``node: null``; outputs come
from the ``executed`` frames, or from ``/history`` when the socket dropped during the job. A dropped
socket is reconnected with backoff and every unfinished job is reconciled against ``/history`` and
``/queue``. A job's deadline interrupts it (if running) or removes it from the queue (if pending).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
import imagesize
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from ..errors import (
    AuthError,
    GpuBridgeError,
    JobCancelled,
    JobError,
    JobNotFound,
    JobTimeout,
    PayloadTooLarge,
    ProtocolError,
    ProviderUnavailable,
    RateLimited,
    WorkflowInputError,
    WorkflowInvalid,
)
from ..fetch import UrlFetcher
from ..gate import RequestGate
from ._h1 import EAGER_BYTES, H1Transport
from ._h1 import Response as H1Response
from ..models import (
    Artifact,
    ArtifactKind,
    EventType,
    HealthReport,
    HealthState,
    InputFile,
    JobEvent,
    JobResult,
    JobState,
    JobStatus,
    Progress,
    Timings,
)
from ..runner import EventStream
from . import _ws, protocol
from .validate import PromptValidator

__all__ = ["ComfyClient", "ComfyJob", "unreachable_message"]

log = logging.getLogger("gpubridge.comfy")

_MAX_WS_FRAME = 256 * 1024 * 1024


def unreachable_message(url: str, reason: str, setting: str = "GPUBRIDGE_COMFY_URL") -> str:
    """What to do about a ComfyUI that does not answer; ``setting`` is where the caller's URL came from (the
    RunPod worker reads ``COMFY_URL``)."""
    return (
        f"Cannot reach ComfyUI at {url} ({reason}). Start ComfyUI there "
        f"(in your ComfyUI folder: python main.py --listen 127.0.0.1 --port {urlsplit(url).port or 8188}), "
        f"or run the test double with `gpubridge testing comfy`, or point {setting} at a running server."
    )


class ComfyJob:
    """One prompt queued on a ComfyUI server, followed through the client's websocket."""

    __slots__ = (
        "client",
        "prompt_id",
        "prompt",
        "number",
        "state",
        "submitted_at",
        "started_at",
        "finished_at",
        "upload_s",
        "deadline",
        "epoch",
        "outputs",
        "ws_images",
        "error",
        "interrupted",
        "cancel_requested",
        "timed_out",
        "timeout_state",
        "lost",
        "current_node",
        "progress_value",
        "progress_max",
        "_nodes_done",
        "_progress_state",
        "nodes_total",
        "done",
        "_waiters",
        "stream",
        "_timer",
        "tags",
        "client_id",
        "unconfirmed",
        "closed",
    )

    def __init__(self, client: ComfyClient, prompt_id: str, prompt: dict[str, Any], deadline: float | None):
        self.client = client
        self.prompt_id = prompt_id
        self.prompt = prompt
        self.number: int | float | None = None
        self.state = JobState.QUEUED
        self.submitted_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.upload_s: float | None = None
        self.deadline = deadline  # loop time
        self.epoch = client._epoch
        self.outputs: dict[str, Any] = {}
        self.ws_images: list[Artifact] = []
        self.error: dict[str, Any] | None = None
        self.interrupted: dict[str, Any] | None = None
        self.cancel_requested = False
        self.timed_out = False
        self.timeout_state: JobState | None = None
        self.lost: str | None = None
        self.current_node: str | None = None
        self.progress_value: float | None = None
        self.progress_max: float | None = None
        self._nodes_done = 0
        self._progress_state: str | Mapping[str, Any] | None = None  # the last progress_state, not yet read
        self.nodes_total = len(prompt)
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # Futures of wait() callers, set when ``done`` is: a waiter wakes one loop turn after the job ends
        # (through a shield of ``done`` it took two), and a cancelled waiter cancels only its own future.
        self._waiters: list[asyncio.Future[None]] = []
        self.stream = EventStream()
        self._timer: asyncio.TimerHandle | None = None
        self.tags: dict[str, Any] = {}
        # The websocket client id the prompt was queued under: ComfyUI sends its frames to that id only.
        self.client_id = client.client_id
        self.unconfirmed = False  # timed out, but ComfyUI has not confirmed the interrupt (reaper on it)
        self.closed: str | None = None  # the client was closed before the job finished

    # -- views

    @property
    def nodes_done(self) -> int:
        """Nodes finished, from ComfyUI's last ``progress_state`` frame (decoded here, when asked)."""
        raw = self._progress_state
        if raw is not None:
            self._progress_state = None
            with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                data = json.loads(raw)["data"] if isinstance(raw, str) else raw
                nodes = data.get("nodes") or {}
                self._nodes_done = sum(1 for n in nodes.values() if n.get("state") == "finished")
        return self._nodes_done

    @nodes_done.setter
    def nodes_done(self, value: int) -> None:
        self._progress_state = None
        self._nodes_done = value

    @property
    def finished(self) -> bool:
        return self.done.done()

    def class_type(self, node_id: str | None) -> str | None:
        node = self.prompt.get(node_id) if node_id is not None else None
        return node.get("class_type") if isinstance(node, Mapping) else None

    def progress(self) -> Progress:
        return Progress(
            node_id=self.current_node,
            node_type=self.class_type(self.current_node),
            value=self.progress_value,
            max=self.progress_max,
            nodes_done=self.nodes_done,
            nodes_total=self.nodes_total,
        )

    def status(self) -> JobStatus:
        err = self.exception()
        return JobStatus(
            job_id=self.prompt_id,
            provider=self.client.provider,
            state=self.state,
            progress=self.progress() if self.state is JobState.RUNNING else None,
            error=err.to_dict() if isinstance(err, GpuBridgeError) else None,
        )

    def exception(self) -> GpuBridgeError | None:
        """The typed error this job ended with, or None (running, or succeeded)."""
        provider = self.client.provider
        if self.closed is not None and not self.state.is_terminal:
            err = JobError(self.closed, job_id=self.prompt_id, provider=provider)
            err.job_may_be_running = True
            return err
        if self.state is JobState.FAILED:
            if self.error is not None:
                return protocol.execution_error(
                    self.error, job_id=self.prompt_id, provider=provider, class_type_of=self.class_type
                )
            return ProviderUnavailable(
                self.lost or "ComfyUI lost the job", provider=provider
            )
        if self.state is JobState.TIMED_OUT:
            if self.unconfirmed:
                return JobTimeout(
                    f"Job {self.prompt_id} passed its deadline while {self.timeout_state or 'running'}; "
                    "ComfyUI has not confirmed the interrupt yet, gpubridge keeps trying to stop it",
                    job_id=self.prompt_id,
                    provider=provider,
                    state=str(self.timeout_state or JobState.RUNNING),
                    cancelled=False,
                )
            return JobTimeout(
                f"Job {self.prompt_id} passed its deadline while {self.timeout_state or 'running'} and was "
                "cancelled",
                job_id=self.prompt_id,
                provider=provider,
                state=str(self.timeout_state or JobState.RUNNING),
                cancelled=True,
            )
        if self.state is JobState.CANCELLED:
            return JobCancelled(f"Job {self.prompt_id} was cancelled", job_id=self.prompt_id, provider=provider)
        return None

    # -- internal transitions (called by the client)

    def _emit(self, type: EventType, **fields: Any) -> None:
        # Recorded, not built: the JobEvent is made when a subscriber reads it (most jobs have none).
        fields["job_id"] = self.prompt_id
        fields["provider"] = self.client.provider
        self.stream.record(type, fields)

    def _finish(self, state: JobState, message: str | None = None) -> None:
        if self.done.done():
            return
        if state is JobState.CANCELLED and self.timed_out:
            state = JobState.TIMED_OUT
        self.state = state
        self.finished_at = time.time()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        event = {
            JobState.SUCCEEDED: EventType.SUCCEEDED,
            JobState.FAILED: EventType.FAILED,
            JobState.CANCELLED: EventType.CANCELLED,
            JobState.TIMED_OUT: EventType.TIMED_OUT,
        }[state]
        err = self.exception()
        self._emit(
            event,
            message=message or (str(err) if err else None),
            data={"error": err.to_dict()} if err else {},
        )
        self._set_done()

    def _set_done(self) -> None:
        self.done.set_result(None)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _abandon(self, reason: str) -> None:
        """The client closed: end waiters and event streams without claiming a terminal state."""
        if self.done.done():
            return
        self.closed = reason
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.stream.close()
        self._set_done()

    # -- public

    async def wait(self, timeout: float | None = None) -> None:
        """Wait until the job is finished (any terminal state). ``timeout`` only bounds the wait."""
        if not self.done.done():
            if timeout is None:
                waiter = self.done.get_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                except asyncio.CancelledError:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                    raise
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(self.done), timeout)
                except TimeoutError:
                    raise JobTimeout(
                        f"Stopped waiting for job {self.prompt_id} after {timeout:g}s; it is still "
                        f"{self.state.value}",
                        job_id=self.prompt_id,
                        provider=self.client.provider,
                        state=self.state.value,
                        cancelled=False,
                    ) from None

    async def cancel(self) -> JobStatus:
        return await self.client.cancel(self)

    def events(self) -> AsyncIterator[JobEvent]:
        return self.stream.subscribe()

    def __repr__(self) -> str:
        return f"<ComfyJob {self.prompt_id} {self.state.value}>"


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, (OSError, _ws.InvalidHandshake, TimeoutError, ProviderUnavailable))


# Background tasks that keep a prompt from running unobserved; aclose() lets them finish (close_grace).
_CLEANUP_TASKS = ("comfy-abandon-", "comfy-cancel-", "comfy-deadline-")


class ComfyClient:
    """An async client for one ComfyUI server.

    ``output_prefix`` is a template for the per-job output folder (``{job}`` is a short job token);
    ``None`` leaves ``filename_prefix`` inputs alone. ``validate`` checks prompts against the server's
    ``/object_info`` (fetched once) before queueing them; partly valid prompts, which ComfyUI would run
    with some outputs silently dropped, are refused unless ``allow_partial`` is set.

    Every websocket connection uses a fresh client id (``client_id`` names the first): ComfyUI unregisters
    a client id when it cleans up that id's old socket, which after a drop the client noticed first would
    silence a reconnected socket under the same id. Prompts queued under an earlier id no longer get
    frames; they are followed through ``/history`` and ``/queue`` every ``watch_interval`` seconds, and so
    is every unfinished job once the socket has been silent for ``silence_timeout`` (a job that finished
    in ``/history`` while the socket said nothing marks the socket deaf: it is replaced).

    A job's deadline holds whatever ComfyUI does: if the interrupt is not confirmed within
    ``deadline_grace`` seconds, the job ends TIMED_OUT anyway and a reaper keeps interrupting/dequeuing the
    prompt for up to ``reap_timeout`` seconds. Output downloads (``/view``) are streamed, capped at
    ``max_output_bytes`` each, and bounded by the job's deadline (plus ``deadline_grace``).

    ``aclose()`` does not cancel prompts: a job submitted is the caller's (``gpubridge submit`` exits and
    the job runs on; follow it by id with another client). Waiters and event streams of unfinished jobs
    end at once with a ``JobError`` (``job_may_be_running``). Cleanups already under way (dequeuing a
    prompt whose submit was cut short, cancelling one past its deadline) get up to ``close_grace`` seconds
    to finish first.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8188",
        *,
        provider: str = "comfy",
        client_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        url_setting: str = "GPUBRIDGE_COMFY_URL",
        http: httpx.AsyncClient | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        output_prefix: str | None = "gpubridge/{job}",
        validate: bool = True,
        allow_partial: bool = False,
        include_temp_outputs: bool = False,
        reconnect_timeout: float = 15.0,
        cancel_wait: float = 30.0,
        ping_interval: float | None = 20.0,
        max_connections: int = 4,
        max_retained: int = 10_000,
        deadline_grace: float = 5.0,
        reap_timeout: float = 300.0,
        reap_interval: float = 2.0,
        max_output_bytes: int | None = 1 << 30,
        watch_interval: float | None = 5.0,
        silence_timeout: float = 30.0,
        close_grace: float = 5.0,
    ):
        self.url = url.rstrip("/")
        self.provider = provider
        self.max_retained = max_retained
        self.client_id = client_id or uuid.uuid4().hex
        self.output_prefix = output_prefix
        self.validate = validate
        self.allow_partial = allow_partial
        self.include_temp_outputs = include_temp_outputs
        self.reconnect_timeout = reconnect_timeout
        self.cancel_wait = cancel_wait
        self.ping_interval = ping_interval
        self.connect_timeout = connect_timeout
        self.deadline_grace = deadline_grace
        self.close_grace = close_grace
        self.reap_timeout = reap_timeout
        self.reap_interval = reap_interval
        self.max_output_bytes = max_output_bytes
        self.watch_interval = watch_interval
        self.silence_timeout = silence_timeout
        self._headers = dict(headers or {})
        self.url_setting = url_setting  # named in the message when ComfyUI does not answer
        self._own_http = http is None
        # At most ``max_connections`` requests are handed to httpx at once; the rest wait here, in FIFO
        # order. httpcore rescans its whole request queue (and every connection) each time a request is
        # queued or a response closes, so letting 1,000 concurrent jobs queue inside the pool makes each
        # request cost O(queued): the client, not ComfyUI, then limits throughput. The wait is bounded by
        # the pool timeout, as httpx's own queue is. The pool is small (4) for the same reason: every
        # request checks each idle connection (a socket poll each), and one ComfyUI serves 4 connections as
        # fast as 64 (bench/scale.py, BENCHMARKS.md). Raise ``max_connections`` for a remote ComfyUI whose
        # jobs download many large outputs at once.
        self._gate = RequestGate(max_connections, timeout) if http is None else None
        split = urlsplit(self.url)
        self._h1 = (H1Transport(connect_timeout=connect_timeout, max_idle=max_connections)
                    if http is None and split.scheme == "http" else None)
        self._h1_where = (split.hostname or "127.0.0.1", split.port or 80, split.netloc, split.path.rstrip("/"))
        self._read_timeout = timeout
        self._http = http or httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            trust_env=False,
            # ComfyUI's hot path on asyncio streams (gpubridge.comfy._h1), not httpcore's pool: the request
            # gate above bounds the connections, and httpx's API and exceptions stay as they are.
            transport=self._h1,
        )
        split = urlsplit(self.url)
        scheme = "wss" if split.scheme == "https" else "ws"
        self._ws_base = f"{scheme}://{split.netloc}{split.path}/ws"
        self._ws: _ws.LeanWebSocket | None = None
        self._watcher: asyncio.Task[None] | None = None

        # Final status of forgotten jobs (bounded by max_retained): a JobStatus, or a success's finish time.
        self._settled: dict[str, JobStatus | float] = {}
        self._reader: asyncio.Task[None] | None = None
        self._start_lock: asyncio.Lock | None = None
        self._jobs: dict[str, ComfyJob] = {}
        self._running_prompt: str | None = None
        self._epoch = 0
        self._closed = False
        self._object_info: dict[str, Any] | None = None
        self._object_info_lock: asyncio.Lock | None = None
        self._validator_cache: tuple[dict[str, Any], PromptValidator] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.feature_flags: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def _last_frame(self) -> float:
        """Loop time of the last websocket message (the socket's opening counts as one)."""
        return self._ws.last_message_at if self._ws is not None else 0.0

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._reader is not None and not self._reader.done()

    async def start(self) -> None:
        """Open the websocket (idempotent). Raises ProviderUnavailable quickly when nothing listens."""
        if self.connected:
            return
        if self._closed:
            raise RuntimeError("ComfyClient is closed")
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.connected:
                return
            self._ws = await self._connect_ws()
            self._reader = asyncio.create_task(self._read_loop(), name=f"comfy-ws-{self.client_id[:8]}")
            if self.watch_interval and (self._watcher is None or self._watcher.done()):
                self._watcher = asyncio.create_task(self._watch(), name=f"comfy-watch-{self.client_id[:8]}")

    @property
    def _ws_url(self) -> str:
        return f"{self._ws_base}?clientId={self.client_id}"

    def _new_client_id(self) -> None:
        """A fresh client id for the next connection (see the class doc)."""
        self.client_id = uuid.uuid4().hex

    async def _connect_ws(self) -> _ws.LeanWebSocket:
        try:
            ws = await _ws.connect(
                self._ws_url,
                headers=self._headers or None,
                open_timeout=self.connect_timeout,
                max_size=_MAX_WS_FRAME,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                user_agent="gpubridge",
            )
        except _ws.InvalidStatus as exc:
            code = exc.status_code
            if code in (401, 403):
                raise AuthError(
                    f"ComfyUI at {self.url} refused the websocket (HTTP {code})", provider=self.provider
                ) from None
            raise ProviderUnavailable(
                f"ComfyUI at {self.url} refused the websocket (HTTP {code})",
                provider=self.provider,
                status_code=code,
            ) from None
        except (OSError, TimeoutError, _ws.InvalidHandshake) as exc:
            reason = "connection refused" if isinstance(exc, ConnectionRefusedError) else _short(exc)
            raise ProviderUnavailable(unreachable_message(self.url, reason, self.url_setting), provider=self.provider) from None
        # The first frame is always a status frame with our sid: the socket is registered once it arrives.
        try:
            first = await asyncio.wait_for(ws.first(), self.connect_timeout)
        except Exception as exc:
            await ws.close()
            self._new_client_id()  # that socket may have registered the id: its cleanup would unregister it
            raise ProviderUnavailable(
                f"ComfyUI at {self.url} opened the websocket but sent nothing ({_short(exc)})",
                provider=self.provider,
            ) from None
        self._epoch += 1
        if isinstance(first, str):
            self._on_text(first)
        return ws

    async def aclose(self) -> None:
        """Close the websocket and the HTTP pool. Prompts are not cancelled (see the class doc): unfinished
        jobs end their waiters and event streams with a JobError."""
        self._closed = True
        for job in list(self._jobs.values()):
            job._abandon(
                f"The ComfyUI client was closed before job {job.prompt_id} finished; it may still run on "
                f"ComfyUI at {self.url} (follow it by id with another client)"
            )
        if self._watcher is not None:
            self._watcher.cancel()
        # Cleanups that keep a prompt from running unobserved (dequeue a prompt whose submit was cut short,
        # cancel one past its deadline) get a bounded moment to finish before the connections close.
        cleanups = [t for t in self._background if t.get_name().startswith(_CLEANUP_TASKS) and not t.done()]
        if cleanups and self.close_grace > 0:
            await asyncio.wait(cleanups, timeout=self.close_grace)
        for task in list(self._background):
            task.cancel()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        for job in self._jobs.values():
            if job._timer is not None:
                job._timer.cancel()
        if self._own_http:
            await self._http.aclose()

    async def __aenter__(self) -> ComfyClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # ----------------------------------------------------------------------------------------------- HTTP

    def _slot(self, method: str, path: str) -> Any:
        """One of the request gate's slots (nothing to wait for when the caller brought its own client)."""
        if self._gate is None:
            return contextlib.nullcontext()
        return self._gate.slot(provider=self.provider, what=lambda: f"ComfyUI at {self.url} on {method} {path}")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response | H1Response:
        async with self._slot(method, path):
            return await self._send(method, path, **kwargs)

    def _transport_failure(self, method: str, path: str, exc: httpx.TransportError) -> ProviderUnavailable:
        """A timeout or dropped connection on ``method path``, as the retryable error it is."""
        if isinstance(exc, httpx.TimeoutException):
            what = f"timed out on {method} {path} ({type(exc).__name__})"
        else:
            what = f"dropped {method} {path} ({_short(exc)})"
        return ProviderUnavailable(f"ComfyUI at {self.url} {what}", provider=self.provider)

    async def _fast(self, method: str, path: str, stream: bool, params: Any = None, content: bytes | None = None,
                    json: Any = None, headers: Mapping[str, str] | None = None,
                    eager: int = EAGER_BYTES) -> H1Response:
        """The hot path: straight to the HTTP/1.1 transport, without httpx's request building (URL parsing,
        cookies, auth, redirects: none of which a request to ComfyUI uses)."""
        assert self._h1 is not None
        host, port, netloc, prefix = self._h1_where
        if params:  # a query string as it is, or a mapping to encode
            target = prefix + path + "?" + (params if isinstance(params, str) else urlencode(params))
        else:
            target = prefix + path
        body = content if content is not None else (_dumps(json) if json is not None else b"")
        merged = {**self._headers, **(headers or {})}
        if json is not None:
            merged["content-type"] = "application/json"
        return await self._h1.exchange(host, port, netloc, method, target, list(merged.items()), body,
                                       self._read_timeout, stream, eager)

    async def _send(self, method: str, path: str, *, stream: bool = False,
                    **kwargs: Any) -> httpx.Response | H1Response:
        eager = kwargs.pop("eager", EAGER_BYTES)  # for the hot path only (see H1Transport.exchange)
        try:
            if self._h1 is not None and not (kwargs.keys() - {"params", "content", "json", "headers"}):
                resp = await self._fast(method, path, stream, eager=eager, **kwargs)
            elif stream:
                resp = await self._http.send(self._http.build_request(method, path, **kwargs), stream=True)
            else:
                resp = await self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else _short(exc)
            raise ProviderUnavailable(unreachable_message(self.url, reason, self.url_setting), provider=self.provider) from None
        except httpx.TransportError as exc:
            raise self._transport_failure(method, path, exc) from None
        code = resp.status_code
        if code < 400 or code == 400 and path.endswith("/prompt"):
            return resp
        if stream:  # an error body is not read whole: it may be anything
            await resp.aclose()
        if code in (401, 403):
            raise AuthError(f"ComfyUI at {self.url} answered {code} to {method} {path}", provider=self.provider)
        if code == 413:
            raise PayloadTooLarge(f"ComfyUI at {self.url} refused {path}: payload too large", provider=self.provider)
        if code == 429:
            raise RateLimited(
                f"ComfyUI at {self.url} is rate limiting", provider=self.provider, retry_after=_retry_after(resp)
            )
        if code >= 500:
            body = "" if stream else resp.text[:200]
            raise ProviderUnavailable(
                f"ComfyUI at {self.url} answered {code} to {method} {path}: {body}",
                provider=self.provider,
                status_code=code,
            )
        raise ProtocolError(
            f"ComfyUI at {self.url} answered {code} to {method} {path}", provider=self.provider, status_code=code
        )

    async def _get_json(self, path: str, **kwargs: Any) -> Any:
        resp = await self._request("GET", path, **kwargs)
        try:
            return resp.json()
        except ValueError:
            raise ProtocolError(
                f"ComfyUI at {self.url} sent malformed JSON for GET {path}", provider=self.provider
            ) from None

    async def system_stats(self) -> dict[str, Any]:
        return await self._get_json("/system_stats")

    async def queue(self) -> dict[str, Any]:
        return await self._get_json("/queue")

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        """The history entry of one prompt, or None while it is queued/running or unknown."""
        data = await self._get_json(f"/history/{prompt_id}")
        return data.get(prompt_id) if isinstance(data, Mapping) else None

    async def object_info(self, *, refresh: bool = False) -> dict[str, Any]:
        """``GET /object_info``, fetched once and cached (pass ``refresh`` after installing nodes/models)."""
        if self._object_info is not None and not refresh:
            return self._object_info
        if self._object_info_lock is None:
            self._object_info_lock = asyncio.Lock()
        async with self._object_info_lock:
            if self._object_info is None or refresh:
                self._object_info = await self._get_json("/object_info")
        return self._object_info

    async def view(
        self, filename: str, subfolder: str = "", type: str = "output", *, max_bytes: int | None = None
    ) -> tuple[bytes, str | None]:
        """One output file, streamed; more than ``max_bytes`` (default ``max_output_bytes``) raises
        PayloadTooLarge as soon as that is known, without reading the rest."""
        query = urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        return await self._view(query, filename, max_bytes)

    async def _view(self, query: str, filename: str, max_bytes: int | None = None) -> tuple[bytes, str | None]:
        """``view`` for an encoded query string (the caller reuses it for the artifact's URL)."""
        limit = self.max_output_bytes if max_bytes is None else max_bytes
        async with self._slot("GET", "/view"):
            # A small output comes with the head (one timer, no body stream); never more than the cap.
            resp = await self._send("GET", "/view", stream=True, params=query,
                                    eager=EAGER_BYTES if limit is None else min(limit, EAGER_BYTES))
            try:
                content_type = resp.headers.get("content-type")
                declared = resp.headers.get("content-length", "")
                if limit is not None and declared.isdigit() and int(declared) > limit:
                    raise self._too_large(filename, limit, int(declared))
                if isinstance(resp, H1Response) and resp._content is not None:  # came whole with the head
                    if limit is not None and len(resp._content) > limit:
                        raise self._too_large(filename, limit, None)
                    return resp._content, content_type
                parts: list[bytes] = []
                size = 0
                async for chunk in resp.aiter_bytes():
                    parts.append(chunk)
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise self._too_large(filename, limit, None)
                body = parts[0] if len(parts) == 1 else b"".join(parts)  # one chunk (the usual case): no copy
            except httpx.TransportError as exc:  # timeouts included: reading the streamed body
                raise self._transport_failure("GET", "/view", exc) from None
            finally:
                await resp.aclose()
        return body, content_type

    def _too_large(self, filename: str, limit: int, size: int | None) -> PayloadTooLarge:
        what = f"{size} bytes" if size is not None else f"more than {limit} bytes"
        return PayloadTooLarge(
            f"Output {filename!r} from ComfyUI at {self.url} is {what}, over the cap of {limit} bytes "
            "(max_output_bytes)",
            provider=self.provider,
        )

    def view_url(self, ref: protocol.OutputRef) -> str:
        return f"{self.url}/view?{urlencode(ref.view_params())}"

    async def upload_image(
        self, data: bytes, filename: str, *, subfolder: str = "", type: str = "input", overwrite: bool = False
    ) -> dict[str, Any]:
        """``POST /upload/image``; returns ``{"name", "subfolder", "type"}``."""
        form = {"type": type, "subfolder": subfolder, "overwrite": "true" if overwrite else "false"}
        resp = await self._request("POST", "/upload/image", data=form, files={"image": (filename, data)})
        if resp.status_code != 200:
            raise ProtocolError(f"Upload of {filename!r} failed with HTTP {resp.status_code}", provider=self.provider)
        return resp.json()

    async def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt ``prompt_id`` if it is the running prompt (never another one). Without an id: whatever
        runs."""
        await self._request("POST", "/interrupt", json={"prompt_id": prompt_id} if prompt_id else None)

    async def delete_queued(self, prompt_ids: list[str]) -> None:
        await self._request("POST", "/queue", json={"delete": prompt_ids})

    async def free(self, *, unload_models: bool = False, free_memory: bool = True) -> None:
        await self._request("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})

    # ----------------------------------------------------------------------------------------- submitting

    def job(self, prompt_id: str) -> ComfyJob | None:
        return self._jobs.get(prompt_id)

    def _prune_finished(self) -> None:
        """Bound the records of finished jobs nobody collected (submit-only callers): the oldest go first.
        Their results stay readable from ComfyUI's history."""
        excess = len(self._jobs) - self.max_retained
        if excess <= 0:
            return
        for prompt_id in [pid for pid, job in self._jobs.items() if job.finished][:excess]:
            self._drop_record(prompt_id)

    def _drop_record(self, prompt_id: str) -> None:
        job = self._jobs.pop(prompt_id)
        if job.state.is_terminal:
            # Keep the final word (small): ComfyUI cannot tell a job we timed out from one interrupted by
            # hand, and forgets prompts it dequeued, so status() and cancel() after wait() ask here first.
            # A plain success (the usual case) is kept as its finish time alone: a float, not a model, so
            # the up to max_retained words kept cost ~100 bytes each and no gc-tracked objects.
            self._settled[prompt_id] = (
                job.finished_at or time.time() if job.state is JobState.SUCCEEDED and job.closed is None
                else job.status()
            )
            while len(self._settled) > self.max_retained:
                del self._settled[next(iter(self._settled))]

    def forget(self, prompt_id: str) -> None:
        """Drop a finished job's record (the provider calls this once its result is delivered)."""
        job = self._jobs.get(prompt_id)
        if job is not None and job.finished:
            self._drop_record(prompt_id)

    async def submit(
        self,
        prompt: Mapping[str, Any],
        *,
        inputs: Mapping[str, InputFile | bytes] | None = None,
        timeout: float | None = None,
        prompt_id: str | None = None,
        extra_data: Mapping[str, Any] | None = None,
        validate: bool | None = None,
        front: bool = False,
    ) -> ComfyJob:
        """Upload inputs, validate and queue ``prompt``; return the job once ComfyUI has accepted it.

        ``timeout`` is the job's deadline in seconds from now: when it passes, the job is removed from the
        queue or interrupted and ends as TIMED_OUT.
        """
        if not self.connected:
            await self.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        prompt_id = prompt_id or str(uuid.uuid4())
        t0 = time.perf_counter()
        input_paths = await self._upload_inputs(inputs) if inputs else {}
        upload_s = time.perf_counter() - t0 if inputs else None
        prefix = self.output_prefix.format(job=prompt_id.replace("-", "")[:12]) if self.output_prefix else None
        sent = protocol.prepare_prompt(prompt, output_prefix=prefix, input_paths=input_paths)
        if validate if validate is not None else self.validate:
            await self._validate(sent, set(input_paths.values()))

        job = ComfyJob(self, prompt_id, sent, deadline)
        job.upload_s = upload_s
        job.tags["output_prefix"] = prefix  # where its outputs go, and its uploaded inputs (gpubridge.comfy.files)
        job.tags["input_paths"] = sorted(set(input_paths.values()))
        self._prune_finished()
        self._jobs[prompt_id] = job  # before POST: its first frames can arrive before the response
        job._emit(EventType.QUEUED)
        body: dict[str, Any] = {"prompt": sent, "client_id": job.client_id, "prompt_id": prompt_id}
        if extra_data:
            body["extra_data"] = dict(extra_data)
        if front:
            body["front"] = True
        try:
            resp = await self._request("POST", "/prompt", content=_dumps(body), headers=_JSON)
            data = _json_body(resp, "POST /prompt", self)
            if resp.status_code == 400:
                raise protocol.validation_error(data, provider=self.provider)
            if data.get("node_errors"):
                # Accepted, but some outputs were dropped. Never deliver a partial job silently.
                if not self.allow_partial:
                    await self._remove(prompt_id)
                    raise protocol.validation_error(
                        {"error": {"type": "prompt_outputs_failed_validation",
                                   "message": "Prompt outputs failed validation"},
                         "node_errors": data["node_errors"]},
                        provider=self.provider,
                    )
                job.tags["node_errors"] = data["node_errors"]
        except BaseException as exc:
            job = self._jobs.pop(prompt_id, job)
            if job._timer is not None:
                job._timer.cancel()
            if not isinstance(exc, WorkflowInvalid):
                # The POST may have reached ComfyUI (we were cancelled, or the answer was lost): make sure
                # the prompt, whose id we chose, does not run unobserved.
                self._spawn(self._remove(prompt_id), name=f"comfy-abandon-{prompt_id[:8]}")
            raise
        job.number = data.get("number")
        if deadline is not None and not job.finished:
            job._timer = loop.call_at(deadline, self._on_deadline, job)
        return job

    async def _upload_inputs(self, inputs: Mapping[str, InputFile | bytes]) -> dict[str, str]:
        async def one(name: str, item: InputFile | bytes) -> tuple[str, str]:
            data = item if isinstance(item, bytes) else item.data
            if data is None:
                data = await self._fetch_url(item.url, name)  # type: ignore[union-attr]
            info = await self.upload_image(data, protocol.input_upload_name(name, data), subfolder="gpubridge")
            sub = info.get("subfolder") or ""
            return name, f"{sub}/{info['name']}" if sub else info["name"]

        pairs = await asyncio.gather(*(one(n, i) for n, i in inputs.items()))
        return dict(pairs)

    async def _fetch_url(self, url: str | None, name: str | None = None) -> bytes:
        """A URL input's bytes, through the guarded fetcher (no private addresses, size and time caps)."""
        if not url:
            raise WorkflowInputError(f"input {name!r} has neither data nor url" if name else "input has no data or url")
        fetcher = getattr(self, "url_fetcher", None)
        if fetcher is None:
            fetcher = self.url_fetcher = UrlFetcher.from_settings()
        return (await fetcher.fetch(url, name=name)).data

    async def _validator(self, *, refresh: bool = False) -> PromptValidator:
        info = await self.object_info(refresh=refresh)
        if self._validator_cache is None or self._validator_cache[0] is not info:
            # Input files are ComfyUI's to check (it sees its own input folder): skip that check here.
            self._validator_cache = (info, PromptValidator(info, file_exists=None))
        return self._validator_cache[1]

    async def _validate(self, prompt: Mapping[str, Any], uploaded: set[str]) -> None:
        result = (await self._validator()).validate(prompt)
        if not result.ok or (result.node_errors and not self.allow_partial):
            # The cache may predate a node or model installed since: look again before refusing.
            result = (await self._validator(refresh=True)).validate(prompt)
        if not result.ok or (result.node_errors and not self.allow_partial):
            error = result.error or {
                "type": "prompt_outputs_failed_validation",
                "message": "Prompt outputs failed validation",
                "details": "",
                "extra_info": {},
            }
            raise WorkflowInvalid(error=error, node_errors=result.node_errors, provider=self.provider)

    async def _remove(self, prompt_id: str) -> None:
        with contextlib.suppress(GpuBridgeError):
            await self.delete_queued([prompt_id])
        with contextlib.suppress(GpuBridgeError):
            await self.interrupt(prompt_id)

    # ------------------------------------------------------------------------------------------ cancelling

    def _on_deadline(self, job: ComfyJob) -> None:
        job._timer = None
        if job.finished:
            return
        job.timed_out = True
        job.timeout_state = job.state
        self._spawn(self._expire(job), name=f"comfy-deadline-{job.prompt_id[:8]}")

    async def _expire(self, job: ComfyJob) -> None:
        """Cancel a job past its deadline; if ComfyUI does not confirm within ``deadline_grace`` (a node that
        ignores interrupts, a server that stopped answering), end it TIMED_OUT anyway and leave the prompt
        to the reaper."""
        cancel = self._spawn(self.cancel(job), name=f"comfy-cancel-{job.prompt_id[:8]}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(job.done), self.deadline_grace)
        if job.finished:
            return
        cancel.cancel()
        job.unconfirmed = True
        job._finish(JobState.TIMED_OUT)
        log.warning("job %s passed its deadline and ComfyUI has not confirmed the interrupt; reaping it",
                    job.prompt_id)
        self._spawn(self._reap(job.prompt_id), name=f"comfy-reap-{job.prompt_id[:8]}")

    async def _reap(self, prompt_id: str) -> None:
        """Keep dequeuing/interrupting ``prompt_id`` until ComfyUI has a history entry for it or no longer
        knows it, for at most ``reap_timeout`` seconds."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.reap_timeout
        delay = min(0.05, self.reap_interval)
        while loop.time() < give_up:
            try:
                async with asyncio.timeout_at(give_up):
                    if await self.history(prompt_id) is not None:
                        return
                    queue = await self.queue()
                    if prompt_id in _ids(queue, "queue_running"):
                        await self.interrupt(prompt_id)
                    elif prompt_id in _ids(queue, "queue_pending"):
                        await self.delete_queued([prompt_id])
                    else:
                        return  # finished between the two reads, or dequeued
            except GpuBridgeError as exc:
                log.debug("reaper for %s: %s", prompt_id, exc)
            except TimeoutError:
                break
            await asyncio.sleep(delay)
            delay = min(self.reap_interval, delay * 2)
        log.warning("gave up stopping job %s on ComfyUI at %s after %gs", prompt_id, self.url, self.reap_timeout)

    async def cancel(self, job: ComfyJob | str) -> JobStatus:
        """Dequeue the job if pending, interrupt it if running; wait (bounded) until ComfyUI confirms."""
        if isinstance(job, str):
            known = self._jobs.get(job)
            if known is None:
                return await self._cancel_remote(job)
            job = known
        if job.finished:
            return job.status()
        job.cancel_requested = True
        # Both requests are targeted and idempotent: delete only touches pending prompts, and interrupt with
        # a prompt_id only stops that prompt if it is the one running. Together they cover the race where
        # the job starts between the two.
        await self._remove(job.prompt_id)
        if job.state is JobState.QUEUED and not job.finished:
            await self._confirm_dequeued(job)
        if not job.finished:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(job.done), self.cancel_wait)
        return job.status()

    async def _cancel_remote(self, prompt_id: str) -> JobStatus:
        """Cancel a prompt this client did not submit (e.g. ``gpubridge cancel`` from another process)."""
        before = await self.remote_status(prompt_id)
        if before.state.is_terminal:
            return before
        await self._remove(prompt_id)
        deadline = asyncio.get_running_loop().time() + self.cancel_wait
        delay = 0.05
        while True:
            try:
                after = await self.remote_status(prompt_id)
            except JobNotFound:  # dequeued: ComfyUI keeps no history of deleted prompts
                return JobStatus(job_id=prompt_id, provider=self.provider, state=JobState.CANCELLED,
                                 message="removed from the queue")
            if after.state.is_terminal or asyncio.get_running_loop().time() > deadline:
                return after
            await asyncio.sleep(delay)  # the interrupt lands at the next node boundary
            delay = min(1.0, delay * 2)

    async def _confirm_dequeued(self, job: ComfyJob) -> None:
        try:
            queue = await self.queue()
        except GpuBridgeError:
            return
        ids = {item[1] for key in ("queue_running", "queue_pending") for item in queue.get(key, []) if len(item) > 1}
        if job.prompt_id in ids or job.finished:
            return  # it is running now: the interrupt will end it
        entry = await self.history(job.prompt_id)
        if entry is not None:
            self._complete_from_history(job, entry)
        else:
            job._finish(JobState.CANCELLED, "removed from the queue")

    # ------------------------------------------------------------------------------------------- websocket

    async def _read_loop(self) -> None:
        """Hand the socket's frames to the jobs (in the socket's own callbacks: no task switch per frame) until
        it drops, then reconnect and reconcile."""
        while not self._closed:
            ws = self._ws
            assert ws is not None
            ws.deliver(self._on_text, self._on_binary)
            await ws.wait_closed()
            if self._closed:
                return
            log.warning("websocket to %s dropped; reconnecting", self.url)
            # A fresh id at once: prompts queued while the socket is down get frames on the new socket, and
            # ComfyUI's cleanup of the old socket (which pops its id) cannot silence the new one.
            self._new_client_id()
            self._running_prompt = None
            try:
                self._ws = await self._reconnect()
            except Exception as exc:
                self._ws = None
                self._fail_all(f"ComfyUI at {self.url} went away and did not come back ({_short(exc)})")
                return
            # Frames of the new socket wait (in order) until the jobs are reconciled, as they did before.
            await self._reconcile()

    async def _reconnect(self) -> _ws.LeanWebSocket:
        backoff = wait_exponential_jitter(multiplier=0.05, max=2.0)
        give_up_at = time.monotonic() + self.reconnect_timeout

        def wait(state: RetryCallState) -> float:
            # Never sleep past the give-up time: a dead ComfyUI fails its jobs at reconnect_timeout, not
            # up to one backoff later.
            return max(0.0, min(backoff(state), give_up_at - time.monotonic()))

        async for attempt in AsyncRetrying(
            wait=wait,
            stop=stop_after_delay(self.reconnect_timeout),
            retry=retry_if_exception(_is_transient),
            reraise=True,
        ):
            with attempt:
                return await self._connect_ws()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _reconcile(self) -> None:
        """After a reconnect: collect jobs that finished while we were away, fail the ones ComfyUI lost,
        and point binary frames at the prompt running now."""
        pending = [j for j in self._jobs.values() if not j.finished]
        if pending:
            await asyncio.gather(*(self._check_job(j) for j in pending))

    async def _check_job(self, job: ComfyJob) -> bool:
        """Ask ComfyUI where ``job`` is; settle it from ``/history`` if it finished. True if it did."""
        try:
            entry = await self.history(job.prompt_id)
            if entry is not None:
                self._complete_from_history(job, entry)
                return True
            queue = await self.queue()
            if job.prompt_id in _ids(queue, "queue_running"):
                self._start(job)
                if job.client_id == self.client_id:
                    # Frames without a prompt id (previews, websocket images) belong to the running prompt.
                    self._running_prompt = job.prompt_id
                return False
            if job.prompt_id in _ids(queue, "queue_pending"):
                return False
            entry = await self.history(job.prompt_id)
            if entry is not None:
                self._complete_from_history(job, entry)
                return True
            if job.finished:
                return False
            if job.cancel_requested:
                job._finish(JobState.CANCELLED, "removed from the queue")
            else:
                job.lost = f"ComfyUI at {self.url} lost job {job.prompt_id} (server restarted?)"
                job._finish(JobState.FAILED)
            return True
        except GpuBridgeError as exc:
            log.warning("could not reconcile job %s: %s", job.prompt_id, exc)
            return False

    async def _watch(self) -> None:
        """Follow the jobs the socket cannot tell us about: those queued under an earlier client id, and
        every unfinished job while the socket is silent (open but deaf: replace it)."""
        loop = asyncio.get_running_loop()
        interval = self.watch_interval or 5.0
        suspect: tuple[str, float] | None = None  # (client id, last frame time) when a job finished unheard
        while not self._closed:
            await asyncio.sleep(interval)
            reader = self._reader
            if reader is None or reader.done() or self._ws is None:
                continue
            if suspect is not None:
                if suspect == (self.client_id, self._last_frame):
                    # Still not a frame since ComfyUI finished a job of this socket: it is deaf.
                    log.warning("websocket to %s is open but deaf; replacing it", self.url)
                    if self._ws.transport is not None:
                        self._ws.transport.abort()
                    suspect = None
                    continue
                suspect = None
            silent = _is_silent(loop.time(), self._last_frame, self.silence_timeout)
            current = self.client_id
            jobs = [
                j for j in self._jobs.values()
                if not j.finished and j.number is not None and (silent or j.client_id != current)
            ]
            if not jobs:
                continue
            try:  # one /queue read for all of them; /history only for those no longer queued
                queue = await self.queue()
            except GpuBridgeError as exc:
                log.debug("watch: %s", exc)
                continue
            running, queued = _ids(queue, "queue_running"), _ids(queue, "queue_pending")
            for job in jobs:
                if job.prompt_id in running:
                    self._start(job)
            jobs = [j for j in jobs if j.prompt_id not in running and j.prompt_id not in queued]
            settled = await asyncio.gather(*(self._check_job(j) for j in jobs))
            if silent and any(done and j.client_id == current for j, done in zip(jobs, settled)):
                # ComfyUI finished a job queued under this socket's id and the socket said nothing. Its
                # frames may just be late: the socket is deaf if it stays silent until the next look.
                suspect = (current, self._last_frame)

    def _fail_all(self, reason: str) -> None:
        for job in list(self._jobs.values()):
            if not job.finished:
                job.lost = reason
                job._finish(JobState.FAILED)

    def _succeed(self, job: ComfyJob) -> None:
        """SUCCEEDED, unless a SaveImageWebsocket node's images never reached us (sent over a socket that
        dropped, or to an earlier client id): those exist nowhere else, so that is a retryable failure."""
        missing = _missing_ws_outputs(job)
        if missing:
            job.lost = (
                f"The images of SaveImageWebsocket node(s) {', '.join(missing)} of job {job.prompt_id} never "
                "reached this client (sent over a websocket that dropped, or to another client); ComfyUI "
                "keeps no copy in /history. Run the job again."
            )
            job._finish(JobState.FAILED)
        else:
            job._finish(JobState.SUCCEEDED)

    def _complete_from_history(self, job: ComfyJob, entry: Mapping[str, Any]) -> None:
        if job.finished:
            return
        outcome = protocol.history_outcome(entry)
        job.outputs = dict(outcome.outputs)
        job.epoch = self._epoch  # outputs now come from history: complete
        if job.started_at is None and outcome.start_ms:
            job.started_at = outcome.start_ms / 1000
        if outcome.status == "error":
            job.error = dict(outcome.error or {"exception_message": "ComfyUI reported an error"})
            job._finish(JobState.FAILED)
        elif outcome.status == "interrupted":
            job.interrupted = dict(outcome.interrupted or {})
            job._finish(JobState.CANCELLED)
        else:
            self._succeed(job)

    def _start(self, job: ComfyJob) -> None:
        if job.state is JobState.QUEUED:
            job.state = JobState.RUNNING
            job.started_at = time.time()
            job._emit(EventType.STARTED)

    def _on_text(self, text: str) -> None:
        # ComfyUI writes every frame as json.dumps({"type": ..., "data": ...}): the type can be read without
        # decoding the frame. Of a job's ~14 frames, the queue broadcasts (status) and execution_success are
        # ignored, and progress_state (the largest) is only needed when someone asks for the job's progress:
        # those are not decoded here. Anything else, or a frame not written that way, is decoded.
        if text.startswith('{"type": "'):
            mtype = text[10:text.find('"', 10)]
            if mtype in _UNREAD_FRAMES:
                return
            if mtype == "progress_state":
                at = text.find(_PROMPT_ID_KEY)
                if at > 0:
                    at += len(_PROMPT_ID_KEY)
                    job = self._jobs.get(text[at:text.find('"', at)])
                    if job is not None:
                        job._progress_state = text  # decoded when read (ComfyJob.nodes_done)
                    return
        try:
            msg = json.loads(text)
            mtype = msg["type"]
            data = msg["data"]
        except (ValueError, KeyError, TypeError):
            log.debug("ignoring malformed websocket frame: %.200s", text)
            return
        if mtype in _UNREAD_FRAMES or mtype == "progress_state":
            if mtype == "progress_state" and isinstance(data, Mapping):
                job = self._jobs.get(data.get("prompt_id"))
                if job is not None:
                    job._progress_state = data
            return
        if mtype == "feature_flags":
            self.feature_flags = dict(data)
            return
        prompt_id = data.get("prompt_id") if isinstance(data, Mapping) else None
        if prompt_id is None and mtype in ("executing", "progress"):
            prompt_id = self._running_prompt
        job = self._jobs.get(prompt_id) if prompt_id else None
        if mtype == "execution_start":
            self._running_prompt = prompt_id
            if job is not None:
                self._start(job)
            return
        if job is None or job.finished:
            return
        if mtype == "executing":
            node = data.get("node")
            if node is None:
                if self._running_prompt == prompt_id:
                    self._running_prompt = None
                self._settle(job)
                return
            self._start(job)
            job.current_node = node
            job.progress_value = job.progress_max = None
            job._emit(EventType.EXECUTING, node_id=node, node_type=job.class_type(node))
        elif mtype == "progress":
            node = data.get("node") or job.current_node
            job.progress_value = data.get("value")
            job.progress_max = data.get("max")
            job._emit(
                EventType.PROGRESS,
                node_id=node,
                node_type=job.class_type(node),
                value=job.progress_value,
                max=job.progress_max,
            )
        elif mtype == "executed":
            node = data.get("node")
            output = data.get("output") or {}
            if node is not None:
                job.outputs[str(node)] = output
            job._emit(EventType.EXECUTED, node_id=node, node_type=job.class_type(node), data={"output": output})
        elif mtype == "execution_cached":
            nodes = data.get("nodes") or []
            if nodes:
                job._emit(EventType.CACHED, data={"nodes": nodes})
        elif mtype == "execution_error":
            job.error = dict(data)
        elif mtype == "execution_interrupted":
            job.interrupted = dict(data)

    def _settle(self, job: ComfyJob) -> None:
        if job.error is not None:
            job._finish(JobState.FAILED)
        elif job.interrupted is not None:
            job._finish(JobState.CANCELLED)
        elif job.epoch != self._epoch:
            # The socket dropped during the job: the executed frames may be incomplete.
            self._spawn(self._settle_from_history(job), name=f"comfy-history-{job.prompt_id[:8]}")
        else:
            self._succeed(job)

    async def _settle_from_history(self, job: ComfyJob) -> None:
        try:
            entry = await self.history(job.prompt_id)
        except GpuBridgeError as exc:
            job.lost = f"could not read the history of job {job.prompt_id}: {exc}"
            job._finish(JobState.FAILED)
            return
        if entry is None:
            job.lost = f"ComfyUI reported job {job.prompt_id} done but has no history for it"
            job._finish(JobState.FAILED)
        else:
            self._complete_from_history(job, entry)

    def _on_binary(self, frame: bytes) -> None:
        decoded = protocol.decode_binary_frame(frame)
        prompt_id = decoded.prompt_id or self._running_prompt
        job = self._jobs.get(prompt_id) if prompt_id else None
        if job is None or job.finished:
            return
        node = decoded.node_id or job.current_node
        if decoded.is_image:
            if job.class_type(node) == "SaveImageWebsocket":
                job.ws_images.append(_artifact(node or "", decoded.data, decoded.mime_type, None, ws=True))
            job._emit(
                EventType.PREVIEW,
                node_id=node,
                node_type=job.class_type(node),
                image=decoded.data,
                data={"mime_type": decoded.mime_type},
            )
        elif decoded.event == protocol.BINARY_TEXT:
            job._emit(EventType.LOG, node_id=node, message=decoded.text)

    # ------------------------------------------------------------------------------------------- results

    async def collect(self, job: ComfyJob, *, download: bool = True) -> JobResult:
        """The result of a finished job: its artifacts (downloaded through ``/view``) and timings.

        Raises the job's typed error if it did not succeed.
        """
        if not job.finished:
            await job.wait()
        err = job.exception()
        if err is not None:
            raise err
        outputs = job.outputs
        refs = protocol.output_refs(outputs, include_temp=self.include_temp_outputs)
        t0 = time.perf_counter()
        artifacts: list[Artifact]
        if download and refs:
            artifacts = await self._download_all(job, refs)
        else:
            artifacts = [
                Artifact(
                    node_id=r.node_id, kind=r.kind, filename=r.filename, subfolder=r.subfolder, type=r.type,
                    mime_type=r.mime_type, url=self.view_url(r),
                )
                for r in refs
            ]
        download_s = time.perf_counter() - t0 if refs and download else None
        artifacts.extend(job.ws_images)
        for node_id, text in protocol.text_outputs(outputs):
            artifacts.append(
                Artifact(node_id=node_id, kind=ArtifactKind.TEXT, text=text, mime_type="text/plain")
            )
        return JobResult(
            job_id=job.prompt_id,
            provider=self.provider,
            artifacts=artifacts,
            outputs=outputs,
            timings=_timings(job, download_s),
            warnings=[f"ComfyUI dropped outputs that failed validation: {sorted(job.tags['node_errors'])}"]
            if "node_errors" in job.tags
            else [],
        )

    async def _download_all(self, job: ComfyJob, refs: list[protocol.OutputRef]) -> list[Artifact]:
        """Download every output within the job's deadline (plus ``deadline_grace``): a trickling /view
        cannot keep a run alive past its timeout."""
        limit = job.deadline + self.deadline_grace if job.deadline is not None else None
        # One output (the usual case) is downloaded in this task: a task of its own costs more than the request.
        tasks = [asyncio.ensure_future(self._download(r)) for r in refs] if len(refs) > 1 else []
        try:
            async with asyncio.timeout_at(limit):
                if not tasks:
                    return [await self._download(r) for r in refs]
                return list(await asyncio.gather(*tasks))
        except TimeoutError:
            err = JobTimeout(
                f"Job {job.prompt_id} finished, but its outputs were still downloading from {self.url} at its "
                "deadline",
                job_id=job.prompt_id,
                provider=self.provider,
                state="downloading",
                cancelled=False,
            )
            err.job_may_be_running = False
            raise err from None
        finally:
            for task in tasks:
                task.cancel()

    async def _download(self, ref: protocol.OutputRef) -> Artifact:
        query = urlencode(ref.view_params())
        data, content_type = await self._view(query, ref.filename)
        mime = (content_type or "").split(";", 1)[0].strip()
        if mime in ("application/octet-stream", ""):  # ComfyUI said nothing useful: guess from the name
            mime = ref.mime_type or mime or None
        return _artifact(ref.node_id, data, mime, ref, animated=ref.animated, url=f"{self.url}/view?{query}")

    async def run(self, prompt: Mapping[str, Any], **kwargs: Any) -> JobResult:
        """Submit, wait and collect in one call."""
        job = await self.submit(prompt, **kwargs)
        try:
            await job.wait()
            return await self.collect(job)
        finally:
            self.forget(job.prompt_id)

    # -------------------------------------------------------------------------------- status of any prompt

    async def remote_status(self, prompt_id: str) -> JobStatus:
        """Status of a prompt this client may not have submitted (e.g. from another process)."""
        job = self._jobs.get(prompt_id)
        if job is not None:
            return job.status()
        settled = self._settled.get(prompt_id)
        if type(settled) is float:
            return JobStatus(job_id=prompt_id, provider=self.provider, state=JobState.SUCCEEDED, updated_at=settled)
        if settled is not None:
            return settled.model_copy()
        entry = await self.history(prompt_id)
        if entry is not None:
            outcome = protocol.history_outcome(entry)
            state = {"success": JobState.SUCCEEDED, "interrupted": JobState.CANCELLED}.get(
                outcome.status, JobState.FAILED
            )
            error = None
            if outcome.error:
                error = protocol.execution_error(outcome.error, job_id=prompt_id, provider=self.provider).to_dict()
            return JobStatus(job_id=prompt_id, provider=self.provider, state=state, error=error)
        queue = await self.queue()
        for item in queue.get("queue_running", []):
            if len(item) > 1 and item[1] == prompt_id:
                return JobStatus(job_id=prompt_id, provider=self.provider, state=JobState.RUNNING)
        pending = sorted(
            (i for i in queue.get("queue_pending", []) if len(i) > 1), key=lambda i: i[0]
        )
        for pos, item in enumerate(pending):
            if item[1] == prompt_id:
                return JobStatus(
                    job_id=prompt_id, provider=self.provider, state=JobState.QUEUED, queue_position=pos
                )
        raise JobNotFound(
            f"ComfyUI at {self.url} knows no job {prompt_id} (not queued, running, or in history)",
            job_id=prompt_id,
            provider=self.provider,
        )

    async def queue_position(self, prompt_id: str) -> int | None:
        queue = await self.queue()
        pending = sorted((i for i in queue.get("queue_pending", []) if len(i) > 1), key=lambda i: i[0])
        for pos, item in enumerate(pending):
            if item[1] == prompt_id:
                return pos
        return None

    async def stops_within(self, prompt_id: str, seconds: float, *, poll: float = 0.2) -> bool:
        """Whether ComfyUI stops executing ``prompt_id`` within ``seconds`` (after an interrupt or a deadline).

        False when it is still running then, or when ComfyUI does not answer: a node that ignores interrupts
        (a stuck kernel, a blocking custom node) holds the GPU, and its worker should be replaced."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            try:
                queue = await self.queue()
            except GpuBridgeError:
                return False
            running = {str(item[1]) for item in queue.get("queue_running", []) if len(item) > 1}
            if prompt_id not in running:
                return True
            if loop.time() >= end:
                return False
            await asyncio.sleep(min(poll, max(0.0, end - loop.time())))  # polling ComfyUI's queue, bounded

    async def result_of(self, prompt_id: str, *, download: bool = True) -> JobResult:
        """The result of a finished prompt from ``/history`` (for jobs submitted elsewhere)."""
        entry = await self.history(prompt_id)
        if entry is None:
            status = await self.remote_status(prompt_id)
            raise JobError(
                f"Job {prompt_id} is {status.state.value}, not finished", job_id=prompt_id, provider=self.provider
            )
        job = ComfyJob(self, prompt_id, _prompt_of(entry), None)
        job.submitted_at = None  # submitted elsewhere: when is not known here (never "now")
        self._complete_from_history(job, entry)
        end_ms = protocol.history_outcome(entry).end_ms
        if end_ms:
            job.finished_at = end_ms / 1000  # ComfyUI's own word, not the moment we asked
        return await self.collect(job, download=download)

    # -------------------------------------------------------------------------------------------- health

    async def health(self, *, timeout: float | None = None) -> HealthReport:
        """ComfyUI's state from ``/system_stats`` and ``/queue``; ``timeout`` bounds the probe (a frozen
        ComfyUI then answers unhealthy in ``timeout`` seconds, not after the HTTP client's own timeout)."""
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                stats = await self.system_stats()
                queue = await self.queue()
        except GpuBridgeError as exc:
            return HealthReport(provider=self.provider, state=HealthState.UNHEALTHY, message=str(exc))
        except TimeoutError:
            return HealthReport(provider=self.provider, state=HealthState.UNHEALTHY,
                                message=f"ComfyUI at {self.url} did not answer within {timeout:g}s",
                                details={"timeout": True})
        latency = (time.perf_counter() - t0) * 1000
        system = stats.get("system", {}) if isinstance(stats, Mapping) else {}
        devices = stats.get("devices", []) if isinstance(stats, Mapping) else []
        running = len(queue.get("queue_running", []))
        pending = len(queue.get("queue_pending", []))
        return HealthReport(
            provider=self.provider,
            state=HealthState.HEALTHY,
            latency_ms=round(latency, 2),
            queue_depth=pending,
            running=running,
            version=system.get("comfyui_version"),
            details={
                "url": self.url,
                "devices": [
                    {k: d.get(k) for k in ("name", "type", "vram_total", "vram_free")} for d in devices
                ],
                "python": system.get("python_version"),
                "pytorch": system.get("pytorch_version"),
                "websocket": self.connected,
            },
        )


# ---------------------------------------------------------------------------------------------- helpers

_UNREAD_FRAMES = frozenset({"status", "crystools.monitor", "execution_success"})
"""Frames the client ignores: queue broadcasts, a monitoring extension's, and execution_success (not a completion
signal: the history entry may not exist yet; ``executing`` with ``node: null`` is)."""
_PROMPT_ID_KEY = '"prompt_id": "'

_JSON = {"content-type": "application/json"}


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps builds one per call when given separators


def _dumps(obj: Any) -> bytes:
    return _ENCODER.encode(obj).encode()


def _json_body(resp: httpx.Response | H1Response, what: str, client: ComfyClient) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise ProtocolError(
            f"ComfyUI at {client.url} sent malformed JSON for {what} (HTTP {resp.status_code})",
            provider=client.provider,
        ) from None


def _is_silent(now: float, last_frame: float, silence_timeout: float) -> bool:
    """Has the socket said nothing for ``silence_timeout`` seconds (pure, for an injected clock)?"""
    return now - last_frame >= silence_timeout


def _missing_ws_outputs(job: ComfyJob) -> list[str]:
    """SaveImageWebsocket nodes of ``job`` with no image received. Such a node always sends at least one
    image, and only over the websocket."""
    dropped = job.tags.get("node_errors") or {}
    got = {a.node_id for a in job.ws_images}
    return [
        str(node_id)
        for node_id, node in job.prompt.items()
        if isinstance(node, Mapping)
        and node.get("class_type") == "SaveImageWebsocket"
        and str(node_id) not in got
        and str(node_id) not in dropped
    ]


def _ids(queue: Mapping[str, Any], key: str) -> set[str]:
    items = queue.get(key) if isinstance(queue, Mapping) else None
    return {i[1] for i in items or () if isinstance(i, (list, tuple)) and len(i) > 1}


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:197] + "..."


def _retry_after(resp: httpx.Response | H1Response) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _prompt_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    prompt = entry.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 2 and isinstance(prompt[2], dict):
        return prompt[2]
    return {}


def _artifact(
    node_id: str,
    data: bytes,
    mime: str | None,
    ref: protocol.OutputRef | None,
    *,
    animated: bool = False,
    ws: bool = False,
    url: str | None = None,
) -> Artifact:
    from ..models import artifact_kind

    kind = artifact_kind(mime, animated=animated)
    width = height = None
    if kind in (ArtifactKind.IMAGE, ArtifactKind.ANIMATION):
        with contextlib.suppress(Exception):
            if data[:8] == _PNG and data[12:16] == b"IHDR":  # what ComfyUI saves most: read it here
                w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
            else:
                w, h = imagesize.get(_BytesReader(data))
            if w > 0 and h > 0:
                width, height = w, h
    return Artifact(
        node_id=str(node_id),
        kind=kind,
        filename=ref.filename if ref else None,
        subfolder=ref.subfolder if ref else "",
        type=ref.type if ref else ("websocket" if ws else None),
        mime_type=mime,
        data=data,
        url=url,
        width=width,
        height=height,
        size=len(data),
        # ``key``: the ComfyUI output list it came from ("images", "gifs", "audio", ...), as clients of
        # worker-comfyui see it (every non-temp "images" entry is an image to them, animated or not).
        metadata={**({"animated": True} if animated else {}), **({"key": ref.key} if ref else {})},
    )


_PNG = b"\x89PNG\r\n\x1a\n"


class _BytesReader:
    """The minimal file interface imagesize needs, over bytes, without copying."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else min(len(self._data), self._pos + n)
        chunk = bytes(self._data[self._pos : end])
        self._pos = end
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: len(self._data)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def _timings(job: ComfyJob, download_s: float | None) -> Timings:
    submitted, started, finished = job.submitted_at, job.started_at, job.finished_at
    return Timings(
        submitted_at=submitted,
        started_at=started,
        finished_at=finished,
        queued_s=round(started - submitted, 6) if started and submitted else None,
        executing_s=round(finished - started, 6) if started and finished else None,
        total_s=round((finished or time.time()) - submitted, 6) if submitted else None,
        upload_s=job.upload_s,
        download_s=download_s,
    )
