"""The runner interface every provider implements, and the pieces runners are built from.

:class:`WorkflowRunner` is async: it is the implementation. :class:`SyncRunner` drives any runner from
synchronous code through one background event loop (anyio's blocking portal), so there is no second
implementation. Runners compose: :class:`RunnerWrapper` forwards every call to an inner runner, and the
resilience and shadow layers are runners that wrap runners.

The contract, for implementers:

- ``submit`` returns as soon as the backend has accepted the job. Validation failures raise
  :class:`~gpubridge.errors.WorkflowInvalid` *before* anything runs.
- ``wait`` returns the :class:`~gpubridge.models.JobResult` or raises the job's typed error. The job's own
  deadline (``JobRequest.timeout``) is enforced by the runner: the remote job is interrupted or dequeued
  and :class:`~gpubridge.errors.JobTimeout` (``cancelled=True``) is raised. A ``wait(timeout=...)`` shorter
  than that only stops waiting: it raises ``JobTimeout`` with ``cancelled=False`` and the job runs on.
- ``cancel`` is idempotent and returns the job's status after the cancel request.
- ``events`` yields the job's events from its start (a late subscriber gets a replay) and ends after a
  terminal event.
- Job ids are strings; a runner also accepts an id it did not submit itself (another process did) where
  the backend makes that possible.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import inspect
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, Union

from .errors import JobTimeout
from .models import (
    STATE_EVENTS,
    TERMINAL_EVENTS,
    EventType,
    HealthReport,
    JobEvent,
    JobHandle,
    JobRequest,
    JobResult,
    JobState,
    JobStatus,
    Workflow,
)

__all__ = [
    "JobRef",
    "WorkflowRunner",
    "RunnerWrapper",
    "SyncRunner",
    "EventStream",
    "as_request",
    "job_id_of",
    "poll_events",
]

JobRef = Union[JobHandle, str]
EventCallback = Callable[[JobEvent], Union[None, Awaitable[None]]]
T = TypeVar("T")


def job_id_of(job: JobRef) -> str:
    return job.job_id if isinstance(job, JobHandle) else str(job)


def as_request(request: JobRequest | Workflow | dict | str | Path, **fields: Any) -> JobRequest:
    """Accept a JobRequest, or a workflow (object, dict, path or JSON) plus JobRequest fields."""
    if isinstance(request, JobRequest):
        if not fields:
            return request
        # Validate the changed fields (inputs given as paths or bytes become InputFile, and so on).
        return JobRequest.model_validate({**dict(request), **fields})
    return JobRequest(workflow=request, **fields)


class WorkflowRunner(abc.ABC):
    """Runs ComfyUI workflows somewhere. See the module docstring for the contract."""

    name: str = "runner"

    @abc.abstractmethod
    async def submit(self, request: JobRequest) -> JobHandle:
        """Send the job; return once the backend has accepted it."""

    @abc.abstractmethod
    async def status(self, job: JobRef) -> JobStatus:
        """The job's current state, progress and queue position."""

    @abc.abstractmethod
    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        """Wait for the job and return its result, or raise its typed error."""

    @abc.abstractmethod
    async def cancel(self, job: JobRef) -> JobStatus:
        """Cancel the job (dequeue it, or interrupt it if it runs). Idempotent."""

    @abc.abstractmethod
    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        """The job's events, from its start, ending after a terminal event."""

    @abc.abstractmethod
    async def health(self) -> HealthReport:
        """An active health check of the backend."""

    async def capabilities(self) -> Mapping[str, Any] | None:
        """What this backend can run, as ComfyUI's ``/object_info`` (node classes, and model files in the
        loaders' options), or None when it cannot say. Routing skips a backend that lacks what a workflow
        needs (:func:`gpubridge.comfy.preflight.preflight`)."""
        return None

    async def result(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        """Alias of :meth:`wait`."""
        return await self.wait(job, timeout=timeout)

    async def run(
        self,
        request: JobRequest | Workflow | dict | str | Path,
        *,
        on_event: EventCallback | None = None,
        **fields: Any,
    ) -> JobResult:
        """Submit and wait. If the caller is cancelled, the remote job is cancelled too (no orphans).

        That holds while the submit is still in flight too (a slow upload, a POST the backend is still
        validating): the submit is left to finish in the background and the job it created is cancelled
        as soon as its id is known, so nothing runs to completion unnoticed.
        """
        req = as_request(request, **fields)
        # The submit runs in a task of its own, so a cancelled caller leaves it to finish; it hands its handle
        # (or error) to ``answer``, which is all the caller waits on (the caller's cancel cancels only that).
        answer: asyncio.Future[JobHandle] = asyncio.get_running_loop().create_future()
        submitting = asyncio.ensure_future(_submit_answering(self, req, answer))
        try:
            handle = await answer
        except asyncio.CancelledError:
            if answer.done() and not answer.cancelled():
                answer.exception()  # retrieved (a submit error that lost the race with this cancel is not logged)
            if not submitting.done():
                _cancel_when_submitted(self, submitting)
            elif not submitting.cancelled() and submitting.exception() is None and submitting.result() is not None:
                await _cancel_quietly(self, submitting.result())  # submitted just now: cancel it here
            raise
        watcher = asyncio.create_task(_forward_events(self, handle, on_event)) if on_event else None
        try:
            return await self.wait(handle)
        except asyncio.CancelledError:
            await _cancel_quietly(self, handle)
            raise
        except JobTimeout as exc:
            if not exc.cancelled:
                await _cancel_quietly(self, handle)
            raise
        finally:
            if watcher is not None:
                await _finish_watcher(watcher)

    async def aclose(self) -> None:
        """Release connections and background tasks."""

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await settle_pending_cancels(self)
        await self.aclose()

    def sync(self) -> SyncRunner:
        """A blocking facade over this runner (it owns a background event loop; close it when done)."""
        return SyncRunner(self)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


_REAPERS: set[asyncio.Task[None]] = set()  # strong references to the background cancels below
_PENDING: weakref.WeakKeyDictionary[WorkflowRunner, set[asyncio.Task[None]]] = weakref.WeakKeyDictionary()

CLOSE_GRACE = 10.0
"""Seconds a closing runner waits for the cancels of jobs whose submit was still in flight when their caller
went away (SIGTERM during an upload, say): closing first would leave those jobs running unobserved."""


async def settle_pending_cancels(runner: WorkflowRunner, timeout: float = CLOSE_GRACE) -> None:
    """Wait (at most ``timeout``) for the background cancels :meth:`WorkflowRunner.run` left behind."""
    pending = [t for t in _PENDING.get(runner, ()) if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


async def _submit_answering(runner: WorkflowRunner, request: JobRequest,
                            answer: asyncio.Future[JobHandle]) -> JobHandle | None:
    """``runner.submit(request)``, its handle or error also handed to ``answer`` as soon as it is known (the
    caller wakes one loop turn later, not two as through a shield). A failure is returned as None here: it is
    the caller's to raise, through ``answer``."""
    try:
        handle = await runner.submit(request)
    except asyncio.CancelledError:
        answer.cancel()
        raise
    except BaseException as exc:
        if not answer.done():
            answer.set_exception(exc)
        if not isinstance(exc, Exception):
            raise
        return None
    if not answer.done():
        answer.set_result(handle)
    return handle


def _cancel_when_submitted(runner: WorkflowRunner, submitting: asyncio.Future[JobHandle | None]) -> None:
    """The caller of ``run`` is gone while its submit is in flight: cancel the job once it exists."""

    async def reap() -> None:
        try:
            handle = await submitting
        except BaseException:  # the submit was cancelled: the provider cleaned up (or nothing ran)
            return
        if handle is not None:  # None: the submit failed, nothing to cancel
            await _cancel_quietly(runner, handle)

    task = asyncio.ensure_future(reap())
    _REAPERS.add(task)
    task.add_done_callback(_REAPERS.discard)
    mine = _PENDING.setdefault(runner, set())
    mine.add(task)
    task.add_done_callback(mine.discard)


async def _cancel_quietly(runner: WorkflowRunner, handle: JobHandle) -> None:
    with contextlib.suppress(Exception):
        await asyncio.shield(runner.cancel(handle))


async def _forward_events(runner: WorkflowRunner, handle: JobHandle, callback: EventCallback) -> None:
    async for event in runner.events(handle):
        out = callback(event)
        if inspect.isawaitable(out):
            await out


async def _finish_watcher(task: asyncio.Task[None]) -> None:
    # The job is terminal: its stream ends on its own once the last events are delivered. Bound the wait so
    # a backend whose stream lags (polling) cannot hold the result back.
    if not task.done():
        await asyncio.wait({task}, timeout=2.0)
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


class RunnerWrapper(WorkflowRunner):
    """A runner that forwards every call to ``inner``. Subclass it to compose behaviour around a runner."""

    def __init__(self, inner: WorkflowRunner):
        self.inner = inner
        self.name = inner.name

    async def submit(self, request: JobRequest) -> JobHandle:
        return await self.inner.submit(request)

    async def status(self, job: JobRef) -> JobStatus:
        return await self.inner.status(job)

    async def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        return await self.inner.wait(job, timeout=timeout)

    async def cancel(self, job: JobRef) -> JobStatus:
        return await self.inner.cancel(job)

    def events(self, job: JobRef) -> AsyncIterator[JobEvent]:
        return self.inner.events(job)

    async def health(self) -> HealthReport:
        return await self.inner.health()

    async def capabilities(self) -> Mapping[str, Any] | None:
        return await self.inner.capabilities()

    async def aclose(self) -> None:
        await self.inner.aclose()


# ------------------------------------------------------------------------------------------------ events


class EventStream:
    """The ordered, replayable event log of one job, with any number of subscribers.

    ``publish`` never blocks. A subscriber that joins late gets the events still held (the last
    ``maxlen``), then live ones; the stream ends after a terminal event or :meth:`close`.

    :meth:`record` logs an event without building it: the :class:`~gpubridge.models.JobEvent` (a validated
    pydantic model) is made the first time a subscriber (or :meth:`last`) reads it, with the time it was
    recorded. A job nobody follows then pays for a tuple per event, not a model.
    """

    __slots__ = ("_events", "_offset", "_changed", "_closed", "maxlen")

    def __init__(self, maxlen: int = 512):
        # JobEvent, or (type, fields, at) still to be built (see record)
        self._events: collections.deque[JobEvent | tuple[EventType, dict[str, Any], float]] = collections.deque()
        self._offset = 0  # index of _events[0] in the whole history
        self._changed: asyncio.Event | None = None
        self._closed = False
        self.maxlen = maxlen

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, event: JobEvent) -> None:
        self._append(event, event.terminal)

    def record(self, type: EventType, fields: dict[str, Any]) -> None:
        """Publish ``JobEvent(type=type, **fields)`` stamped now, built only when someone reads it."""
        self._append((type, fields, time.time()), type in TERMINAL_EVENTS)

    def _append(self, item: JobEvent | tuple[EventType, dict[str, Any], float], terminal: bool) -> None:
        if self._closed:
            return
        events = self._events
        events.append(item)
        if len(events) > self.maxlen:
            events.popleft()
            self._offset += 1
        if terminal:
            self._closed = True
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def close(self) -> None:
        self._closed = True
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _event(self, i: int) -> JobEvent:
        item = self._events[i]
        if type(item) is tuple:
            kind, fields, at = item
            try:
                item = JobEvent(type=kind, at=at, **fields)
            except ValueError:  # a field from the wire that is not what it should be: keep the event as sent
                item = JobEvent.model_construct(type=kind, at=at, **fields)
            self._events[i] = item  # built once, whoever reads it first
        return item  # type: ignore[return-value]

    def last(self) -> JobEvent | None:
        return self._event(-1) if self._events else None

    async def subscribe(self) -> AsyncIterator[JobEvent]:
        index = self._offset
        while True:
            if index < self._offset:
                index = self._offset  # fell behind the retained window
            while index - self._offset < len(self._events):
                event = self._event(index - self._offset)
                index += 1
                yield event
            if self._closed:
                return
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()


async def poll_events(
    status: Callable[[], Awaitable[JobStatus]],
    *,
    provider: str | None = None,
    interval: float = 0.25,
    max_interval: float = 2.0,
) -> AsyncIterator[JobEvent]:
    """Events derived from polling a status function, for backends that cannot stream.

    It yields one event per state change and per progress change, and backs off from ``interval`` to
    ``max_interval`` while nothing changes.
    """
    last_state: JobState | None = None
    last_progress: tuple[Any, ...] | None = None
    delay = interval
    while True:
        st = await status()
        changed = False
        if st.state is not last_state:
            last_state = st.state
            changed = True
            yield JobEvent(
                type=STATE_EVENTS[st.state],
                job_id=st.job_id,
                provider=provider or st.provider,
                queue_position=st.queue_position,
                message=st.message,
                data={"error": st.error} if st.error else {},
            )
        if st.state.is_terminal:
            return
        p = st.progress
        key = (p.node_id, p.value, p.max) if p else None
        if key is not None and key != last_progress:
            last_progress = key
            changed = True
            yield JobEvent(
                type=EventType.PROGRESS,
                job_id=st.job_id,
                provider=provider or st.provider,
                node_id=p.node_id,
                node_type=p.node_type,
                value=p.value,
                max=p.max,
            )
        delay = interval if changed else min(max_interval, delay * 1.5)
        await asyncio.sleep(delay)


# -------------------------------------------------------------------------------------------------- sync


class SyncRunner:
    """Blocking access to a :class:`WorkflowRunner`, for scripts and synchronous web frameworks.

    It runs the async runner on one background event loop (thread-safe to call from many threads)::

        with gpubridge.connect().sync() as runner:
            result = runner.run("workflow.json", timeout=120)
    """

    def __init__(self, runner: WorkflowRunner):
        from anyio.from_thread import start_blocking_portal

        self.runner = runner
        self._portal_cm = start_blocking_portal(backend="asyncio")
        self._portal = self._portal_cm.__enter__()
        self._closed = False

    @property
    def name(self) -> str:
        return self.runner.name

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._closed:
            raise RuntimeError("This SyncRunner is closed.")
        return self._portal.call(partial(fn, *args, **kwargs))

    def submit(self, request: JobRequest | Workflow | dict | str | Path, **fields: Any) -> JobHandle:
        return self._call(self.runner.submit, as_request(request, **fields))

    def status(self, job: JobRef) -> JobStatus:
        return self._call(self.runner.status, job)

    def wait(self, job: JobRef, *, timeout: float | None = None) -> JobResult:
        return self._call(self.runner.wait, job, timeout=timeout)

    result = wait

    def cancel(self, job: JobRef) -> JobStatus:
        return self._call(self.runner.cancel, job)

    def health(self) -> HealthReport:
        return self._call(self.runner.health)

    def run(
        self,
        request: JobRequest | Workflow | dict | str | Path,
        *,
        on_event: Callable[[JobEvent], None] | None = None,
        **fields: Any,
    ) -> JobResult:
        """Submit and wait. On KeyboardInterrupt the remote job is cancelled before re-raising."""
        handle = self.submit(request, **fields)
        try:
            if on_event is not None:
                for event in self.events(handle):
                    on_event(event)
            return self.wait(handle)
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self.cancel(handle)
            raise

    def events(self, job: JobRef) -> Iterator[JobEvent]:
        agen = self.runner.events(job)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                with contextlib.suppress(Exception):
                    self._call(agen.aclose)

    def close(self) -> None:
        if self._closed:
            return
        try:
            self._portal.call(self.runner.aclose)
        finally:
            self._closed = True
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> SyncRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SyncRunner {self.runner!r}>"


def monotonic_deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout
